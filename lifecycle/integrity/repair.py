"""Repair: plan fresh copies for corrupted or lost replicas from an intact one, and copy them in batches."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlmodel import Session, col

from lifecycle.apply.result import BatchResult
from lifecycle.apply.settle import (
    COPY_COLUMNS,
    Check,
    ReplicaChange,
    apply_replica_changes,
    no_other_live_copy,
    settle_items,
)
from lifecycle.catalogue import audit
from lifecycle.catalogue.models import Item, Replica, Storage, Transfer, utcnow
from lifecycle.catalogue.sql import SessionFactory, chunks, default_sessions
from lifecycle.errors import DLMError, StorageError
from lifecycle.integrity.verify import CHECKED_ITEMS, DAMAGED, READABLE
from lifecycle.planning.batching import cut
from lifecycle.states import (
    LIVE_REPLICA_STATES,
    EventKind,
    ReplicaState,
    TransferKind,
    TransferState,
)
from lifecycle.storage.backends import backend_for
from lifecycle.transfer.log import HASHES
from lifecycle.transfer.operations import copy_files, delete_files, hashsum

# --------------------------------------------------------------------------- repair


@dataclass(frozen=True, slots=True)
class Repair:
    """Copy an item's intact bytes over its damaged copy, at that copy's own path."""

    replica_uid: uuid.UUID
    item_oid: uuid.UUID
    path: str  # the same on the source and the destination
    size: int
    checksum: str
    algo: str
    state: ReplicaState  # CORRUPTED or LOST


@dataclass(frozen=True)
class RepairBatch:
    src_storage_id: uuid.UUID
    dst_storage_id: uuid.UUID
    repairs: tuple[Repair, ...]

    @property
    def bytes(self) -> int:
        return sum(r.size for r in self.repairs)


def plan_repairs(
    session: Session, replica_uids: Iterable[uuid.UUID], *, max_files: int, max_bytes: int
) -> tuple[list[RepairBatch], dict[uuid.UUID, str]]:
    """Repair batches for damaged (CORRUPTED or LOST) copies of live items on online or
    draining storages, each from a READY copy on another online or draining storage at the
    same path; and, for the copies that cannot be repaired now, why (uid -> reason)."""
    uids = sorted(set(replica_uids))
    rows: list[Any] = []
    for chunk in chunks(uids):
        rows += session.execute(
            select(*COPY_COLUMNS)
            .join(Item, col(Item.oid) == col(Replica.item_oid))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(
                col(Replica.uid).in_(chunk),
                col(Replica.state).in_(DAMAGED),
                (col(Replica.state) != ReplicaState.LOST.value) | no_other_live_copy(),
                col(Item.state).in_(CHECKED_ITEMS),
                col(Item.checksum).is_not(None),
                col(Storage.state).in_(READABLE),
            )
        ).all()
    skipped: dict[uuid.UUID, str] = {u: "no longer damaged, or its item or storage is not live" for u in uids}
    sources: dict[uuid.UUID, list[tuple[uuid.UUID, str, str]]] = defaultdict(list)
    oids = sorted({r[1] for r in rows})
    for chunk in chunks(oids):
        for oid, sid, path, name in session.execute(
            select(col(Replica.item_oid), col(Replica.storage_id), col(Replica.path), col(Storage.name))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(
                col(Replica.item_oid).in_(chunk),
                col(Replica.state) == ReplicaState.READY.value,
                col(Storage.state).in_(READABLE),
            )
            .order_by(col(Storage.name))
        ):
            sources[oid].append((sid, path, name))
    planned: dict[Repair, tuple[uuid.UUID, uuid.UUID]] = {}  # -> (source, destination storage)
    for uid, oid, sid, path, state, size, checksum, algo in rows:
        algo = algo or "md5"
        others = [src for src in sources[oid] if src[0] != sid]
        same_path = [src for src in others if src[1] == path]
        if algo not in HASHES:
            skipped[uid] = f"rclone cannot verify {algo} checksums"
        elif not others:
            skipped[uid] = "no intact copy on another online storage"
        elif not same_path:
            skipped[uid] = "no intact copy at the same path (replicate will add a new copy)"
        else:
            skipped.pop(uid)
            repair = Repair(uid, oid, path, int(size), checksum, algo, ReplicaState(state))
            planned[repair] = (same_path[0][0], sid)
    cuts = cut(planned, key=planned.__getitem__, max_files=max_files, max_bytes=max_bytes)
    return [RepairBatch(src, dst, group) for (src, dst), group in cuts], skipped


def repair_batch(
    batch: RepairBatch,
    *,
    sessions: SessionFactory = default_sessions,
    actor: str = "dlm",
    run_id: str | None = None,
    transfers: int = 8,
    checkers: int = 8,
) -> BatchResult:
    """Repair one batch: delete the corrupt objects, copy the intact bytes from the source
    storage (ONE rclone process), read them back (`hashsum --download`), and mark the copies
    that now hold the item's bytes READY (`replica.repaired`). Failures leave the copy as it
    was (`replica.repair_failed`). The source is only read.

    Raises DLMError if the source and the destination are the same storage; TransientError
    when the catalogue cannot be reached.
    """
    if batch.src_storage_id == batch.dst_storage_id:
        raise DLMError("a repair must copy from another storage")
    want = {r.replica_uid: r for r in batch.repairs}
    with sessions() as s:
        src = s.get_one(Storage, batch.src_storage_id)
        dst = s.get_one(Storage, batch.dst_storage_id)
        still = set()
        for chunk in chunks(list(want)):
            still |= {
                r[0]
                for r in s.execute(
                    select(col(Replica.uid), col(Replica.state)).where(col(Replica.uid).in_(chunk))
                )
                if r[1] == want[r[0]].state.value
            }
        intact_src = set()
        for chunk in chunks(sorted({r.item_oid for r in batch.repairs})):
            intact_src |= set(
                s.execute(
                    select(col(Replica.item_oid)).where(
                        col(Replica.item_oid).in_(chunk),
                        col(Replica.storage_id) == batch.src_storage_id,
                        col(Replica.state) == ReplicaState.READY.value,
                    )
                ).scalars()
            )
        # A LOST copy's path that another item's live copy holds now is not repaired over it.
        lost_paths = sorted({r.path for r in batch.repairs if r.state == ReplicaState.LOST})
        held: dict[str, uuid.UUID] = {}
        for chunk in chunks(lost_paths):
            held.update(
                (str(path), oid)
                for path, oid in s.execute(
                    select(col(Replica.path), col(Replica.item_oid)).where(
                        col(Replica.storage_id) == batch.dst_storage_id,
                        col(Replica.path).in_(chunk),
                        col(Replica.state).in_(LIVE_REPLICA_STATES),
                    )
                ).all()
            )
    todo = [
        r
        for r in batch.repairs
        if r.replica_uid in still and r.item_oid in intact_src and held.get(r.path, r.item_oid) == r.item_oid
    ]
    result = BatchResult("repair", src.name, dst.name, planned=len(batch.repairs))
    result.skipped = len(batch.repairs) - len(todo)
    if not todo:
        return result
    started = time.monotonic()
    src_target = backend_for(src).rclone_target()
    dst_target = backend_for(dst).rclone_target()
    if (src_target.spec.rstrip("/"), dict(src_target.env)) == (
        dst_target.spec.rstrip("/"),
        dict(dst_target.env),
    ):
        raise DLMError(f"storages {src.name!r} and {dst.name!r} are the same place: no repair")
    failed: dict[str, str] = {}
    corrupt = [r.path for r in todo if r.state == ReplicaState.CORRUPTED]
    if corrupt:
        gone = delete_files(dst_target, corrupt, checkers=checkers)
        failed.update({p: f"could not remove the corrupt copy: {e}" for p, e in gone.failed.items()})
    paths = [r.path for r in todo if r.path not in failed]
    sizes = {r.path: r.size for r in todo}
    report = copy_files(
        src_target,
        dst_target,
        paths,
        transfers=transfers,
        checkers=checkers,
        nbytes=sum(sizes[p] for p in paths),
    )
    failed.update(report.failed)
    for p in paths:
        if p not in report.ok and p not in failed:
            failed[p] = "rclone did not report this file"
    by_algo: dict[str, list[Repair]] = defaultdict(list)
    for r in todo:
        if r.path not in failed:
            by_algo[r.algo].append(r)
    bad_copies: list[str] = []
    for algo, group in by_algo.items():
        try:
            got = hashsum(
                dst_target, [r.path for r in group], algo, download=True, nbytes=sum(r.size for r in group)
            )
        except StorageError as exc:
            failed.update({r.path: f"cannot read back the repaired copy: {exc}" for r in group})
            continue
        for r in group:
            value = got.get(r.path)
            if value is None:
                failed[r.path] = "repaired copy not found at the destination"
            elif value.lower() != r.checksum.lower():
                failed[r.path] = f"repaired copy does not match ({algo} {value} != catalogue {r.checksum})"
                if r.state == ReplicaState.LOST:
                    bad_copies.append(r.path)
    if bad_copies:  # a LOST copy stays truthfully absent rather than wrongly present
        delete_files(dst_target, bad_copies, checkers=checkers)
    duration = time.monotonic() - started
    good = [r for r in todo if r.path not in failed]
    bad = [r for r in todo if r.path in failed]
    now = utcnow()
    with sessions() as s:
        changes = [
            ReplicaChange(
                Check(
                    r.replica_uid,
                    r.item_oid,
                    batch.dst_storage_id,
                    r.path,
                    r.size,
                    r.checksum,
                    r.algo,
                    r.state,
                ),
                ReplicaState.READY,
                EventKind.REPLICA_REPAIRED,
                {
                    "storage": dst.name,
                    "path": r.path,
                    "from": src.name,
                    "was": r.state.value,
                    "how": "copied from an intact copy",
                },
                r.size if r.state == ReplicaState.LOST else 0,
            )
            for r in good
        ]
        applied = {
            ch.check.replica_uid
            for ch in apply_replica_changes(s, changes, storage_id=batch.dst_storage_id, actor=actor, now=now)
        }
        for r in good:
            if r.replica_uid not in applied:
                failed[r.path] = "the copy changed state during the repair (another run took its place)"
        good = [r for r in good if r.replica_uid in applied]
        bad = [r for r in todo if r.path in failed]
        transfers_rows = [
            {
                "id": uuid.uuid4(),
                "item_oid": r.item_oid,
                "replica_uid": r.replica_uid,
                "kind": TransferKind.COPY.value,
                "src_storage_id": batch.src_storage_id,
                "dst_storage_id": batch.dst_storage_id,
                "state": (TransferState.FAILED if r.path in failed else TransferState.DONE).value,
                "bytes": r.size,
                "duration_s": duration,
                "attempts": 1,
                "error": failed[r.path][:1000] if r.path in failed else None,
                "flow_run_id": run_id,
                "started_at": now,
                "finished_at": now,
            }
            for r in todo
        ]
        s.execute(insert(Transfer), transfers_rows)
        audit.record_many(
            s,
            [
                {
                    "kind": EventKind.REPLICA_REPAIR_FAILED,
                    "item_oid": r.item_oid,
                    "replica_uid": r.replica_uid,
                    "storage_id": batch.dst_storage_id,
                    "actor": actor,
                    "details": {
                        "from": src.name,
                        "to": dst.name,
                        "path": r.path,
                        "error": failed[r.path][:500],
                    },
                }
                for r in bad
            ],
        )
        settle_items(s, {r.item_oid for r in good}, actor=actor)
    result.done = len(good)
    result.failed = len(bad)
    result.bytes = sum(r.size for r in good)
    result.duration_s = duration
    result.errors = {r.path: failed[r.path] for r in bad}
    return result
