"""Verify: re-read copies, oldest-verified first within a byte budget; repair damaged ones.

A verify batch is the copies of one storage that share a checksum algorithm: ONE
`rclone hashsum ALGO --download` recomputes their checksums from the bytes (a storage row
with `trust_stored_checksums` whose native hash is that algorithm, e.g. MD5 of single-part S3
ETags, is asked for its stored hashes instead). Outcomes are settled in bulk, each guarded by
the state the copy had when it was read:

- match: `verified_at` = now; a CORRUPTED or LOST copy found intact again is READY again
  (`replica.repaired`), and so is its item if it was CORRUPTED (`item.repaired`);
- mismatch: the copy is CORRUPTED (`replica.corrupted`);
- missing (confirmed by a listing, never inferred from a failed read): LOST (`replica.lost`);
  so is a copy whose path on a local storage is, or goes through, a symbolic link (never
  read through: the bytes there are not the copy DLM wrote);
- an item left with no READY copy is CORRUPTED (`item.corrupted`); it never counts as intact.

A repair batch (one source and one destination storage) copies the item's bytes from an
intact READY copy on another storage over the damaged copy, at the damaged copy's own path,
with ONE rclone process (the corrupt object is deleted first so no size-only comparison can
keep it), reads the result back with `hashsum --download`, and only then marks it READY.
The source is only ever read.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlmodel import Session, col

from lifecycle.apply.confirm import native_hashes
from lifecycle.apply.settle import (
    COPY_COLUMNS,
    Check,
    ReplicaChange,
    apply_replica_changes,
    check_of,
    no_other_live_copy,
    settle_items,
)
from lifecycle.catalogue.models import Item, Replica, Storage, utcnow
from lifecycle.catalogue.sql import SessionFactory, chunks, default_sessions
from lifecycle.catalogue.storages import get_storage
from lifecycle.errors import StorageError
from lifecycle.planning.batching import cut
from lifecycle.planning.partition import check_partition, in_partition
from lifecycle.reports import VerifyBatchRow
from lifecycle.settings import Settings, get_settings
from lifecycle.states import (
    EventKind,
    ItemState,
    ReplicaState,
    StorageState,
)
from lifecycle.storage import identity
from lifecycle.storage.backends import backend_for
from lifecycle.transfer.listing import list_files
from lifecycle.transfer.log import HASHES
from lifecycle.transfer.operations import hashsum, refused_paths

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "Check",
    "ReplicaChange",
    "Selection",
    "VerifyBatch",
    "VerifyResult",
    "apply_replica_changes",
    "batch_checks",
    "default_budget_bytes",
    "list_files",
    "native_hashes",
    "select_checks",
    "settle_items",
    "verify_batch",
]

# Bytes one verify run reads when neither the caller nor DLM_VERIFY__BUDGET_BYTES says.
DEFAULT_BUDGET_BYTES = 100 * 1024**3
READABLE = (StorageState.ONLINE.value, StorageState.DRAINING.value)
DAMAGED = (ReplicaState.CORRUPTED.value, ReplicaState.LOST.value)
CHECKED_ITEMS = (ItemState.READY.value, ItemState.CORRUPTED.value)


def default_budget_bytes(settings: Settings | None = None) -> int:
    """The verify budget: `settings.verify.budget_bytes` where the settings have that section,
    else DEFAULT_BUDGET_BYTES."""
    section = getattr(settings or get_settings(), "verify", None)
    value = getattr(section, "budget_bytes", None)
    return value if isinstance(value, int) and value > 0 else DEFAULT_BUDGET_BYTES


@dataclass(frozen=True)
class VerifyBatch:
    """Copies on one storage with one checksum algorithm: one rclone process."""

    storage_id: uuid.UUID
    algo: str
    checks: tuple[Check, ...]

    @property
    def bytes(self) -> int:
        return sum(c.size for c in self.checks if c.state != ReplicaState.LOST)


@dataclass
class Selection:
    """The copies one run reads, oldest `verified_at` first, and why it stopped."""

    checks: list[Check] = field(default_factory=list)
    storage_ids: dict[uuid.UUID, str] = field(default_factory=dict)
    bytes: int = 0
    budget_bytes: int = 0
    budget_reached: bool = False
    unsupported: int = 0  # algorithms rclone cannot compute (e.g. blake2b)


def select_checks(
    session: Session,
    *,
    budget_bytes: int,
    storages: Sequence[str] | None = None,
    limit: int | None = None,
    part: tuple[int, int] | None = None,
) -> Selection:
    """The copies to verify now: READY, CORRUPTED and (when nothing took their place) LOST
    copies of READY or CORRUPTED items with a checksum, on online or draining storages,
    oldest `verified_at` first (never verified first), until the next one would exceed
    `budget_bytes` (the first always goes) or `limit` copies. LOST copies cost no budget.
    With `part` (partitions, partition), only the copies of the items in that partition
    (lifecycle.planning.partition): every copy of an item falls in one partition.

    Raises StorageNotFoundError for an unknown storage name, InvalidValueError for a bad `part`.
    """
    if part is not None:
        check_partition(*part)
    sel = Selection(budget_bytes=budget_bytes)
    ids = [get_storage(name, session=session).id for name in storages or ()]
    q = (
        select(*COPY_COLUMNS, col(Storage.name))
        .join(Item, col(Item.oid) == col(Replica.item_oid))
        .join(Storage, col(Storage.id) == col(Replica.storage_id))
        .where(
            col(Replica.state).in_([ReplicaState.READY.value, *DAMAGED]),
            (col(Replica.state) != ReplicaState.LOST.value) | no_other_live_copy(),
            col(Item.state).in_(CHECKED_ITEMS),
            col(Item.checksum).is_not(None),
            col(Storage.state).in_(READABLE),
        )
        .order_by(col(Replica.verified_at).asc().nulls_first(), col(Replica.uid))
    )
    if ids:
        q = q.where(col(Replica.storage_id).in_(ids))
    result = session.execute(q.execution_options(yield_per=2000))
    try:
        for row in result:
            check = check_of(row)
            if part is not None and not in_partition(check.item_oid, *part):
                continue
            if check.algo not in HASHES:
                sel.unsupported += 1
                continue
            cost = 0 if check.state == ReplicaState.LOST else check.size
            if (limit is not None and len(sel.checks) >= limit) or (
                sel.checks and sel.bytes + cost > budget_bytes
            ):
                sel.budget_reached = True
                break
            sel.checks.append(check)
            sel.storage_ids[check.storage_id] = row[8]
            sel.bytes += cost
    finally:
        result.close()
    return sel


def batch_checks(checks: Sequence[Check], *, max_files: int, max_bytes: int) -> list[VerifyBatch]:
    """Group checks by (storage, algorithm), then cut at max_files or max_bytes."""
    cuts = cut(checks, key=lambda c: (c.storage_id, c.algo), max_files=max_files, max_bytes=max_bytes)
    return [VerifyBatch(sid, algo, batch) for (sid, algo), batch in cuts]


# --------------------------------------------------------------------------- verify


@dataclass
class VerifyResult:
    """What one verify batch found and did."""

    storage: str
    algo: str
    planned: int = 0
    matched: int = 0  # intact (verified_at updated)
    corrupted: int = 0  # newly CORRUPTED
    lost: int = 0  # newly LOST
    recovered: int = 0  # CORRUPTED or LOST copies found intact again
    unreadable: int = 0  # present but could not be read: unchanged
    bytes: int = 0  # bytes whose checksum was computed or looked up
    trusted: bool = False  # the storage's stored hashes were used (no download)
    items_corrupted: int = 0
    items_repaired: int = 0
    duration_s: float = 0.0
    damaged: list[uuid.UUID] = field(default_factory=list)  # CORRUPTED or LOST now: repair them
    errors: dict[str, str] = field(default_factory=dict)

    def row(self) -> VerifyBatchRow:
        return VerifyBatchRow(
            storage=self.storage,
            algo=self.algo + (" (stored)" if self.trusted else ""),
            planned=self.planned,
            intact=self.matched,
            corrupted=self.corrupted,
            lost=self.lost,
            recovered=self.recovered,
            unreadable=self.unreadable,
            bytes=self.bytes,
            seconds=round(self.duration_s, 2),
            first_error=next(iter(self.errors.values()), ""),
        )


def verify_batch(
    batch: VerifyBatch, *, sessions: SessionFactory = default_sessions, actor: str = "dlm"
) -> VerifyResult:
    """Read back one batch's copies with ONE `rclone hashsum` and settle what it found.

    A storage that refuses the read (credentials, a missing root) is reported in the
    result's errors and changes nothing. Raises TransientError (StorageUnavailableError, or
    the catalogue unreachable) so the caller may retry.
    """
    with sessions() as s:
        storage = s.get_one(Storage, batch.storage_id)
    result = VerifyResult(storage.name, batch.algo, planned=len(batch.checks))
    started = time.monotonic()
    trusted = storage.trust_stored_checksums and batch.algo in native_hashes(storage)
    result.trusted = trusted
    target = backend_for(storage).rclone_target()
    paths = [c.path for c in batch.checks]
    # A copy whose path is (or goes through) a symbolic link is not DLM's bytes: it is LOST.
    links = refused_paths(target, paths)
    try:
        # a root that is not this storage's (another's marker, an unmounted, empty mount point)
        # says nothing about its copies: unreadable, nothing marked LOST
        identity.check_identity(storage, write=False)
        found = hashsum(target, paths, batch.algo, download=None if trusted else True, nbytes=batch.bytes)
        absent = [p for p in paths if p not in found and p not in links]
        present = list_files(target, absent) if absent else {}
    except StorageError as exc:
        result.unreadable = len(batch.checks)
        result.errors = {p: str(exc) for p in paths}
        result.duration_s = time.monotonic() - started
        return result
    changes: list[ReplicaChange] = []
    intact: list[Check] = []
    base = {"storage": storage.name, "algo": batch.algo, "found_by": "verify"}
    for c in batch.checks:
        got = found.get(c.path)
        if got is None and c.path in present:
            result.unreadable += 1
            result.errors[c.path] = "present but its checksum could not be read"
            continue
        if got is not None:
            result.bytes += c.size
        if got is not None and got.lower() == c.checksum.lower():
            if c.state == ReplicaState.READY:
                intact.append(c)
            else:
                changes.append(
                    ReplicaChange(
                        c,
                        ReplicaState.READY,
                        EventKind.REPLICA_REPAIRED,
                        {**base, "path": c.path, "was": c.state.value, "how": "found intact again"},
                        c.size if c.state == ReplicaState.LOST else 0,
                    )
                )
        elif got is not None:
            details = {**base, "path": c.path, "expected": c.checksum, "found": got}
            if c.state == ReplicaState.CORRUPTED:
                result.damaged.append(c.replica_uid)
            else:
                delta = c.size if c.state == ReplicaState.LOST else 0
                changes.append(
                    ReplicaChange(c, ReplicaState.CORRUPTED, EventKind.REPLICA_CORRUPTED, details, delta)
                )
        elif c.state == ReplicaState.LOST:
            result.damaged.append(c.replica_uid)
        else:
            delta = -c.size if c.state in (ReplicaState.READY, ReplicaState.CORRUPTED) else 0
            details = {**base, "path": c.path}
            if c.path in links:
                details["reason"] = result.errors[c.path] = links[c.path]
            changes.append(ReplicaChange(c, ReplicaState.LOST, EventKind.REPLICA_LOST, details, delta))
    now = utcnow()
    with sessions() as s:
        for chunk in chunks([c.replica_uid for c in intact]):
            done = s.execute(
                update(Replica)
                .where(col(Replica.uid).in_(chunk), col(Replica.state) == ReplicaState.READY.value)
                .values(verified_at=now)
                .returning(col(Replica.uid))
            ).all()
            result.matched += len(done)
        applied = apply_replica_changes(s, changes, storage_id=batch.storage_id, actor=actor, now=now)
        for ch in applied:
            if ch.to == ReplicaState.READY:
                result.recovered += 1
            elif ch.to == ReplicaState.CORRUPTED:
                result.corrupted += 1
                result.damaged.append(ch.check.replica_uid)
            else:
                result.lost += 1
                result.damaged.append(ch.check.replica_uid)
        result.items_corrupted, result.items_repaired = settle_items(
            s, {ch.check.item_oid for ch in applied}, actor=actor
        )
    result.duration_s = time.monotonic() - started
    return result
