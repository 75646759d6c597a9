"""The FastAPI application: every route under /api, OpenAPI at /api/openapi.json, docs at /api/docs;
GET /metrics, and the operator dashboard at / (api/dashboard.py)."""

from __future__ import annotations

from fastapi import FastAPI

from api import dashboard, errors, metrics, routes_catalogue, routes_items, runs


def create_app() -> FastAPI:
    """A new app; the catalogue is the one the settings name (DLM_DATABASE_URL)."""
    app = FastAPI(
        title="DLM",
        summary="The data lifecycle manager's REST API: items, copies, datasets, events, uploads.",
        version="1",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
    )
    errors.install(app)
    app.include_router(routes_items.router, prefix="/api")
    app.include_router(routes_catalogue.router, prefix="/api")
    app.include_router(runs.router, prefix="/api")
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    return app
