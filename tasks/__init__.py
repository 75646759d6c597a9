"""Prefect tasks: thin wrappers over lifecycle calls, each on one batch."""
