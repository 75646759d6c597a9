"""Tests of lifecycle.catalogue: the filter language, bulk registration, one owner per byte."""
