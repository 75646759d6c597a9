"""A pipeline's plan as rows, as a dry-run report and as the report of a run with nothing to
do, without Prefect.

`dlm run PIPELINE --dry-run` calls `dry_run_report` directly: a dry run changes nothing and
publishes nothing, so it need not import Prefect (about half of what a run costs) nor start a
flow run; the flows build their reports from the same rows. `dlm run PIPELINE` first calls
`idle_report`: when recovery, the plan and the catalogue's settling all have nothing to do,
that is the run's report and no flow run starts (a steady-state run costs what a dry run
does); otherwise the flow runs and does it all again, under the catalogue's writer lock, but
for the plan just made (`take_planned`).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlmodel import col

from lifecycle.apply.records import expired_to_finish
from lifecycle.catalogue.catalog import status
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Storage
from lifecycle.integrity.abandoned import any_abandoned_uploads
from lifecycle.integrity.recovery import remove_dead_temp_files, rows_in_flight
from lifecycle.planning.pipelines import make_plan
from lifecycle.planning.plan import Plan
from lifecycle.reports import (
    AbandonedUploads,
    ActionRow,
    PipelineReport,
    PlannedAction,
    PlanSummary,
    Recovered,
    Settled,
)
from lifecycle.runs import Pipeline, parse_pipeline
from lifecycle.settings import get_settings
from tasks.orphans import dead_records


def storage_names() -> dict[Any, str]:
    with session_scope() as s:
        return {sid: name for sid, name in s.execute(select(col(Storage.id), col(Storage.name)))}


def plan_rows(plan: Plan, names: dict[Any, str], limit: int = 200) -> list[ActionRow]:
    """The plan's actions as rows (the first `limit` of each kind), storages by name."""
    rows = [
        ActionRow(
            action=PlannedAction.COPY,
            item=str(c.item_oid),
            from_=names.get(c.src_storage_id, "?"),
            to=names.get(c.dst_storage_id, "?"),
            path=c.dst_path,
            bytes=c.size,
            reason=c.reason,
        )
        for c in plan.copies[:limit]
    ]
    rows += [
        ActionRow(
            action=PlannedAction.DELETE,
            item=str(d.item_oid),
            from_=names.get(d.storage_id, "?"),
            path=d.path,
            bytes=d.size,
            reason=d.reason,
        )
        for d in plan.deletes[:limit]
    ]
    rows += [
        ActionRow(action=PlannedAction.EXPIRE, item=str(e.item_oid), reason=e.reason)
        for e in plan.expires[:limit]
    ]
    rows += [
        ActionRow(action=PlannedAction.SET_PHASE, item=str(p.item_oid), to=p.phase.value, reason=p.reason)
        for p in plan.phases[:limit]
    ]
    rows += [
        ActionRow(action=PlannedAction.REFUSED, item=str(r.item_oid), reason=r.reason)
        for r in plan.refusals[:limit]
    ]
    rows += [
        ActionRow(action=PlannedAction.SHORTFALL, item=str(s.item_oid), reason=s.reason)
        for s in plan.shortfalls[:limit]
    ]
    rows += [
        ActionRow(
            action=PlannedAction.DRAINED,
            from_=names.get(dr.storage_id, "?"),
            reason="no live copies left: the storage can be retired",
        )
        for dr in plan.drained
    ]
    return rows


def dry_run_report(pipeline: Pipeline | str) -> PipelineReport:
    """What `pipeline` would do now: the report a dry-run flow returns, built without Prefect."""
    with session_scope() as s:
        plan = make_plan(s, pipeline, only=None)
    return PipelineReport(
        pipeline=parse_pipeline(pipeline),
        dry_run=True,
        plan=PlanSummary.model_validate(plan.summary()),
        counters=dict(plan.counters),
        actions=plan_rows(plan, storage_names()),
    )


# The plan idle_report made and found work in, for the flow run `dlm run` then starts in the same
# process (flows.pipelines): planning again a second later would find the same. Taken once, and
# only while fresh: a run that first waited for the catalogue's writer lock plans again. (Any
# plan may be stale by the time it is applied: every batch re-checks what it acts on.)
_planned: dict[Pipeline, tuple[float, Plan]] = {}
PLAN_REUSE_S = 10.0


def take_planned(pipeline: Pipeline) -> Plan | None:
    """The whole-catalogue plan idle_report made for `pipeline` in this process less than
    PLAN_REUSE_S ago, once; else None."""
    made = _planned.pop(pipeline, None)
    if made is None or time.monotonic() - made[0] > PLAN_REUSE_S:
        return None
    return made[1]


def drop_planned() -> None:
    """Forget any plan idle_report kept (once the run that was to use it has ended)."""
    _planned.clear()


def idle_report(pipeline: Pipeline | str, *, keep_plan: bool = False) -> PipelineReport | None:
    """The report of a run of `pipeline` that has nothing to do, or None when it has something:
    a run killed on this host to clean up after (tasks/orphans.py), a row in flight or a dead
    run's temporary file (recovery), an action in the plan (a shortfall is only reported), or
    an expired item to tombstone. Reads only; the cheap
    checks come first, the walk of posix storages for temporary files last. With `keep_plan`
    (`dlm run`, which starts the flow next), a plan with work in it is kept for take_planned."""
    chosen = parse_pipeline(pipeline)
    stale_after = timedelta(seconds=get_settings().transfer.stale_after_s)
    laps: dict[str, float] = {}
    started = time.monotonic()
    if dead_records():  # a run killed on this host: the flow cleans up after it first
        return None
    with session_scope() as s:
        if rows_in_flight(s, stale_after=stale_after) or expired_to_finish(s):
            return None
        if chosen is Pipeline.EXPIRE and any_abandoned_uploads(s, timeout=get_settings().upload.timeout):
            return None
        recover_s = time.monotonic() - started
        plan = make_plan(s, chosen, only=None)
        laps["plan"] = round(time.monotonic() - started - recover_s, 3)
        if not plan.empty:
            if keep_plan:  # the flow this process starts next applies it
                _planned[chosen] = (time.monotonic(), plan)
            return None
        mark = time.monotonic()
        temp = remove_dead_temp_files(s, stale_after=stale_after, dry_run=True)
        if temp.temp_removed or temp.errors:
            return None
        laps = {"recover": round(recover_s + time.monotonic() - mark, 3), **laps}
        mark = time.monotonic()
        below = status(session=s).below_target
        laps["status"] = round(time.monotonic() - mark, 3)
    return PipelineReport(
        pipeline=chosen,
        dry_run=False,
        plan=PlanSummary.model_validate(plan.summary()),
        counters=dict(plan.counters),
        actions=plan_rows(plan, storage_names()),
        recovered=Recovered(temp_kept_live=temp.temp_kept_live),
        # as the flow's: an expire run settles unfinished uploads (none were due)
        uploads=AbandonedUploads() if chosen is Pipeline.EXPIRE else None,
        stages=laps,
        settled=Settled(),
        copied=0,
        deleted=0,
        failed=0,
        bytes_moved=0,
        bytes_read_to_confirm=0,
        below_target_after=below,
        nothing_to_do=True,
    )
