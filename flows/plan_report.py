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


def storage_names() -> dict[Any, str]:
    with session_scope() as s:
        return {sid: name for sid, name in s.execute(select(col(Storage.id), col(Storage.name)))}


def plan_rows(plan: Plan, names: dict[Any, str], limit: int = 200) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for c in plan.copies[:limit]:
        rows.append(
            {
                "action": "copy",
                "item": str(c.item_oid),
                "from": names.get(c.src_storage_id, "?"),
                "to": names.get(c.dst_storage_id, "?"),
                "path": c.dst_path,
                "bytes": c.size,
                "reason": c.reason,
            }
        )
    for d in plan.deletes[:limit]:
        rows.append(
            {
                "action": "delete",
                "item": str(d.item_oid),
                "from": names.get(d.storage_id, "?"),
                "to": "",
                "path": d.path,
                "bytes": d.size,
                "reason": d.reason,
            }
        )
    for e in plan.expires[:limit]:
        rows.append(
            {
                "action": "expire",
                "item": str(e.item_oid),
                "from": "",
                "to": "",
                "path": "",
                "bytes": 0,
                "reason": e.reason,
            }
        )
    for p in plan.phases[:limit]:
        rows.append(
            {
                "action": "set-phase",
                "item": str(p.item_oid),
                "from": "",
                "to": p.phase.value,
                "path": "",
                "bytes": 0,
                "reason": p.reason,
            }
        )
    for r in plan.refusals[:limit]:
        rows.append(
            {
                "action": "refused",
                "item": str(r.item_oid),
                "from": "",
                "to": "",
                "path": "",
                "bytes": 0,
                "reason": r.reason,
            }
        )
    for s in plan.shortfalls[:limit]:
        rows.append(
            {
                "action": "shortfall",
                "item": str(s.item_oid),
                "from": "",
                "to": "",
                "path": "",
                "bytes": 0,
                "reason": s.reason,
            }
        )
    for dr in plan.drained:
        rows.append(
            {
                "action": "drained",
                "item": "",
                "from": names.get(dr.storage_id, "?"),
                "to": "",
                "path": "",
                "bytes": 0,
                "reason": "no live copies left: the storage can be retired",
            }
        )
    return rows


def dry_run_report(pipeline: str) -> dict[str, Any]:
    """What `pipeline` would do now: the report a dry-run flow returns, built without Prefect."""
    with session_scope() as s:
        plan = make_plan(s, pipeline, only=None)
    return {
        "pipeline": pipeline,
        "dry_run": True,
        "plan": plan.summary(),
        "counters": dict(plan.counters),
        "batches": [],
        "actions": plan_rows(plan, storage_names()),
        "recovered": {},
        "stages": {},
    }
