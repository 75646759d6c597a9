"""The lifecycle flows as Prefect deployments (cron schedules, the item-ready trigger) and serving them."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.types.entrypoint import EntrypointType

from flows.registry import FLOWS
from lifecycle.runs import PIPELINES, Pipeline
from lifecycle.settings import Settings, get_settings

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

READY_EVENT = "dlm.item.ready"
ON_READY = "replicate-on-ready"
# A burst of `dlm.item.ready` events within this many seconds starts one replicate run (keep
# in step with prefect.yaml's item_ready trigger; tests/deployments/test_serve.py checks).
READY_WINDOW_S = 10
READY_PARAMETERS = {"ready_since": "{{ event.occurred.isoformat() }}", "window_s": READY_WINDOW_S}
TAGS = ["dlm"]
# At most this many flow runs at once in one `dlm serve` (each is a process of its own).
RUN_LIMIT = 4


def ready_trigger() -> DeploymentEventTrigger:
    """Coalesce `dlm.item.ready` events into few replicate runs: the first event of a quiet
    period starts a run at once, and the events of the next READY_WINDOW_S seconds start none
    (Prefect's reactive trigger with `within`); the run waits until that window has closed and
    then replicates every READY item below its target, the window's items among them."""
    return DeploymentEventTrigger(
        name=f"dlm: {ON_READY}",
        description="Replicate newly READY items, one run per burst of events.",
        expect={READY_EVENT},
        match={"prefect.resource.id": "dlm.item.*"},
        threshold=1,
        within=timedelta(seconds=READY_WINDOW_S),
        parameters=dict(READY_PARAMETERS),
    )


def build_deployments(settings: Settings | None = None) -> list[RunnerDeployment]:
    """One deployment per pipeline of the registry (lifecycle.runs), named after it, on its cron
    schedule (DLM_SCHEDULES__<PIPELINE>), and `replicate-on-ready` started by the
    `dlm.item.ready` event."""
    crons = (settings or get_settings()).schedules
    deployments = [
        FLOWS[pipeline].to_deployment(
            name=spec.name,
            cron=getattr(crons, spec.schedule),
            description=spec.description,
            tags=TAGS,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for pipeline, spec in PIPELINES.items()
    ]
    deployments.append(
        FLOWS[Pipeline.REPLICATE].to_deployment(
            name=ON_READY,
            triggers=[ready_trigger()],
            tags=[*TAGS, "event"],
            description=f"Replicate newly READY items when `{READY_EVENT}` announces them.",
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
    )
    return deployments


def describe(deployment: RunnerDeployment) -> str:
    """When a deployment runs, in a few words (`cron */5 * * * *`, `on dlm.item.ready`)."""
    whens: list[str] = []
    for s in deployment.schedules or []:
        schedule: Any = s.schedule
        whens.append(f"cron {schedule.cron}" if getattr(schedule, "cron", None) else str(schedule))
    for t in deployment.triggers or []:
        whens.append("on " + ", ".join(sorted(getattr(t, "expect", ()) or ())))
    return "; ".join(whens) or "on demand"


def serve_all(deployments: list[RunnerDeployment] | None = None, *, limit: int = RUN_LIMIT) -> None:
    """Serve the deployments until Ctrl-C or SIGTERM: each runs on its schedule or trigger as a
    subprocess of this one, which inherits DLM_* and PREFECT_API_URL. Returns after a clean stop
    (schedules paused, the runs in flight told to stop)."""
    import asyncio

    from prefect.runner import Runner
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Runner(Runner):
        # Prefect's own SIGTERM handler calls a coroutine without awaiting it (a RuntimeWarning)
        # and exits at once; shut down the way Ctrl-C does instead.
        def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
            raise KeyboardInterrupt

    deps = deployments if deployments is not None else build_deployments()
    url = os.environ.get("PREFECT_API_URL")
    with temporary_settings(updates={PREFECT_API_URL: url} if url else {}):
        runner = _Runner(pause_on_shutdown=True, limit=limit)
        for deployment in deps:
            runner.add_deployment(deployment)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(runner.start())
