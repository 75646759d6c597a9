"""Crash recovery: settles the in-flight rows (PENDING, COPYING, DELETING) that a dead run left.

A row is dead when the process that claimed it (`claimed_by` = host:pid) is gone from this
host, or when it has not moved for `stale_after` (a run on another host that died). Each
dead row is settled against what the storage really holds, with one rclone call per storage:

- PENDING/COPYING: the copy is at the destination with the item's checksum -> READY (the
  work was done); otherwise the claim is removed (and its transfer FAILED) so the catalogue
  never claims a copy that is not there; a partial object left behind is deleted.
- DELETING: the object is gone -> DELETED; it is still there -> back to READY (the next
  planning run decides again), unless the item itself expired, in which case it is deleted.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlmodel import Session, col

from lifecycle import audit, rclone
from lifecycle.errors import DLMError
from lifecycle.models import Item, Replica, Storage, Transfer, utcnow
from lifecycle.states import ItemState, ReplicaState, StorageState, TransferState
from lifecycle.storage import backend_for

IN_FLIGHT = (ReplicaState.PENDING.value, ReplicaState.COPYING.value, ReplicaState.DELETING.value)


@dataclass
class RecoveryReport:
    completed: int = 0  # copies found intact: READY
    rolled_back: int = 0  # claims removed
    deleted: int = 0  # DELETING rows whose object is gone
    restored: int = 0  # DELETING rows back to READY
    skipped_live: int = 0  # rows held by a live process
    errors: dict[str, str] = field(default_factory=dict)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_is_dead(claimed_by: str | None, *, stale: bool) -> bool:
    """Whether the process that holds a row is gone: same host and no such pid, or stale."""
    if stale:
        return True
    if not claimed_by:
        return False
    host, _, pid = claimed_by.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not _pid_alive(int(pid))


def settle_in_flight(session: Session, *, stale_after: timedelta, actor: str = "dlm") -> RecoveryReport:
    """Settle every dead in-flight row (see the module docstring). Storage errors are reported
    per storage and leave its rows for the next run. Raises TransientError (catalogue)."""
    report = RecoveryReport()
    cutoff = utcnow() - stale_after
    rows = session.execute(
        select(
            col(Replica.uid),
            col(Replica.item_oid),
            col(Replica.storage_id),
            col(Replica.path),
            col(Replica.state),
            col(Replica.claimed_by),
            col(Replica.updated_at),
            col(Item.checksum),
            col(Item.checksum_algo),
            col(Item.state),
            col(Item.size),
        )
        .join(Item, col(Item.oid) == col(Replica.item_oid))
        .where(col(Replica.state).in_(IN_FLIGHT))
    ).all()
    dead = [r for r in rows if claim_is_dead(r[5], stale=r[6] < cutoff)]
    report.skipped_live = len(rows) - len(dead)
    by_storage: dict[uuid.UUID, list[Any]] = defaultdict(list)
    for r in dead:
        by_storage[r[2]].append(r)
    events: list[dict[str, Any]] = []
    now = utcnow()
    for storage_id, group in by_storage.items():
        storage = session.get_one(Storage, storage_id)
        if storage.state in (StorageState.OFFLINE, StorageState.RETIRED):
            continue
        target = backend_for(storage).rclone_target()
        try:
            present: dict[str, str] = {}
            by_algo: dict[str, list[str]] = defaultdict(list)
            for r in group:
                by_algo[r[8] or "md5"].append(r[3])
            for algo, paths in by_algo.items():
                present.update(rclone.hashsum(target, paths, algo if algo in rclone.HASHES else "md5"))
        except DLMError as exc:
            report.errors[storage.name] = str(exc)
            continue
        copies = [r for r in group if r[4] != ReplicaState.DELETING.value]
        deletes = [r for r in group if r[4] == ReplicaState.DELETING.value]
        good = [r for r in copies if (present.get(r[3]) or "").lower() == (r[7] or "").lower() and r[7]]
        bad = [r for r in copies if r not in good]
        partial = [r[3] for r in bad if r[3] in present]
        if partial:
            rclone.delete_files(target, partial)
        if good:
            session.execute(
                update(Replica)
                .where(col(Replica.uid).in_([r[0] for r in good]))
                .values(state=ReplicaState.READY.value, verified_at=now, updated_at=now, claimed_by=None)
            )
            session.execute(
                update(Storage)
                .where(col(Storage.id) == storage_id)
                .values(used_bytes=col(Storage.used_bytes) + sum(int(r[10]) for r in good))
            )
        if bad:
            session.execute(delete(Replica).where(col(Replica.uid).in_([r[0] for r in bad])))
        uids = [r[0] for r in copies]
        if uids:
            for r in copies:
                ok = r in good
                session.execute(
                    update(Transfer)
                    .where(
                        col(Transfer.replica_uid) == r[0],
                        col(Transfer.state).in_([TransferState.RUNNING.value, TransferState.PENDING.value]),
                    )
                    .values(
                        state=TransferState.DONE.value if ok else TransferState.FAILED.value,
                        error=None if ok else "the run died before the copy was complete; rolled back",
                        finished_at=now,
                        replica_uid=r[0] if ok else None,
                    )
                )
        for r in good:
            events.append(_event("replica.created", r, storage_id, actor, {"recovered": True, "path": r[3]}))
        for r in bad:
            events.append(
                _event(
                    "transfer.failed", r, storage_id, actor, {"recovered": True, "error": "run died mid-copy"}
                )
            )
        gone = [r for r in deletes if r[3] not in present]
        still = [r for r in deletes if r[3] in present]
        expired = [r for r in still if r[9] in (ItemState.EXPIRED.value, ItemState.DELETED.value)]
        if expired:
            res = rclone.delete_files(target, [r[3] for r in expired])
            gone += [r for r in expired if r[3] in res.ok]
        restore = [r for r in still if r not in gone]
        if gone:
            session.execute(
                update(Replica)
                .where(col(Replica.uid).in_([r[0] for r in gone]))
                .values(state=ReplicaState.DELETED.value, updated_at=now, claimed_by=None)
            )
            session.execute(
                update(Storage)
                .where(col(Storage.id) == storage_id)
                .values(used_bytes=col(Storage.used_bytes) - sum(int(r[10]) for r in gone))
            )
            events += [_event("replica.deleted", r, storage_id, actor, {"recovered": True}) for r in gone]
        if restore:
            session.execute(
                update(Replica)
                .where(col(Replica.uid).in_([r[0] for r in restore]))
                .values(state=ReplicaState.READY.value, updated_at=now, claimed_by=None)
            )
            events += [_event("replica.restored", r, storage_id, actor, {"recovered": True}) for r in restore]
        report.completed += len(good)
        report.rolled_back += len(bad)
        report.deleted += len(gone)
        report.restored += len(restore)
    # transfers whose run died before it claimed anything, or long gone
    session.execute(
        update(Transfer)
        .where(
            col(Transfer.state) == TransferState.RUNNING.value,
            or_(col(Transfer.replica_uid).is_(None), col(Transfer.started_at) < cutoff),
            col(Transfer.started_at) < cutoff,
        )
        .values(state=TransferState.FAILED.value, error="abandoned by a run that died", finished_at=now)
    )
    audit.record_many(session, events)
    return report


def _event(kind: str, row: Any, storage_id: uuid.UUID, actor: str, details: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": kind,
        "item_oid": row[1],
        "replica_uid": row[0],
        "storage_id": storage_id,
        "actor": actor,
        "details": details,
    }
