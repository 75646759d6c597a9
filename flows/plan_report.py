"""A pipeline's plan as rows and as a dry-run report, without Prefect.

`dlm run PIPELINE --dry-run` calls `dry_run_report` directly: a dry run changes nothing and
publishes nothing, so it need not import Prefect (about half of what a run costs) nor start a
flow run; the flows build their reports from the same rows.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlmodel import col

from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Storage
from lifecycle.planning.pipelines import make_plan
from lifecycle.planning.plan import Plan
from lifecycle.reports import ActionRow, PipelineReport, PlannedAction, PlanSummary
from lifecycle.runs import Pipeline, parse_pipeline


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
