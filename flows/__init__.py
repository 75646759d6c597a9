"""Prefect flows: one per pipeline; each plans, then applies in batches."""
