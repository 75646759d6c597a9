"""Serving the lifecycle flows as Prefect deployments, with their schedules and event triggers."""
