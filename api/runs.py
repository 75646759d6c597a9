"""POST /api/runs/{pipeline}: start a pipeline run on the Prefect server of a running `dlm serve`.

The API process runs no flow itself: it asks the Prefect server to create a flow run of the
pipeline's served deployment (`<pipeline>/<pipeline>`, deployments/serve.py), which the
serving process then runs. The run carries the tag `requested-by:<token owner>`. Options are
checked as `dlm run` checks them (lifecycle.runs): an option the pipeline does not take is
refused by name.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Body
from pydantic import BaseModel, ConfigDict

from api.auth import Admin
from lifecycle.catalogue import storages
from lifecycle.catalogue.db import session_scope
from lifecycle.errors import ConflictError, InvalidValueError, TransientError
from lifecycle.planning.partition import check_partition
from lifecycle.redact import redact
from lifecycle.runs import PIPELINES, RunOption, accepting, parse_pipeline
from lifecycle.units import parse_size

router = APIRouter(tags=["runs"])


class RunRequest(BaseModel):
    """A run's options: `dry_run` for every pipeline; `storage`, `budget`, `adopt`, `partitions`
    where it takes them (`partitions` K > 1: K sub-runs of the deployment that workers share)."""

    model_config = ConfigDict(extra="forbid")
    dry_run: bool = False
    storage: str | None = None
    budget: str | None = None
    adopt: bool | None = None
    partitions: int | None = None


class RunStarted(BaseModel):
    pipeline: str
    flow_run_id: str
    flow_run_name: str
    parameters: dict[str, Any]


def prefect_api_url() -> str | None:
    """The Prefect server to ask: PREFECT_API_URL, else the one a running `dlm serve` wrote."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    from flows.events import api_url_file

    try:
        return api_url_file().read_text().strip() or None
    except OSError:
        return None


def _parameters(pipeline: str, request: RunRequest) -> dict[str, Any]:
    """The flow's parameters; raises InvalidValueError, StorageNotFoundError as `dlm run` does."""
    spec = PIPELINES[parse_pipeline(pipeline)]
    params: dict[str, Any] = {"dry_run": request.dry_run}
    given = {
        RunOption.STORAGE: request.storage,
        RunOption.BUDGET: request.budget,
        RunOption.ADOPT: request.adopt,
        RunOption.PARTITIONS: request.partitions,
    }
    for option, value in given.items():
        if value is None:
            continue
        if option not in spec.options:
            names = ", ".join(p.value for p in accepting(option))
            raise InvalidValueError(f"{option.value} applies to {names} only")
        params[option.value] = value
    if request.budget is not None:
        parse_size(request.budget)
    if request.partitions is not None:
        check_partition(request.partitions, None)
    if request.storage is not None:
        with session_scope() as s:
            storages.get_storage(request.storage, session=s)
    return params


@router.post("/runs/{pipeline}", response_model=RunStarted, status_code=202)
def start_run(pipeline: str, who: Admin, request: Annotated[RunRequest | None, Body()] = None) -> RunStarted:
    """Start a run of a served pipeline now (an admin token); 503 when no `dlm serve` runs."""
    params = _parameters(pipeline, request or RunRequest())
    url = prefect_api_url()
    if not url:
        raise TransientError(
            "no Prefect server to start the run on: start `dlm serve` (or set PREFECT_API_URL)"
        )
    base = url.rstrip("/")
    try:
        with httpx.Client(timeout=15) as client:
            found = client.get(f"{base}/deployments/name/{pipeline}/{pipeline}")
            if found.status_code == 404:
                raise ConflictError(f"pipeline {pipeline!r} is not served there: start `dlm serve`")
            found.raise_for_status()
            made = client.post(
                f"{base}/deployments/{found.json()['id']}/create_flow_run",
                json={"parameters": params, "tags": ["dlm", "api", f"requested-by:{who.owner}"]},
            )
            made.raise_for_status()
    except httpx.HTTPError as exc:
        raise TransientError(
            f"the Prefect server at {redact(base)} did not answer: {type(exc).__name__}"
        ) from None
    run = made.json()
    return RunStarted(
        pipeline=pipeline, flow_run_id=str(run["id"]), flow_run_name=str(run["name"]), parameters=params
    )
