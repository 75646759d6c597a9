"""The tasks of the lifecycle flows: plan, copy a batch, delete a batch, settle the catalogue.

Each task wraps one lifecycle call on one batch (one rclone process), retries only on
TransientError, and never caches (its inputs are large and its effects are not pure).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import timedelta

from lifecycle.apply.copy import apply_copy_batch
from lifecycle.apply.delete import apply_delete_batch
from lifecycle.apply.records import SettleStage, settle_plan
from lifecycle.apply.result import BatchResult
from lifecycle.catalogue.db import session_scope
from lifecycle.integrity.abandoned import settle_abandoned_uploads as settle_uploads
from lifecycle.integrity.recovery import settle_in_flight as settle
from lifecycle.planning.partition import partition_plan
from lifecycle.planning.pipelines import make_plan, policy_from
from lifecycle.planning.plan import CopyBatch, DeleteBatch, Plan
from lifecycle.reports import AbandonedUploads, Recovered, Settled
from lifecycle.runs import Pipeline
from lifecycle.settings import get_settings
from lifecycle.states import TransferKind
from tasks.common import dlm_task
from tasks.slots import storage_slots


@dlm_task("settle-in-flight", retry_delay_seconds=2)
def settle_in_flight(actor: str) -> Recovered:
    """Settle the rows a dead run left in flight, before planning (crash recovery)."""
    with session_scope() as s:
        rep = settle(s, stale_after=timedelta(seconds=get_settings().transfer.stale_after_s), actor=actor)
    return Recovered.model_validate(vars(rep))


@dlm_task("settle-abandoned-uploads", retry_delay_seconds=2)
def settle_abandoned_uploads(actor: str) -> AbandonedUploads:
    """Finish or abort the API uploads nobody finished within DLM_UPLOAD__TIMEOUT (expire)."""
    with session_scope() as s:
        rep = settle_uploads(s, timeout=get_settings().upload.timeout, actor=actor)
    return AbandonedUploads.model_validate(vars(rep))


@dlm_task("plan", task_run_name="plan-{pipeline}", retry_delay_seconds=2)
def plan_pipeline(
    pipeline: Pipeline, only: Sequence[str] | None = None, part: tuple[int, int] | None = None
) -> Plan:
    """Read the catalogue and plan the pipeline (changes nothing); with `part` (partitions,
    partition), only the actions of that partition's items."""
    oids = [uuid.UUID(o) for o in only] if only else None
    with session_scope() as s:
        plan = make_plan(s, pipeline, only=oids)
    return partition_plan(plan, *part) if part else plan


@dlm_task("copy-batch", task_run_name="copy-{names[0]}-to-{names[1]}")
def copy_batch(
    batch: CopyBatch,
    names: tuple[str, str],
    actor: str,
    run_id: str | None,
    transfers: int,
    checkers: int,
    kind: str = TransferKind.COPY.value,
) -> BatchResult:
    """One batch, one rclone process: claim, copy, verify, settle (holding a slot of both
    storages' limits, tasks/slots.py)."""
    asked = time.monotonic()
    with storage_slots(names):
        waited = time.monotonic() - asked
        result = apply_copy_batch(
            batch, actor=actor, run_id=run_id, transfers=transfers, checkers=checkers, kind=TransferKind(kind)
        )
    result.stages = {"slots": waited, **result.stages}
    return result


@dlm_task("delete-batch", task_run_name="delete-on-{name}")
def delete_batch(batch: DeleteBatch, name: str, actor: str) -> BatchResult:
    """One batch of deletions on one storage, one rclone process, re-checked against policy
    (holding a slot of the storage's limit, tasks/slots.py)."""
    with storage_slots([name]):
        return apply_delete_batch(batch, policy=policy_from(), actor=actor)


@dlm_task("settle-catalogue", retry_delay_seconds=2)
def settle_catalogue(plan: Plan, actor: str, stage: SettleStage) -> Settled:
    """Catalogue-only actions: expiries and phase changes before the batches (BEFORE);
    tombstones, refusals and drained storages after them (AFTER)."""
    with session_scope() as s:
        return settle_plan(plan, stage, session=s, actor=actor)
