"""Benchmarks of DLM's hot paths, each measured against a reference taken in the same run."""
