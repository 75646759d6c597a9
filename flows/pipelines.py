"""The lifecycle flows: replicate, migrate, expire and rebalance, each plan-then-apply in batches.

Every flow takes `dry_run` (plan, publish the plan, change nothing), writes Events through
the lifecycle core, emits them as Prefect events, and publishes a table artifact of the
batches it ran and a markdown summary.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote
from sqlalchemy.engine import make_url

from flows.events import enable_publishing
from flows.partitions import fan_out, wait_for_window
from flows.plan_report import drop_planned, plan_rows, storage_names, take_planned
from flows.run_record import recorded_run
from lifecycle.apply.records import SettleStage, expired_among
from lifecycle.apply.result import BatchResult
from lifecycle.catalogue.catalog import status
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import utcnow
from lifecycle.errors import ConflictError, DLMError
from lifecycle.planning.actions import ITEM_EXPIRED
from lifecycle.planning.partition import check_partition
from lifecycle.planning.plan import Plan, batch_copies, batch_deletes
from lifecycle.reports import PartitionedReport, PipelineReport, PlanSummary, Settled
from lifecycle.runs import PIPELINES, Pipeline
from lifecycle.settings import get_settings
from lifecycle.units import format_size
from tasks.batches import (
    copy_batch,
    delete_batch,
    plan_pipeline,
    settle_abandoned_uploads,
    settle_catalogue,
    settle_in_flight,
)
from tasks.orphans import tracked_run


def run_actor() -> str:
    name = flow_run.get_flow_name() or "dlm"
    run = flow_run.get_name() or ""
    return f"flow:{name}/{run}" if run else f"flow:{name}"


class _OneLineErrors(logging.Filter):
    """Log a DLMError that ends a flow run as its one-line message, not a traceback: it is a
    failure DLM explains (the CLI prints it as `dlm: error: ...`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, DLMError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_dlm_errors() -> None:
    """Install _OneLineErrors on Prefect's flow run logger (once)."""
    logger = logging.getLogger("prefect.flow_runs")
    if not any(isinstance(f, _OneLineErrors) for f in logger.filters):
        logger.addFilter(_OneLineErrors())


_LOCK_POLL_S = 0.2


def _logger() -> Any:
    """The flow run's logger, or a plain one outside a run."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("dlm")


def _holder(lock: Any) -> str:
    """Who holds the writer lock, as its holder wrote it into the lock file."""
    try:
        lock.seek(0)
        info = json.loads(lock.read(4096) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info.get("pid"):
        return "another run (it did not say which)"
    return (
        f"run {info.get('pipeline', '?')} (pid {info['pid']} on {info.get('host', '?')}, "
        f"since {info.get('started', '?')})"
    )


@contextmanager
def catalogue_writer(pipeline: str = "?") -> Iterator[None]:
    """On SQLite, one pipeline run applies at a time: an exclusive lock on `<catalogue>.writer`
    (fcntl.flock) that the kernel releases when the run ends or dies, so a killed run never
    blocks the next one. The holder writes host, pid, pipeline and start time into the file;
    a run that finds the lock taken says so once (naming the holder) and gives up after
    DLM_WRITER_LOCK_TIMEOUT_S. PostgreSQL runs split the work by row locks instead
    (lifecycle.apply).

    Raises ConflictError when the wait times out.

    (A Prefect global concurrency limit was the first choice, but a killed run's slot stays
    leased until the server's repossessor frees it, and Prefect's test server never does.)
    """
    settings = get_settings()
    url = make_url(settings.db_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        yield
        return
    import fcntl

    path = f"{url.database}.writer"
    with open(path, "a+b") as lock:
        waited_since = None
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                limit = settings.writer_lock_timeout_s
                if waited_since is None:
                    waited_since = now
                    _logger().warning(
                        "the catalogue is busy: %s holds its writer lock (%s); waiting up to %gs",
                        _holder(lock),
                        path,
                        limit,
                    )
                if now - waited_since >= limit:
                    raise ConflictError(
                        f"gave up after {limit:g}s waiting for the catalogue's writer lock: "
                        f"{_holder(lock)} holds it; run again when it has finished "
                        "(or raise DLM_WRITER_LOCK_TIMEOUT_S)"
                    ) from None
                time.sleep(min(_LOCK_POLL_S, max(0.0, limit - (now - waited_since))))
        if waited_since is not None:  # another run applied meanwhile: a plan kept from before
            drop_planned()  # it is not this run's (take_planned)
        try:
            info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "pipeline": pipeline,
                "started": utcnow().isoformat(timespec="seconds"),
            }
            lock.truncate(0)
            lock.write(json.dumps(info).encode())
            lock.flush()
            yield
        finally:
            lock.truncate(0)
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Stopwatch:
    """Seconds per stage of a run, for its report."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.monotonic()

    def lap(self, stage: str) -> None:
        now = time.monotonic()
        self.laps[stage] = round(now - self._last, 3)
        self._last = now


def _artifact_key(pipeline: str) -> str:
    return f"dlm-{pipeline}"


def run_pipeline(
    pipeline: Pipeline,
    *,
    dry_run: bool = False,
    items: list[str] | None = None,
    part: tuple[int, int] | None = None,
) -> PipelineReport:
    """Plan `pipeline`, then (unless dry_run) apply it: catalogue-only actions, copy batches,
    delete batches, in that order. With `part` (partitions, partition), only the items of that
    partition (flows/partitions.py). Returns the run's report (also published as artifacts)."""
    enable_publishing()
    quiet_dlm_errors()
    actor = run_actor()
    with tracked_run():
        if dry_run:
            return _plan_and_apply(pipeline, dry_run=True, items=items, actor=actor, part=part)
        with catalogue_writer(pipeline), recorded_run(pipeline, dry_run=False, actor=actor, part=part) as rec:
            return rec.done(_plan_and_apply(pipeline, dry_run=False, items=items, actor=actor, part=part))


def _plan_and_apply(
    pipeline: Pipeline,
    *,
    dry_run: bool,
    items: list[str] | None,
    actor: str,
    part: tuple[int, int] | None = None,
) -> PipelineReport:
    logger = get_run_logger()
    settings = get_settings()
    clock = _Stopwatch()
    recovered = settle_in_flight(actor) if not dry_run else None
    clock.lap("recover")
    uploads = None
    if pipeline is Pipeline.EXPIRE and not dry_run and part is None:
        uploads = settle_abandoned_uploads(actor)
        clock.lap("uploads")
    # recovery changed nothing since `dlm run` planned: its plan is still this run's
    settled_nothing = (
        recovered is not None
        and not (recovered.completed or recovered.rolled_back or recovered.deleted or recovered.restored)
        and not (uploads and (uploads.aborted or uploads.finished or uploads.removed))
    )
    planned = take_planned(pipeline) if items is None and part is None and settled_nothing else None
    if planned is not None:
        logger.info("%s: applying the plan `dlm run` made moments ago", pipeline)
    plan: Plan = planned if planned is not None else plan_pipeline(pipeline, items, part)
    clock.lap("plan")
    names = storage_names()
    summary = PlanSummary.model_validate(plan.summary())
    logger.info("%s plan: %s", pipeline, summary.as_json())
    if dry_run:
        report = PipelineReport(
            pipeline=pipeline,
            dry_run=True,
            plan=summary,
            counters=dict(plan.counters),
            actions=plan_rows(plan, names),
            recovered=recovered,
            stages=clock.laps,
        )
        _publish(report)
        return report
    # quote(): Prefect would otherwise walk every action of a large plan or batch looking for
    # futures in the task's inputs
    before = settle_catalogue(quote(plan), actor, SettleStage.BEFORE)
    clock.lap("settle-before")
    t = settings.transfer
    copy_batches = batch_copies(plan.copies, max_files=t.batch_files, max_bytes=t.batch_bytes)
    copy_futures: list[Any] = []
    for i, b in enumerate(copy_batches):
        if i >= t.parallel_batches:  # at most parallel_batches at once, started in order
            copy_futures[i - t.parallel_batches].wait()
        copy_futures.append(
            copy_batch.submit(
                quote(b),
                (names.get(b.src_storage_id, "?"), names.get(b.dst_storage_id, "?")),
                actor,
                str(flow_run.get_id() or ""),
                t.transfers,
                t.checkers,
            )
        )
    results: list[BatchResult] = [f.result() for f in copy_futures]
    clock.lap("copy")
    # An item's copies go for its expiry only if the catalogue has it EXPIRED now: one EXPIRED
    # by an earlier, killed run still gets all its copies deleted, while one whose expiry was
    # cleared after the plan was made (a plan `dlm run` reused) keeps them all.
    due = {e.item_oid for e in plan.expires}
    due |= {d.item_oid for d in plan.deletes if d.reason == ITEM_EXPIRED}
    with session_scope() as s:
        expiring = expired_among(s, due)
    deletes = [d for d in plan.deletes if d.reason != ITEM_EXPIRED or d.item_oid in expiring]
    delete_batches = batch_deletes(deletes, max_files=t.batch_files, expiring=sorted(expiring))
    delete_futures = [
        delete_batch.submit(quote(b), names.get(b.storage_id, "?"), actor) for b in delete_batches
    ]
    results += [f.result() for f in delete_futures]
    clock.lap("delete")
    after = settle_catalogue(quote(plan), actor, SettleStage.AFTER)
    clock.lap("settle-after")
    with session_scope() as s:
        below = status(session=s).below_target
    clock.lap("status")
    report = PipelineReport(
        pipeline=pipeline,
        dry_run=False,
        plan=summary,
        counters=dict(plan.counters),
        batches=[r.row() for r in results],
        actions=plan_rows(plan, names),
        recovered=recovered,
        uploads=uploads,
        stages=clock.laps,
        settled=Settled(
            expired=before.expired,
            phase_changes=before.phase_changes,
            deleted_items=after.deleted_items,
            refusals=after.refusals,
            drained=after.drained,
        ),
        copied=sum(r.done for r in results if r.kind == "copy"),
        deleted=sum(r.done for r in results if r.kind == "delete"),
        failed=sum(r.failed for r in results),
        bytes_moved=sum(r.bytes for r in results if r.kind == "copy"),
        bytes_read_to_confirm=sum(r.read_bytes for r in results if r.kind == "delete"),
        below_target_after=below,
    )
    logger.info(
        "%s: copied %s (%s), deleted %s, failed %s, %s items still below target",
        pipeline,
        report.copied,
        format_size(report.bytes_moved),
        report.deleted,
        report.failed,
        below,
    )
    _publish(report)
    return report


def _publish(report: PipelineReport) -> None:
    """A table artifact of the actions (or batches) and a markdown summary."""
    key = _artifact_key(report.pipeline)
    rows = report.batches if not report.dry_run else report.actions
    if rows:
        create_table_artifact(
            [r.as_json() for r in rows], key=f"{key}-actions", description=f"{report.pipeline} actions"
        )
    create_markdown_artifact(
        summary_markdown(report), key=f"{key}-summary", description=f"{report.pipeline} summary"
    )


def summary_markdown(report: PipelineReport) -> str:
    """The run's summary in markdown, for its artifact."""
    p = report.plan
    lines = [
        f"# {report.pipeline}{' (dry run)' if report.dry_run else ''}",
        "",
        f"- planned: {p.copies} copies ({format_size(p.copy_bytes)}), {p.deletes} deletions, "
        f"{p.expired_items} item expiries, {p.phase_changes} phase changes",
        f"- refused by policy: {p.refusals}; shortfalls: {p.shortfalls}; deferred to a later run: "
        f"{p.deferred}",
    ]
    if not report.dry_run:
        lines += [
            f"- copied: {report.copied} ({format_size(report.bytes_moved)}); "
            f"deleted: {report.deleted}; "
            f"failures: {report.failed}",
            f"- items still below their target phase: {report.below_target_after}",
        ]
    return "\n".join(lines)


@flow(name="replicate", description=PIPELINES[Pipeline.REPLICATE].description, log_prints=True)
def replicate(
    dry_run: bool = False,
    items: list[str] | None = None,
    item: str | None = None,
    partitions: int = 1,
    partition: int | None = None,
    ready_since: str | None = None,
    window_s: float = 0,
) -> PipelineReport | PartitionedReport:
    """Add copies until each READY item meets its target phase (optionally only some items).

    `item` takes one oid or a Prefect resource id `dlm.item.<oid>`. `partitions` K > 1 fans the
    run out into K sub-runs of its deployment, one per `partition` (items by oid mod K), that
    workers run side by side (flows/partitions.py). `ready_since` and `window_s` (the event
    trigger's): plan only once the window of events [ready_since, +window_s) has closed.
    """
    wait_for_window(ready_since, window_s)
    chosen = list(items or [])
    if item:
        chosen.append(item.removeprefix("dlm.item."))
    check_partition(partitions, partition)
    if partitions > 1 and partition is None:
        return fan_out(
            Pipeline.REPLICATE,
            partitions,
            {"dry_run": dry_run, "items": chosen or None},
            lambda i: run_pipeline(
                Pipeline.REPLICATE, dry_run=dry_run, items=chosen or None, part=(partitions, i)
            ),
        )
    part = (partitions, partition) if partitions > 1 and partition is not None else None
    return run_pipeline(Pipeline.REPLICATE, dry_run=dry_run, items=chosen or None, part=part)


@flow(name="migrate", description=PIPELINES[Pipeline.MIGRATE].description, log_prints=True)
def migrate(dry_run: bool = False) -> PipelineReport:
    """Bring placement to what phases and aging rules ask; drop surplus copies once safe."""
    return run_pipeline(Pipeline.MIGRATE, dry_run=dry_run)


@flow(name="expire", description=PIPELINES[Pipeline.EXPIRE].description, log_prints=True)
def expire(dry_run: bool = False) -> PipelineReport:
    """Delete expired copies the policy can spare, and expired items (leaving tombstones)."""
    return run_pipeline(Pipeline.EXPIRE, dry_run=dry_run)


@flow(name="rebalance", description=PIPELINES[Pipeline.REBALANCE].description, log_prints=True)
def rebalance(dry_run: bool = False) -> PipelineReport:
    """Move copies off storages above high water or draining, to storages below low water."""
    return run_pipeline(Pipeline.REBALANCE, dry_run=dry_run)
