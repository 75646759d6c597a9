"""How a run shares its work: partitioned runs, and runs started by a burst of events.

Partitioned: one run of a pipeline (replicate, verify) fans out into K sub-runs of its
deployment, which workers pick up like any run; sub-run i applies the actions of (verify:
reads the copies of) the items whose oid mod K is i (lifecycle.planning.partition), so no item
is acted on by two of them. Each sub-run plans,
claims and copies on its own; the catalogue's claims stay the safety net. Without a
deployment (a flow called in-process, `dlm run`) the partitions run here, one after another:
the same result, without the parallelism.

Coalesced: a run started by the item-ready trigger waits until the trigger's window of events
has closed (wait_for_window), so that one run replicates every item the burst announced.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import get_run_logger
from prefect.runtime import deployment as this_deployment

from lifecycle.errors import DLMError
from lifecycle.planning.partition import check_partition
from lifecycle.reports import PartitionedReport, PartitionRun, PipelineReport, VerifyReport
from lifecycle.runs import Pipeline

_POLL_S = 1.0
MAX_WINDOW_S = 600.0


def wait_for_window(since: str | None, window_s: float) -> float:
    """Sleep until `window_s` seconds after the ISO time `since` (a coalesced burst of events:
    every item its events announced is READY by then); returns the seconds slept. An unreadable
    time or a window beyond MAX_WINDOW_S waits for nothing (or at most MAX_WINDOW_S)."""
    if not since or window_s <= 0:
        return 0.0
    try:
        start = datetime.fromisoformat(since.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    left = (start + timedelta(seconds=window_s) - datetime.now(UTC)).total_seconds()
    left = min(max(left, 0.0), MAX_WINDOW_S)
    if left:
        get_run_logger().info("waiting %.1fs for the burst of ready events to end", left)
        time.sleep(left)
    return left


def sub_run_name(pipeline: str, partitions: int, partition: int) -> str:
    return f"{pipeline}-part-{partition + 1}-of-{partitions}"


def fan_out(
    pipeline: str,
    partitions: int,
    parameters: dict[str, Any],
    run_here: Callable[[int], PipelineReport | VerifyReport],
) -> PartitionedReport:
    """Start one sub-run per partition on this run's deployment and wait for all of them;
    returns a report naming each sub-run and its final state.

    Raises DLMError when a sub-run did not complete (the others finish their part).
    """
    check_partition(partitions, None)
    logger = get_run_logger()
    deployment = this_deployment.id
    if not deployment:
        logger.info("%s: no deployment, so its %d partitions run here in turn", pipeline, partitions)
        here = [PartitionRun(partition=i, report=run_here(i)) for i in range(partitions)]
        return PartitionedReport(pipeline=Pipeline(pipeline), partitions=partitions, runs=here)

    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    started = [
        run_deployment(
            name=deployment,
            parameters={**parameters, "partitions": partitions, "partition": i},
            flow_run_name=sub_run_name(pipeline, partitions, i),
            timeout=0,
            as_subflow=True,
        )
        for i in range(partitions)
    ]
    logger.info("%s: started %d partition runs", pipeline, partitions)
    final: dict[int, Any] = {}
    with get_client(sync_client=True) as client:
        while len(final) < partitions:
            for i, run in enumerate(started):
                if i in final:
                    continue
                state = client.read_flow_run(run.id).state
                if state is not None and state.is_final():
                    final[i] = state
            if len(final) < partitions:
                time.sleep(_POLL_S)
    runs = [
        PartitionRun(partition=i, flow_run=str(r.id), name=r.name, state=final[i].type.value)
        for i, r in enumerate(started)
    ]
    bad = [r for r in runs if r.state != "COMPLETED"]
    if bad:
        raise DLMError(
            f"{len(bad)} of {partitions} partitions of {pipeline} did not complete: "
            + ", ".join(f"{r.name} {r.state}" for r in bad)
        )
    return PartitionedReport(pipeline=Pipeline(pipeline), partitions=partitions, runs=runs)
