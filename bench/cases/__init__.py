"""Benchmark cases: each module exposes `run(scale: float) -> list[dict]` (see bench/README.md)."""
