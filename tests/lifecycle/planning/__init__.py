"""Tests of lifecycle.planning: the planners, property-tested against a reference model."""
