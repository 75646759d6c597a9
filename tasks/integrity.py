"""The tasks of the integrity flows: select and verify copies, repair them, reconcile a storage.

Each task wraps one lifecycle call on one batch (one rclone process, or one streamed listing),
retries only on TransientError, and never caches.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from lifecycle.apply.result import BatchResult
from lifecycle.catalogue.db import session_scope
from lifecycle.integrity import reconcile, repair, verify
from tasks.common import dlm_task


@dlm_task("select-replicas", retry_delay_seconds=2)
def select_replicas(
    budget_bytes: int,
    storages: Sequence[str] | None,
    max_files: int,
    max_bytes: int,
    part: tuple[int, int] | None = None,
) -> tuple[verify.Selection, list[verify.VerifyBatch]]:
    """The copies to verify in this run (oldest verified first, within the budget), in batches;
    with `part` (partitions, partition), only those of that partition's items."""
    with session_scope() as s:
        selection = verify.select_checks(s, budget_bytes=budget_bytes, storages=storages, part=part)
    return selection, verify.batch_checks(selection.checks, max_files=max_files, max_bytes=max_bytes)


@dlm_task("verify-replicas", task_run_name="verify-on-{name}")
def verify_replicas(batch: verify.VerifyBatch, name: str, actor: str) -> verify.VerifyResult:
    """One batch, one `rclone hashsum`: compare, then settle matches, corruptions and losses."""
    return verify.verify_batch(batch, actor=actor)


@dlm_task("plan-repairs", retry_delay_seconds=2)
def plan_repairs(
    replica_uids: Sequence[uuid.UUID], max_files: int, max_bytes: int
) -> tuple[list[repair.RepairBatch], dict[uuid.UUID, str]]:
    """Repair batches (by source and destination storage) for damaged copies, and the rest with why."""
    with session_scope() as s:
        return repair.plan_repairs(s, replica_uids, max_files=max_files, max_bytes=max_bytes)


@dlm_task("repair-replicas", task_run_name="repair-{names[0]}-to-{names[1]}")
def repair_replicas(
    batch: repair.RepairBatch,
    names: tuple[str, str],
    actor: str,
    run_id: str | None,
    transfers: int,
    checkers: int,
) -> BatchResult:
    """One repair batch: intact bytes copied over damaged copies (one rclone process), read back."""
    return repair.repair_batch(batch, actor=actor, run_id=run_id, transfers=transfers, checkers=checkers)


@dlm_task("reconcile-storage", task_run_name="reconcile-{name}")
def reconcile_storage(name: str, actor: str, adopt: bool, dry_run: bool) -> reconcile.ReconcileResult:
    """List one storage (one streamed rclone lsjson) against the catalogue; adopt if asked."""
    return reconcile.reconcile_storage(name, actor=actor, adopt=adopt, dry_run=dry_run)
