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

import json
import os
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, insert, or_, select, update
from sqlalchemy.orm import aliased
from sqlmodel import Session, col

from lifecycle import audit, rclone
from lifecycle.apply import BatchResult, SessionFactory, default_sessions
from lifecycle.batching import cut
from lifecycle.catalog import get_storage
from lifecycle.errors import DLMError, InvalidValueError, StorageError
from lifecycle.models import Item, Replica, Storage, Transfer, utcnow
from lifecycle.settings import Settings, get_settings
from lifecycle.states import (
    LIVE_REPLICA_STATES,
    ItemState,
    ReplicaState,
    StorageKind,
    StorageState,
    TransferKind,
    TransferState,
)
from lifecycle.storage import backend_for, identity
from lifecycle.storage.base import RcloneTarget

__all__ = [
    "DEFAULT_BUDGET_BYTES",
    "Check",
    "Repair",
    "RepairBatch",
    "ReplicaChange",
    "Selection",
    "VerifyBatch",
    "VerifyResult",
    "apply_replica_changes",
    "batch_checks",
    "confirm_copies",
    "default_budget_bytes",
    "list_files",
    "native_hashes",
    "plan_repairs",
    "repair_batch",
    "select_checks",
    "settle_items",
    "verify_batch",
]

# Bytes one verify run reads when neither the caller nor DLM_VERIFY__BUDGET_BYTES says.
DEFAULT_BUDGET_BYTES = 100 * 1024**3
_CHUNK = 500
# A pre-delete check that takes longer than this (plus a little per file) confirms nothing:
# a stalled storage must not hold a delete batch's claims for rclone's minutes of retries.
CONFIRM_TIMEOUT_S = 60.0
CONFIRM_TIMEOUT_PER_FILE_S = 0.05
_READABLE = (StorageState.ONLINE.value, StorageState.DRAINING.value)
_DAMAGED = (ReplicaState.CORRUPTED.value, ReplicaState.LOST.value)
_CHECKED_ITEMS = (ItemState.READY.value, ItemState.CORRUPTED.value)


def default_budget_bytes(settings: Settings | None = None) -> int:
    """The verify budget: `settings.verify.budget_bytes` where the settings have that section,
    else DEFAULT_BUDGET_BYTES."""
    section = getattr(settings or get_settings(), "verify", None)
    value = getattr(section, "budget_bytes", None)
    return value if isinstance(value, int) and value > 0 else DEFAULT_BUDGET_BYTES


def native_hashes(storage: Storage) -> frozenset[str]:
    """The hashes a storage keeps itself (rather than computing them by reading the bytes)."""
    if storage.kind == StorageKind.S3:
        return frozenset({"md5"})  # single-part ETags, or rclone's md5chksum metadata
    return frozenset()


def _chunks(seq: Sequence[Any], n: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _no_other_live_copy() -> ColumnElement[bool]:
    """SQL: no other live copy of the replica's item on the replica's storage, and no live
    copy of another item at its path (a LOST row may only come back when nothing took its
    place; the partial unique indexes demand both)."""
    other = aliased(Replica)
    return ~(
        select(col(other.uid))
        .where(
            or_(
                col(other.item_oid) == col(Replica.item_oid),
                col(other.path) == col(Replica.path),
            ),
            col(other.storage_id) == col(Replica.storage_id),
            col(other.uid) != col(Replica.uid),
            col(other.state).notin_([ReplicaState.DELETED.value, ReplicaState.LOST.value]),
        )
        .exists()
    )


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True, slots=True)
class Check:
    """One copy to read back, with what the catalogue says its bytes are."""

    replica_uid: uuid.UUID
    item_oid: uuid.UUID
    storage_id: uuid.UUID
    path: str
    size: int
    checksum: str
    algo: str
    state: ReplicaState  # when selected; every update is guarded by it


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
) -> Selection:
    """The copies to verify now: READY, CORRUPTED and (when nothing took their place) LOST
    copies of READY or CORRUPTED items with a checksum, on online or draining storages,
    oldest `verified_at` first (never verified first), until the next one would exceed
    `budget_bytes` (the first always goes) or `limit` copies. LOST copies cost no budget.

    Raises StorageNotFoundError for an unknown storage name.
    """
    sel = Selection(budget_bytes=budget_bytes)
    ids = [get_storage(session, name).id for name in storages or ()]
    q = (
        select(
            col(Replica.uid),
            col(Replica.item_oid),
            col(Replica.storage_id),
            col(Replica.path),
            col(Replica.state),
            col(Item.size),
            col(Item.checksum),
            col(Item.checksum_algo),
            col(Storage.name),
        )
        .join(Item, col(Item.oid) == col(Replica.item_oid))
        .join(Storage, col(Storage.id) == col(Replica.storage_id))
        .where(
            col(Replica.state).in_([ReplicaState.READY.value, *_DAMAGED]),
            (col(Replica.state) != ReplicaState.LOST.value) | _no_other_live_copy(),
            col(Item.state).in_(_CHECKED_ITEMS),
            col(Item.checksum).is_not(None),
            col(Storage.state).in_(_READABLE),
        )
        .order_by(col(Replica.verified_at).asc().nulls_first(), col(Replica.uid))
    )
    if ids:
        q = q.where(col(Replica.storage_id).in_(ids))
    result = session.execute(q.execution_options(yield_per=2000))
    try:
        for uid, oid, sid, path, state, size, checksum, algo, sname in result:
            algo = algo or "md5"
            if algo not in rclone.HASHES:
                sel.unsupported += 1
                continue
            cost = 0 if state == ReplicaState.LOST else int(size)
            if (limit is not None and len(sel.checks) >= limit) or (
                sel.checks and sel.bytes + cost > budget_bytes
            ):
                sel.budget_reached = True
                break
            sel.checks.append(Check(uid, oid, sid, path, int(size), checksum, algo, ReplicaState(state)))
            sel.storage_ids[sid] = sname
            sel.bytes += cost
    finally:
        result.close()
    return sel


def batch_checks(checks: Sequence[Check], *, max_files: int, max_bytes: int) -> list[VerifyBatch]:
    """Group checks by (storage, algorithm), then cut at max_files or max_bytes."""
    return [
        VerifyBatch(sid, algo, batch)
        for (sid, algo), batch in cut(
            checks,
            key=lambda c: (c.storage_id, c.algo),
            size=lambda c: c.size,
            max_files=max_files,
            max_bytes=max_bytes,
        )
    ]


# --------------------------------------------------------------------------- rclone helpers


def list_files(
    target: RcloneTarget,
    paths: Sequence[str],
    *,
    metadata: bool = False,
    hash_type: str | None = None,
    timeout: float | None = None,
) -> dict[str, dict[str, Any]]:
    """path -> rclone's lsjson entry for each of `paths` present under target, in ONE process
    (`--files-from-raw --no-traverse`); absent paths, and on a local target paths that are
    or go through a symbolic link, are absent from the result. With
    metadata=True entries carry `Metadata`, with hash_type their `Hashes` (native on S3,
    computed by reading elsewhere). Every call carries rclone's stall flags
    (lifecycle.rclone.stall_flags), so an unreachable endpoint fails it in seconds.

    Raises InvalidValueError (a path with a line break), CredentialsError,
    StorageUnavailableError or RcloneError when rclone fails as a whole.
    """
    refused = rclone.refused_paths(target, paths)  # a link is never listed as the copy
    wanted = [p for p in dict.fromkeys(paths) if p not in refused]
    if not wanted:
        return {}
    for p in wanted:
        if "\n" in p or "\r" in p:
            raise InvalidValueError(f"a file name contains a line break: {p[:80]!r}")
    spec = target.spec if target.spec.endswith((":", "/")) else target.spec + "/"
    with tempfile.TemporaryDirectory(prefix="dlm-verify-") as tmp:
        list_file = os.path.join(tmp, "files.txt")
        with open(list_file, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(p + "\n" for p in wanted))
        args = ["lsjson", spec, "-R", "--files-only", "--no-traverse", "--files-from-raw", list_file]
        if metadata:
            args.append("--metadata")
        if hash_type:
            args += ["--hash", "--hash-type", hash_type]
        limit = rclone.batch_deadline(files=len(wanted)) if timeout is None else timeout
        proc = rclone.run([*args, "--log-level", "ERROR"], env=target.env, timeout=limit)
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        message = " ".join((lines[-1] if lines else f"exit code {proc.returncode}").split())[:500]
        raise rclone.error_class(message)(f"rclone could not list files on {target.spec}: {message}")
    entries = json.loads(proc.stdout or b"[]")
    found: dict[str, dict[str, Any]] = {}
    want = set(wanted)
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("Path") in want and not entry.get("IsDir"):
            found[str(entry["Path"])] = entry
    return found


# --------------------------------------------------------------------------- confirming copies


def _root_present(storage: Storage) -> None:
    """Raise StorageError unless the storage's root is there (a posix root that is not a
    directory is an unmounted or moved volume: rclone lists it as empty, not as an error)."""
    if storage.kind == StorageKind.POSIX:
        root = storage.root
        if not os.path.isdir(root) or not os.access(root, os.R_OK | os.X_OK):
            raise StorageError(f"storage '{storage.name}': root {root} is not a readable directory")
    else:
        backend_for(storage).check()


def confirm_copies(
    storage: Storage, copies: Sequence[Check], *, timeout: float | None = None
) -> tuple[list[Check], list[ReplicaChange]]:
    """Whether READY copies on one storage are physically there, with ONE listing (rclone
    lsjson over the paths): size, and the hash the storage keeps itself where it has one
    (MD5 on S3) and the copy's algorithm is that one. Returns the copies confirmed intact,
    and for the others the change to settle: absent -> LOST, another size or stored hash ->
    CORRUPTED (events `replica.lost` / `replica.corrupted`, `found_by` "pre-delete check").
    The listing fails fast on a dead endpoint and gives up after `timeout` seconds (default
    CONFIRM_TIMEOUT_S plus CONFIRM_TIMEOUT_PER_FILE_S per copy).

    Raises DLMError (StorageError, CredentialsError, StorageUnavailableError, RcloneError,
    InvalidValueError) when the storage or its root cannot be listed: then nothing is
    confirmed and nothing may be marked.
    """
    if not copies:
        return [], []
    identity.check_identity(storage, write=False)  # another storage's root now confirms nothing
    algo = "md5" if "md5" in native_hashes(storage) else None
    if timeout is None:
        timeout = CONFIRM_TIMEOUT_S + CONFIRM_TIMEOUT_PER_FILE_S * len(copies)
    found = list_files(
        backend_for(storage).rclone_target(),
        [c.path for c in copies],
        hash_type=algo,
        timeout=timeout,
    )
    if len(found) < len({c.path for c in copies}):
        _root_present(storage)  # absent files are only lost if the root is still there
    confirmed: list[Check] = []
    changes: list[ReplicaChange] = []
    base = {"storage": storage.name, "found_by": "pre-delete check"}
    for c in copies:
        entry = found.get(c.path)
        if entry is None:
            changes.append(
                ReplicaChange(c, ReplicaState.LOST, "replica.lost", {**base, "path": c.path}, -c.size)
            )
            continue
        size = entry.get("Size")
        stored = str((entry.get("Hashes") or {}).get(algo or "") or "") if algo == c.algo else ""
        if isinstance(size, int) and size >= 0 and size != c.size:
            details = {**base, "path": c.path, "expected_size": c.size, "found_size": size}
        elif stored and c.checksum and stored.lower() != c.checksum.lower():
            details = {**base, "path": c.path, "algo": c.algo, "expected": c.checksum, "found": stored}
        else:
            confirmed.append(c)
            continue
        changes.append(ReplicaChange(c, ReplicaState.CORRUPTED, "replica.corrupted", details))
    return confirmed, changes


# --------------------------------------------------------------------------- settling items


def settle_items(session: Session, oids: Iterable[uuid.UUID], *, actor: str) -> tuple[int, int]:
    """Of `oids`: READY items with no READY copy left become CORRUPTED (`item.corrupted`);
    CORRUPTED items with a READY copy again become READY (`item.repaired`). Returns
    (corrupted, repaired)."""
    todo = sorted(set(oids))
    events: list[dict[str, Any]] = []
    now = utcnow()
    has_ready = (
        select(col(Replica.uid))
        .where(col(Replica.item_oid) == col(Item.oid), col(Replica.state) == ReplicaState.READY.value)
        .exists()
    )
    corrupted = repaired = 0
    for chunk in _chunks(todo):
        lost_all = session.execute(
            update(Item)
            .where(col(Item.oid).in_(chunk), col(Item.state) == ItemState.READY.value, ~has_ready)
            .values(state=ItemState.CORRUPTED.value, updated_at=now)
            .returning(col(Item.oid), col(Item.name), col(Item.version))
        ).all()
        back = session.execute(
            update(Item)
            .where(col(Item.oid).in_(chunk), col(Item.state) == ItemState.CORRUPTED.value, has_ready)
            .values(state=ItemState.READY.value, updated_at=now)
            .returning(col(Item.oid), col(Item.name), col(Item.version))
        ).all()
        corrupted += len(lost_all)
        repaired += len(back)
        events += [
            {
                "kind": "item.corrupted",
                "item_oid": oid,
                "actor": actor,
                "details": {"name": name, "version": version, "reason": "no intact copy left"},
            }
            for oid, name, version in lost_all
        ]
        events += [
            {
                "kind": "item.repaired",
                "item_oid": oid,
                "actor": actor,
                "details": {"name": name, "version": version},
            }
            for oid, name, version in back
        ]
    audit.record_many(session, events)
    return corrupted, repaired


@dataclass(frozen=True, slots=True)
class ReplicaChange:
    """A guarded state change of one copy: from `was` to `to`, with its event."""

    check: Check
    to: ReplicaState
    kind: str | None
    details: dict[str, Any]
    used_delta: int = 0


def apply_replica_changes(
    session: Session, changes: Sequence[ReplicaChange], *, storage_id: uuid.UUID, actor: str, now: datetime
) -> list[ReplicaChange]:
    """Apply state changes in bulk (one UPDATE per (from, to) pair and chunk), each only if the
    copy is still in the state it was read in; returns the changes that applied."""
    groups: dict[tuple[ReplicaState, ReplicaState], list[ReplicaChange]] = defaultdict(list)
    for ch in changes:
        groups[(ch.check.state, ch.to)].append(ch)
    applied: list[ReplicaChange] = []
    for (was, to), group in groups.items():
        by_uid = {ch.check.replica_uid: ch for ch in group}
        for chunk in _chunks(list(by_uid)):
            values: dict[str, Any] = {"state": to.value, "updated_at": now}
            if to == ReplicaState.READY:
                values["verified_at"] = now
            stmt = update(Replica).where(col(Replica.uid).in_(chunk), col(Replica.state) == was.value)
            if was == ReplicaState.LOST:
                stmt = stmt.where(_no_other_live_copy())
            done = session.execute(stmt.values(**values).returning(col(Replica.uid))).all()
            applied += [by_uid[r[0]] for r in done]
    delta = sum(ch.used_delta for ch in applied)
    if delta:
        session.execute(
            update(Storage)
            .where(col(Storage.id) == storage_id)
            .values(used_bytes=col(Storage.used_bytes) + delta)
        )
    audit.record_many(
        session,
        [
            {
                "kind": ch.kind,
                "item_oid": ch.check.item_oid,
                "replica_uid": ch.check.replica_uid,
                "storage_id": storage_id,
                "actor": actor,
                "details": ch.details,
            }
            for ch in applied
            if ch.kind
        ],
    )
    return applied


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

    def row(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "algo": self.algo + (" (stored)" if self.trusted else ""),
            "planned": self.planned,
            "intact": self.matched,
            "corrupted": self.corrupted,
            "lost": self.lost,
            "recovered": self.recovered,
            "unreadable": self.unreadable,
            "bytes": self.bytes,
            "seconds": round(self.duration_s, 2),
            "first error": next(iter(self.errors.values()), ""),
        }


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
    links = rclone.refused_paths(target, paths)
    try:
        found = rclone.hashsum(
            target, paths, batch.algo, download=None if trusted else True, nbytes=batch.bytes
        )
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
                        "replica.repaired",
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
                changes.append(ReplicaChange(c, ReplicaState.CORRUPTED, "replica.corrupted", details, delta))
        elif c.state == ReplicaState.LOST:
            result.damaged.append(c.replica_uid)
        else:
            delta = -c.size if c.state in (ReplicaState.READY, ReplicaState.CORRUPTED) else 0
            details = {**base, "path": c.path}
            if c.path in links:
                details["reason"] = result.errors[c.path] = links[c.path]
            changes.append(ReplicaChange(c, ReplicaState.LOST, "replica.lost", details, delta))
    now = utcnow()
    with sessions() as s:
        for chunk in _chunks([c.replica_uid for c in intact]):
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
    for chunk in _chunks(uids):
        rows += session.execute(
            select(
                col(Replica.uid),
                col(Replica.item_oid),
                col(Replica.storage_id),
                col(Replica.path),
                col(Replica.state),
                col(Item.size),
                col(Item.checksum),
                col(Item.checksum_algo),
            )
            .join(Item, col(Item.oid) == col(Replica.item_oid))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(
                col(Replica.uid).in_(chunk),
                col(Replica.state).in_(_DAMAGED),
                (col(Replica.state) != ReplicaState.LOST.value) | _no_other_live_copy(),
                col(Item.state).in_(_CHECKED_ITEMS),
                col(Item.checksum).is_not(None),
                col(Storage.state).in_(_READABLE),
            )
        ).all()
    skipped: dict[uuid.UUID, str] = {u: "no longer damaged, or its item or storage is not live" for u in uids}
    sources: dict[uuid.UUID, list[tuple[uuid.UUID, str, str]]] = defaultdict(list)
    oids = sorted({r[1] for r in rows})
    for chunk in _chunks(oids):
        for oid, sid, path, name in session.execute(
            select(col(Replica.item_oid), col(Replica.storage_id), col(Replica.path), col(Storage.name))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(
                col(Replica.item_oid).in_(chunk),
                col(Replica.state) == ReplicaState.READY.value,
                col(Storage.state).in_(_READABLE),
            )
            .order_by(col(Storage.name))
        ):
            sources[oid].append((sid, path, name))
    groups: dict[tuple[uuid.UUID, uuid.UUID], list[Repair]] = defaultdict(list)
    for uid, oid, sid, path, state, size, checksum, algo in rows:
        algo = algo or "md5"
        others = [src for src in sources[oid] if src[0] != sid]
        same_path = [src for src in others if src[1] == path]
        if algo not in rclone.HASHES:
            skipped[uid] = f"rclone cannot verify {algo} checksums"
        elif not others:
            skipped[uid] = "no intact copy on another online storage"
        elif not same_path:
            skipped[uid] = "no intact copy at the same path (replicate will add a new copy)"
        else:
            skipped.pop(uid)
            groups[(same_path[0][0], sid)].append(
                Repair(uid, oid, path, int(size), checksum, algo, ReplicaState(state))
            )
            continue
    batches: list[RepairBatch] = []
    for (src, dst), group in groups.items():
        current: list[Repair] = []
        nbytes = 0
        for r in group:
            if current and (len(current) >= max_files or nbytes + r.size > max_bytes):
                batches.append(RepairBatch(src, dst, tuple(current)))
                current, nbytes = [], 0
            current.append(r)
            nbytes += r.size
        if current:
            batches.append(RepairBatch(src, dst, tuple(current)))
    return batches, skipped


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
        for chunk in _chunks(list(want)):
            still |= {
                r[0]
                for r in s.execute(
                    select(col(Replica.uid), col(Replica.state)).where(col(Replica.uid).in_(chunk))
                )
                if r[1] == want[r[0]].state.value
            }
        intact_src = set()
        for chunk in _chunks(sorted({r.item_oid for r in batch.repairs})):
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
        for chunk in _chunks(lost_paths):
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
        gone = rclone.delete_files(dst_target, corrupt, checkers=checkers)
        failed.update({p: f"could not remove the corrupt copy: {e}" for p, e in gone.failed.items()})
    paths = [r.path for r in todo if r.path not in failed]
    sizes = {r.path: r.size for r in todo}
    report = rclone.copy_files(
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
            got = rclone.hashsum(
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
        rclone.delete_files(dst_target, bad_copies, checkers=checkers)
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
                "replica.repaired",
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
                    "kind": "replica.repair_failed",
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
