"""DLM's domain core: catalogue, policy, planners, storages and transfers (no Prefect, Typer or FastAPI)."""

__version__ = "0.1.0"
