"""Applies planned actions to storages and the catalogue, in batches, safely under concurrency.

A copy batch (one source and one destination storage) is:
1. *claimed*: one COPYING replica row per copy is inserted on the destination; the partial
   unique index (one live copy of an item per storage) makes a concurrent run's claim of
   the same copy a no-op, so two runs never copy the same thing twice;
2. *moved* by ONE rclone process for the whole batch (`--files-from-raw`, `--checksum`);
3. *verified*: the destination's checksums (one `rclone hashsum` call) are compared with
   the catalogue's, so a copy is READY only if its bytes are the item's;
4. *settled* in one transaction: READY rows, FAILED transfers, claims of failed copies
   removed (the catalogue never claims a copy that is not there), one Event per change.

A delete batch (one storage) claims its replicas (READY -> DELETING) after re-checking,
with the item rows locked on PostgreSQL, that every item keeps its target phase and an
intact copy without them (unless the item itself expired); the other copies such a deletion
relies on are then confirmed on their storages (one listing per storage: check before
delete), those found missing become LOST and the deletions no longer safe are given back;
then one rclone process deletes the files, and the rows become DELETED.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import String, cast, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col

from lifecycle import audit, rclone
from lifecycle.batching import cut
from lifecycle.db import one_of, session_scope
from lifecycle.errors import DLMError
from lifecycle.models import Event, Item, Replica, Storage, Transfer, utcnow
from lifecycle.planner import (
    Action,
    Copy,
    DeleteReplica,
    Drained,
    ExpireItem,
    Refusal,
    SetPhase,
    Shortfall,
)
from lifecycle.policy import INTACT_STORAGE_STATES, Policy, ReplicaView, StorageIndex, phase_satisfied
from lifecycle.snapshot import ITEM_COLUMNS, _item_view, storage_views
from lifecycle.states import (
    LIVE_ITEM_STATES,
    LIVE_REPLICA_STATES,
    ItemState,
    Phase,
    ReplicaState,
    StorageState,
    TransferKind,
    TransferState,
)
from lifecycle.storage import backend_for, identity
from lifecycle.storage.base import RcloneTarget

if TYPE_CHECKING:  # lifecycle.verify imports this module
    from lifecycle.verify import Check, ReplicaChange

SessionFactory = Callable[[], AbstractContextManager[Session]]


def worker_id() -> str:
    """host:pid of this process, written on the rows it holds in flight (see lifecycle.recovery)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def default_sessions() -> AbstractContextManager[Session]:
    return session_scope()


# --------------------------------------------------------------------------- plans and batches


@dataclass
class Plan:
    """The actions of one planning run, sorted by kind, with the planner's counters."""

    pipeline: str
    copies: list[Copy] = field(default_factory=list)
    deletes: list[DeleteReplica] = field(default_factory=list)
    expires: list[ExpireItem] = field(default_factory=list)
    phases: list[SetPhase] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    shortfalls: list[Shortfall] = field(default_factory=list)
    drained: list[Drained] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    @classmethod
    def collect(
        cls,
        pipeline: str,
        actions: Iterable[Action],
        *,
        max_items: int | None = None,
        max_bytes: int | None = None,
    ) -> Plan:
        """Sort actions by kind; copies beyond the run's item or byte bound are left for later."""
        plan = cls(pipeline)
        copied_bytes = 0
        for a in actions:
            if isinstance(a, Copy):
                if max_items is not None and len(plan.copies) >= max_items:
                    plan.counters["deferred"] = plan.counters.get("deferred", 0) + 1
                    continue
                if max_bytes is not None and copied_bytes + a.size > max_bytes and plan.copies:
                    plan.counters["deferred"] = plan.counters.get("deferred", 0) + 1
                    continue
                copied_bytes += a.size
                plan.copies.append(a)
            elif isinstance(a, DeleteReplica):
                plan.deletes.append(a)
            elif isinstance(a, ExpireItem):
                plan.expires.append(a)
            elif isinstance(a, SetPhase):
                plan.phases.append(a)
            elif isinstance(a, Refusal):
                plan.refusals.append(a)
            elif isinstance(a, Shortfall):
                plan.shortfalls.append(a)
            elif isinstance(a, Drained):
                plan.drained.append(a)
        return plan

    @property
    def empty(self) -> bool:
        return not (
            self.copies or self.deletes or self.expires or self.phases or self.refusals or self.drained
        )

    def summary(self) -> dict[str, int]:
        return {
            "copies": len(self.copies),
            "copy_bytes": sum(c.size for c in self.copies),
            "deletes": len(self.deletes),
            "expired_items": len(self.expires),
            "phase_changes": len(self.phases),
            "refusals": len(self.refusals),
            "shortfalls": len(self.shortfalls),
            "drained": len(self.drained),
            "deferred": self.counters.get("deferred", 0),
        }


@dataclass(frozen=True)
class CopyBatch:
    src_storage_id: uuid.UUID
    dst_storage_id: uuid.UUID
    copies: tuple[Copy, ...]

    @property
    def bytes(self) -> int:
        return sum(c.size for c in self.copies)


@dataclass(frozen=True)
class DeleteBatch:
    storage_id: uuid.UUID
    deletes: tuple[DeleteReplica, ...]
    expiring: frozenset[uuid.UUID] = frozenset()


def batch_copies(copies: Sequence[Copy], *, max_files: int, max_bytes: int) -> list[CopyBatch]:
    """Group copies by (source, destination) storage, then cut at max_files or max_bytes."""
    return [
        CopyBatch(src, dst, batch)
        for (src, dst), batch in cut(
            copies,
            key=lambda c: (c.src_storage_id, c.dst_storage_id),
            size=lambda c: c.size,
            max_files=max_files,
            max_bytes=max_bytes,
        )
    ]


def batch_deletes(
    deletes: Sequence[DeleteReplica], *, max_files: int, expiring: Iterable[uuid.UUID] = ()
) -> list[DeleteBatch]:
    """Group deletions by storage, cut at max_files."""
    exp = frozenset(expiring)
    groups: dict[uuid.UUID, list[DeleteReplica]] = defaultdict(list)
    for d in deletes:
        groups[d.storage_id].append(d)
    return [
        DeleteBatch(sid, tuple(group[i : i + max_files]), exp)
        for sid, group in groups.items()
        for i in range(0, len(group), max_files)
    ]


# --------------------------------------------------------------------------- results


@dataclass
class BatchResult:
    """What one batch did, for the run's summary and artifact."""

    kind: str
    src: str | None
    dst: str | None
    planned: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    bytes: int = 0
    duration_s: float = 0.0
    # seconds spent per stage (claim, rclone, verify, settle) for copies
    stages: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "from": self.src or "-",
            "to": self.dst or "-",
            "planned": self.planned,
            "done": self.done,
            "failed": self.failed,
            "skipped": self.skipped,
            "bytes": self.bytes,
            "seconds": round(self.duration_s, 2),
            **{f"{k} s": round(v, 2) for k, v in self.stages.items()},
            "first error": next(iter(self.errors.values()), ""),
        }


def _insert_ignore(session: Session, table: Any) -> Any:
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    raise DLMError(f"unsupported database {name}")


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


# --------------------------------------------------------------------------- copies


@dataclass(frozen=True)
class _Claim:
    replica_uid: uuid.UUID
    transfer_id: uuid.UUID
    item_oid: uuid.UUID
    path: str
    size: int
    checksum: str | None
    algo: str | None


def _claim_copies(
    session: Session, batch: CopyBatch, *, kind: TransferKind, run_id: str | None
) -> list[_Claim]:
    """Insert COPYING rows for the copies whose source is still READY and that no other run
    has claimed; returns the claims that are ours."""
    copies = {c.item_oid: c for c in batch.copies}
    claims: list[_Claim] = []
    oids = list(copies)
    now = utcnow()
    me = worker_id()
    dialect = session.get_bind().dialect.name
    conn = session.connection()
    step = 2000 if dialect == "postgresql" else 500  # arrays on PostgreSQL, IN lists on SQLite
    for i in range(0, len(oids), step):
        chunk = oids[i : i + step]
        if dialect == "postgresql":
            # A copy another run is claiming right now is left to it: a transaction-scoped
            # advisory lock per (item, destination) is taken without waiting (skip-locked
            # semantics for a row that does not exist yet); the unique index settles the rest.
            key = func.hashtextextended(
                func.concat(cast(col(Item.oid), String), str(batch.dst_storage_id)), 0
            )
            chunk = list(
                conn.execute(
                    select(col(Item.oid)).where(
                        one_of(dialect, col(Item.oid), chunk), func.pg_try_advisory_xact_lock(key)
                    )
                ).scalars()
            )
            if not chunk:
                continue
        ok = conn.execute(
            select(col(Item.oid), col(Item.checksum), col(Item.checksum_algo), col(Replica.path))
            .join(Replica, col(Replica.item_oid) == col(Item.oid))
            .where(
                one_of(dialect, col(Item.oid), chunk),
                one_of(dialect, col(Replica.item_oid), chunk),  # keeps the plan good without statistics
                col(Item.state) == ItemState.READY.value,
                col(Replica.storage_id) == batch.src_storage_id,
                col(Replica.state) == ReplicaState.READY.value,
            )
        ).all()
        rows = []
        meta: dict[uuid.UUID, tuple[str | None, str | None]] = {}
        for oid, checksum, algo, src_path in ok:
            c = copies[oid]
            if src_path != c.src_path:
                continue
            meta[oid] = (checksum, algo)
            rows.append(
                {
                    "uid": uuid.uuid4(),
                    "item_oid": oid,
                    "storage_id": batch.dst_storage_id,
                    "path": c.dst_path,
                    "state": ReplicaState.COPYING.value,
                    "claimed_by": me,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        if not rows:
            continue
        inserted = _insert_claims(session, rows, storage_id=batch.dst_storage_id, me=me, now=now)
        transfers = []
        for uid, oid in inserted:
            c = copies[oid]
            tid = uuid.uuid4()
            transfers.append(
                {
                    "id": tid,
                    "item_oid": oid,
                    "replica_uid": uid,
                    "kind": kind.value,
                    "src_storage_id": batch.src_storage_id,
                    "dst_storage_id": batch.dst_storage_id,
                    "state": TransferState.RUNNING.value,
                    "bytes": c.size,
                    "duration_s": 0.0,
                    "attempts": 1,
                    "flow_run_id": run_id,
                    "started_at": now,
                }
            )
            checksum, algo = meta[oid]
            claims.append(_Claim(uid, tid, oid, c.dst_path, c.size, checksum, algo))
        if transfers:
            _insert_transfers(session, transfers)
    return claims


def _insert_claims(
    session: Session, rows: list[dict[str, Any]], *, storage_id: uuid.UUID, me: str, now: datetime
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Insert COPYING replica rows, skipping any (storage, path) already taken; returns the
    (uid, item_oid) of the rows inserted."""
    if _is_postgres(session):
        # one statement over arrays: no per-row parameters to render or convert
        result = session.connection().exec_driver_sql(
            "INSERT INTO replica "
            "(uid, item_oid, storage_id, path, state, claimed_by, created_at, updated_at) "
            "SELECT u, o, %(sid)s, p, %(state)s, %(me)s, %(now)s, %(now)s "
            "FROM unnest(%(uids)s::uuid[], %(oids)s::uuid[], %(paths)s::text[]) AS t(u, o, p) "
            "ON CONFLICT DO NOTHING RETURNING uid, item_oid",
            {
                "sid": storage_id,
                "state": ReplicaState.COPYING.value,
                "me": me,
                "now": now,
                "uids": [r["uid"] for r in rows],
                "oids": [r["item_oid"] for r in rows],
                "paths": [r["path"] for r in rows],
            },
        )
        return [(uid, oid) for uid, oid in result]
    # Core executemany (insertmanyvalues): one cached statement, pages of VALUES
    replica = Replica.__table__  # type: ignore[attr-defined]
    stmt = _insert_ignore(session, replica).returning(replica.c.uid, replica.c.item_oid)
    return [(uid, oid) for uid, oid in session.connection().execute(stmt, rows)]


def _insert_transfers(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert RUNNING Transfer rows of one batch (same kind, storages, run and start)."""
    if _is_postgres(session):
        first = rows[0]
        session.connection().exec_driver_sql(
            "INSERT INTO transfer (id, item_oid, replica_uid, kind, src_storage_id, dst_storage_id, "
            "state, bytes, duration_s, attempts, flow_run_id, started_at) "
            "SELECT i, o, r, %(kind)s, %(src)s, %(dst)s, %(state)s, b, 0, 1, %(run)s, %(now)s "
            "FROM unnest(%(ids)s::uuid[], %(oids)s::uuid[], %(rids)s::uuid[], %(bytes)s::bigint[]) "
            "AS t(i, o, r, b)",
            {
                "kind": first["kind"],
                "src": first["src_storage_id"],
                "dst": first["dst_storage_id"],
                "state": first["state"],
                "run": first["flow_run_id"],
                "now": first["started_at"],
                "ids": [r["id"] for r in rows],
                "oids": [r["item_oid"] for r in rows],
                "rids": [r["replica_uid"] for r in rows],
                "bytes": [r["bytes"] for r in rows],
            },
        )
        return
    session.connection().execute(insert(Transfer.__table__), rows)  # type: ignore[attr-defined]


def _verify_destination(
    target: RcloneTarget,
    claims: Sequence[_Claim],
    paths_ok: set[str],
    checked: Mapping[str, tuple[str, str]] | None = None,
) -> dict[str, str]:
    """Compare destination checksums with the catalogue's; returns path -> error for mismatches.

    `checked` holds the digests rclone itself found equal at both ends right after copying
    (path -> (hash, hex)): where that hash is the catalogue's, comparing it with the catalogue
    settles the copy without reading the destination again. The others are hashed at the
    destination (one `rclone hashsum` per algorithm)."""
    errors: dict[str, str] = {}
    checked = checked or {}
    by_algo: dict[str, list[_Claim]] = defaultdict(list)
    for c in claims:
        if c.path not in paths_ok or not c.checksum or not c.algo:
            continue
        seen = checked.get(c.path)
        if seen is not None and seen[0] == c.algo:
            if seen[1].lower() != c.checksum.lower():
                errors[c.path] = (
                    f"checksum mismatch: the copy's {c.algo} {seen[1]} != catalogue {c.checksum} "
                    "(the source no longer holds the item's bytes)"
                )
            continue
        by_algo[c.algo].append(c)
    for algo, group in by_algo.items():
        if algo not in rclone.HASHES:
            continue  # e.g. blake2b: rclone cannot hash it; the size check and verify cover it
        try:
            found = rclone.hashsum(target, [c.path for c in group], algo, nbytes=sum(c.size for c in group))
        except DLMError as exc:
            for c in group:
                errors[c.path] = f"cannot read back the copy: {exc}"
            continue
        for c in group:
            got = found.get(c.path)
            if got is None:
                errors[c.path] = "copy not found at the destination after transfer"
            elif got.lower() != (c.checksum or "").lower():
                errors[c.path] = f"checksum mismatch at destination ({algo} {got} != catalogue {c.checksum})"
    return errors


# Listing a destination costs about one request per 1000 objects, looking files up one by
# one a request each: list when the destination holds fewer than this many objects per file.
_LIST_PER_FILE = 100


def _small_destination(session: Session, storage_id: uuid.UUID, files: int) -> bool:
    """Whether the storage holds few enough live copies that rclone should list it rather
    than look each file up (a bounded count: it stops at the threshold)."""
    limit = files * _LIST_PER_FILE
    held = session.execute(
        select(func.count()).select_from(
            select(col(Replica.uid))
            .where(col(Replica.storage_id) == storage_id, col(Replica.state).in_(LIVE_REPLICA_STATES))
            .limit(limit)
            .subquery()
        )
    ).scalar_one()
    return int(held) < limit


def apply_copy_batch(
    batch: CopyBatch,
    *,
    sessions: SessionFactory = default_sessions,
    actor: str = "dlm",
    run_id: str | None = None,
    transfers: int = 8,
    checkers: int = 8,
    kind: TransferKind = TransferKind.COPY,
) -> BatchResult:
    """Claim, copy (one rclone process), verify and settle one batch.

    Per-file failures become FAILED transfers and `transfer.failed` events; the batch's other
    files land. Raises TransientError only when the catalogue cannot be reached.
    """
    t0 = time.monotonic()
    with sessions() as s:
        src = s.get_one(Storage, batch.src_storage_id)
        dst = s.get_one(Storage, batch.dst_storage_id)
        claims = _claim_copies(s, batch, kind=kind, run_id=run_id)
        traverse = bool(claims) and _small_destination(s, batch.dst_storage_id, len(claims))
    result = BatchResult("copy", src.name, dst.name, planned=len(batch.copies))
    result.stages["claim"] = time.monotonic() - t0
    result.skipped = len(batch.copies) - len(claims)
    if not claims:
        return result
    started = time.monotonic()
    src_target = backend_for(src).rclone_target()
    dst_target = backend_for(dst).rclone_target()
    refused = identity.refusal(src, dst)  # both roots are still the storages' own
    report = (
        rclone.copy_files(
            src_target,
            dst_target,
            [c.path for c in claims],
            transfers=transfers,
            checkers=checkers,
            traverse=traverse,
            nbytes=sum(c.size for c in claims),
        )
        if refused is None
        else rclone.CopyReport(failed=dict.fromkeys((c.path for c in claims), refused))
    )
    report.failed.update(identity.shared_files(dst, sorted(report.ok - set(report.failed))))
    report.ok -= set(report.failed)
    t1 = time.monotonic()
    result.stages["rclone"] = t1 - started
    mismatches = _verify_destination(dst_target, claims, report.ok, report.hashes)
    result.stages["verify"] = time.monotonic() - t1
    failed = dict(report.failed)
    failed.update(mismatches)
    for c in claims:
        if c.path not in report.ok and c.path not in failed:
            failed[c.path] = "rclone did not report this file"
    if mismatches:  # a copy that is not the item's bytes must not stay behind
        rclone.delete_files(dst_target, list(mismatches))
    duration = time.monotonic() - started
    good = [c for c in claims if c.path not in failed]
    bad = [c for c in claims if c.path in failed]
    t2 = time.monotonic()
    _settle_copies(
        s_factory=sessions,
        batch=batch,
        good=good,
        bad=bad,
        failed=failed,
        duration=duration,
        actor=actor,
        src_name=src.name,
        dst_name=dst.name,
        result=result,
    )
    result.duration_s = duration
    result.stages["settle"] = time.monotonic() - t2
    return result


def _settle_copies(
    *,
    s_factory: SessionFactory,
    batch: CopyBatch,
    good: Sequence[_Claim],
    bad: Sequence[_Claim],
    failed: dict[str, str],
    duration: float,
    actor: str,
    src_name: str,
    dst_name: str,
    result: BatchResult,
) -> None:
    now = utcnow()
    events: list[dict[str, Any]] = []
    with s_factory() as s:
        dialect = s.get_bind().dialect.name
        conn = s.connection()  # Core statements: no ORM session synchronisation to do
        step = 5000 if dialect == "postgresql" else 500
        for i in range(0, len(good), step):
            chunk = good[i : i + step]
            conn.execute(
                update(Replica)
                .where(one_of(dialect, col(Replica.uid), [c.replica_uid for c in chunk]))
                .values(state=ReplicaState.READY.value, verified_at=now, updated_at=now, claimed_by=None)
            )
            conn.execute(
                update(Transfer)
                .where(one_of(dialect, col(Transfer.id), [c.transfer_id for c in chunk]))
                .values(state=TransferState.DONE.value, duration_s=duration, finished_at=now)
            )
        for i in range(0, len(bad), step):
            chunk = bad[i : i + step]
            uids = [c.replica_uid for c in chunk]
            conn.execute(delete(Replica).where(one_of(dialect, col(Replica.uid), uids)))
        for c in bad:
            s.execute(
                update(Transfer)
                .where(col(Transfer.id) == c.transfer_id)
                .values(
                    state=TransferState.FAILED.value,
                    error=failed[c.path][:1000],
                    duration_s=duration,
                    finished_at=now,
                    replica_uid=None,
                )
            )
        moved = sum(c.size for c in good)
        if moved:
            s.execute(
                update(Storage)
                .where(col(Storage.id) == batch.dst_storage_id)
                .values(used_bytes=col(Storage.used_bytes) + moved)
            )
        for c in good:
            events.append(
                {
                    "kind": "replica.created",
                    "item_oid": c.item_oid,
                    "replica_uid": c.replica_uid,
                    "storage_id": batch.dst_storage_id,
                    "actor": actor,
                    "details": {
                        "from": src_name,
                        "to": dst_name,
                        "path": c.path,
                        "transfer": str(c.transfer_id),
                    },
                }
            )
        for c in bad:
            events.append(
                {
                    "kind": "transfer.failed",
                    "item_oid": c.item_oid,
                    "storage_id": batch.dst_storage_id,
                    "actor": actor,
                    "details": {
                        "from": src_name,
                        "to": dst_name,
                        "path": c.path,
                        "error": failed[c.path][:500],
                    },
                }
            )
        audit.record_many(s, events)
    result.done = len(good)
    result.failed = len(bad)
    result.bytes = sum(c.size for c in good)
    result.errors = {c.path: failed[c.path] for c in bad}


# --------------------------------------------------------------------------- deletions


def _lock_items(session: Session, oids: Sequence[uuid.UUID]) -> None:
    """Serialise the deciders on the same items (PostgreSQL row locks, taken in oid order so two
    runs cannot deadlock; SQLite has one writer at a time)."""
    if _is_postgres(session) and oids:
        session.execute(
            select(col(Item.oid))
            .where(col(Item.oid).in_(list(oids)))
            .order_by(col(Item.oid))
            .with_for_update()
        )


def _safe_to_delete(
    session: Session,
    policy: Policy,
    index: StorageIndex,
    candidates: Sequence[tuple[uuid.UUID, uuid.UUID]],
    expiring: frozenset[uuid.UUID],
    *,
    confirmed: Collection[uuid.UUID] | None = None,
) -> tuple[set[uuid.UUID], dict[uuid.UUID, str], set[uuid.UUID]]:
    """Of (replica_uid, item_oid) candidates, which may go now; the rest with a reason; and the
    items whose deletions rely on surviving copies (not expiring).

    Checked against the catalogue as it is now (inside the locking transaction): an item that
    is not expiring must keep its target phase and at least one intact copy without them.
    With `confirmed`, only those replicas count as surviving copies (the ones found on their
    storages by the pre-delete check).
    """
    intact_storages = {
        s.id for s in index.storages if s.state in (StorageState.ONLINE, StorageState.DRAINING)
    }
    by_item: dict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)
    for uid, oid in candidates:
        by_item[oid].add(uid)
    allowed: set[uuid.UUID] = set()
    refused: dict[uuid.UUID, str] = {}
    relying: set[uuid.UUID] = set()
    oids = list(by_item)
    items = {
        r[0]: _item_view(r) for r in session.execute(select(*ITEM_COLUMNS).where(col(Item.oid).in_(oids)))
    }
    reps: dict[uuid.UUID, list[ReplicaView]] = defaultdict(list)
    for r in session.execute(
        select(
            col(Replica.uid),
            col(Replica.item_oid),
            col(Replica.storage_id),
            col(Replica.path),
            col(Replica.state),
        ).where(col(Replica.item_oid).in_(oids))
    ):
        reps[r[1]].append(ReplicaView(r[0], r[1], r[2], r[3], ReplicaState(r[4])))
    for oid, uids in by_item.items():
        item = items.get(oid)
        if item is None:
            continue
        if oid in expiring or item.state in (ItemState.EXPIRED, ItemState.DELETED):
            allowed |= uids
            continue
        remaining = [
            r
            for r in reps[oid]
            if r.uid not in uids
            and r.state == ReplicaState.READY
            and (confirmed is None or r.uid in confirmed)
        ]
        intact = [r for r in remaining if r.storage_id in intact_storages]
        if not intact and item.state in LIVE_ITEM_STATES:
            for u in uids:
                refused[u] = "it would remove the last intact copy of a live item"
        elif not phase_satisfied(item, remaining, index, policy):
            for u in uids:
                refused[u] = f"the item would fall below its target phase {item.target_phase.value}"
        else:
            allowed |= uids
            relying.add(oid)
    return allowed, refused, relying


@dataclass
class _Claimed:
    """The rows one delete batch holds (DELETING), and the surviving copies they rely on."""

    rows: dict[uuid.UUID, tuple[uuid.UUID, str, str]]  # uid -> (item_oid, state before, path)
    relying: set[uuid.UUID]  # items whose deletion relies on other copies
    survivors: dict[uuid.UUID, list[Check]] = field(default_factory=dict)  # by storage id
    storages: dict[uuid.UUID, Storage] = field(default_factory=dict)


def _survivor_checks(
    session: Session, oids: Collection[uuid.UUID], intact: Collection[uuid.UUID]
) -> list[Check]:
    """The READY copies of these items on online or draining storages (what the safety check
    counts), as verify.Check rows to confirm on their storages."""
    from lifecycle.verify import Check  # verify imports this module

    checks: list[Check] = []
    todo = sorted(oids)
    for i in range(0, len(todo), 500):
        for uid, oid, sid, path, size, checksum, algo in session.execute(
            select(
                col(Replica.uid),
                col(Replica.item_oid),
                col(Replica.storage_id),
                col(Replica.path),
                col(Item.size),
                col(Item.checksum),
                col(Item.checksum_algo),
            )
            .join(Item, col(Item.oid) == col(Replica.item_oid))
            .where(
                col(Replica.item_oid).in_(todo[i : i + 500]),
                col(Replica.state) == ReplicaState.READY.value,
                col(Replica.storage_id).in_(list(intact)),
            )
        ):
            checks.append(
                Check(uid, oid, sid, path, int(size), checksum or "", algo or "md5", ReplicaState.READY)
            )
    return checks


def _confirm_survivors(
    claim: _Claimed,
    storage: Storage,
    want: Mapping[uuid.UUID, DeleteReplica],
    *,
    policy: Policy,
    expiring: frozenset[uuid.UUID],
    sessions: SessionFactory,
    actor: str,
    refusals: dict[uuid.UUID, str],
) -> set[uuid.UUID]:
    """Check before delete: confirm on their storages (one listing per storage, outside any
    transaction) the copies the claimed deletions rely on; then, in one transaction, mark the
    missing ones LOST (another size or stored hash: CORRUPTED), re-run the safety check
    counting only the confirmed copies, and give back the claims no longer safe (their
    previous state, `policy.refused`, the reason also put in `refusals`). A storage that
    cannot be listed confirms nothing and marks nothing. Returns the replica uids still
    claimed (to delete)."""
    from lifecycle.verify import apply_replica_changes, confirm_copies, settle_items

    confirmed: set[uuid.UUID] = set()
    changes: dict[uuid.UUID, list[ReplicaChange]] = {}
    unlisted: dict[str, str] = {}  # storage name -> why it could not be listed
    for sid, checks in claim.survivors.items():
        st = claim.storages[sid]
        try:
            ok, bad = confirm_copies(st, checks)
        except DLMError as exc:
            unlisted[st.name] = " ".join(str(exc).split())[:300]
            continue
        confirmed |= {c.replica_uid for c in ok}
        if bad:
            changes[sid] = bad
    now = utcnow()
    me = worker_id()
    with sessions() as s:
        _lock_items(s, sorted(claim.relying))
        damaged: list[ReplicaChange] = []
        for sid, group in changes.items():
            damaged += apply_replica_changes(s, group, storage_id=sid, actor=actor, now=now)
        index = StorageIndex(tuple(storage_views(s)))
        candidates = [(uid, oid) for uid, (oid, _, _) in claim.rows.items() if oid in claim.relying]
        _, refused, _ = _safe_to_delete(s, policy, index, candidates, expiring, confirmed=confirmed)
        found: dict[uuid.UUID, list[str]] = defaultdict(list)  # item -> what the check found
        for ch in damaged:
            where = claim.storages[ch.check.storage_id].name
            found[ch.check.item_oid].append(f"its copy on {where} is {ch.to.value}")
        for sid, checks in claim.survivors.items():
            name = claim.storages[sid].name
            if name in unlisted:
                for c in checks:
                    found[c.item_oid].append(f"{name} could not be listed ({unlisted[name]})")
        events = []
        back: dict[str, list[uuid.UUID]] = defaultdict(list)
        for uid, why in refused.items():
            oid, was, _ = claim.rows[uid]
            back[was].append(uid)
            refusals[uid] = f"kept: {why} ({'; '.join(found[oid]) or 'other copies unconfirmed'})"
            events.append(
                {
                    "kind": "policy.refused",
                    "item_oid": oid,
                    "replica_uid": uid,
                    "storage_id": storage.id,
                    "actor": actor,
                    "details": {
                        "action": "delete",
                        "reason": refusals[uid],
                        "planned_for": want[uid].reason,
                        "found_by": "pre-delete check",
                    },
                }
            )
        for was, uids in back.items():
            s.execute(
                update(Replica)
                .where(
                    col(Replica.uid).in_(uids),
                    col(Replica.state) == ReplicaState.DELETING.value,
                    col(Replica.claimed_by) == me,
                )
                .values(state=was, updated_at=now, claimed_by=None)
            )
        audit.record_many(s, events)
        settle_items(s, {ch.check.item_oid for ch in damaged}, actor=actor)
    return set(claim.rows) - set(refused)


def apply_delete_batch(
    batch: DeleteBatch,
    *,
    policy: Policy,
    sessions: SessionFactory = default_sessions,
    actor: str = "dlm",
) -> BatchResult:
    """Claim (after the safety re-check), confirm the surviving copies, delete with one rclone
    process, and settle one batch.

    Deletions of a live item rely on its other copies: those are confirmed on their storages
    before anything is deleted (see _confirm_survivors); an expiring item's copies rely on
    none. Raises TransientError when the catalogue cannot be reached; storage failures are
    reported in the result.
    """
    want = {d.replica_uid: d for d in batch.deletes}
    with sessions() as s:
        storage = s.get_one(Storage, batch.storage_id)
        # Replicas another run is deleting right now are skipped (FOR UPDATE SKIP LOCKED), then
        # the items of the rest are locked so the safety check below sees a settled catalogue.
        stmt = select(col(Replica.uid), col(Replica.item_oid), col(Replica.state), col(Replica.path)).where(
            col(Replica.uid).in_(list(want)),
            # not DELETING: another run holds those (a dead run's are settled by lifecycle.recovery)
            col(Replica.state).in_([ReplicaState.READY.value, ReplicaState.CORRUPTED.value]),
        )
        if _is_postgres(s):
            stmt = stmt.with_for_update(skip_locked=True)
        rows = s.execute(stmt).all()
        _lock_items(s, sorted({r[1] for r in rows}))
        index = StorageIndex(tuple(storage_views(s)))
        allowed, refused, relying = _safe_to_delete(
            s, policy, index, [(r[0], r[1]) for r in rows], batch.expiring
        )
        claim = _Claimed({r[0]: (r[1], r[2], r[3]) for r in rows if r[0] in allowed}, relying)
        if claim.rows:
            s.execute(
                update(Replica)
                .where(col(Replica.uid).in_(list(claim.rows)))
                .values(state=ReplicaState.DELETING.value, updated_at=utcnow(), claimed_by=worker_id())
            )
        if claim.rows and relying:
            intact = [v.id for v in index.storages if v.state in INTACT_STORAGE_STATES]
            for c in _survivor_checks(s, relying, intact):
                claim.survivors.setdefault(c.storage_id, []).append(c)
            claim.storages = {sid: s.get_one(Storage, sid) for sid in claim.survivors}
        audit.record_many(
            s,
            [
                {
                    "kind": "policy.refused",
                    "item_oid": want[u].item_oid,
                    "replica_uid": u,
                    "storage_id": batch.storage_id,
                    "actor": actor,
                    "details": {"action": "delete", "reason": f"kept: {why}", "planned_for": want[u].reason},
                }
                for u, why in refused.items()
            ],
        )
    previous = {uid: was for uid, (_, was, _) in claim.rows.items()}
    result = BatchResult("delete", storage.name, None, planned=len(batch.deletes))
    still = set(claim.rows)
    kept: dict[uuid.UUID, str] = {}
    if claim.rows and relying:
        still = _confirm_survivors(
            claim,
            storage,
            want,
            policy=policy,
            expiring=batch.expiring,
            sessions=sessions,
            actor=actor,
            refusals=kept,
        )
    result.skipped = len(batch.deletes) - len(still)
    result.errors = {want[u].path: why for u, why in kept.items()}
    if not still:
        return result
    started = time.monotonic()
    paths = {path: uid for uid, (_, _, path) in claim.rows.items() if uid in still}
    not_ours = identity.refusal(storage)  # the root is still this storage's own
    report = (
        rclone.delete_files(backend_for(storage).rclone_target(), list(paths))
        if not_ours is None
        else rclone.DeleteReport(failed=dict.fromkeys(paths, not_ours))
    )
    duration = time.monotonic() - started
    now = utcnow()
    with sessions() as s:
        ok = [paths[p] for p in report.ok if p in paths]
        bad = {paths[p]: err for p, err in report.failed.items() if p in paths}
        for uid in paths.values():
            if uid not in ok and uid not in bad:
                bad[uid] = "rclone did not report this file"
        freed = 0
        for i in range(0, len(ok), 500):
            chunk = ok[i : i + 500]
            s.execute(
                update(Replica)
                .where(col(Replica.uid).in_(chunk))
                .values(state=ReplicaState.DELETED.value, updated_at=now, claimed_by=None)
            )
        freed = sum(want[u].size for u in ok)
        if freed:
            s.execute(
                update(Storage)
                .where(col(Storage.id) == batch.storage_id)
                .values(used_bytes=col(Storage.used_bytes) - freed)
            )
        for uid in bad:
            s.execute(
                update(Replica)
                .where(col(Replica.uid) == uid)
                .values(state=previous[uid], updated_at=now, claimed_by=None)
            )
        audit.record_many(
            s,
            [
                {
                    "kind": "replica.deleted",
                    "item_oid": want[u].item_oid,
                    "replica_uid": u,
                    "storage_id": batch.storage_id,
                    "actor": actor,
                    "details": {"path": want[u].path, "reason": want[u].reason, "storage": storage.name},
                }
                for u in ok
            ]
            + [
                {
                    "kind": "replica.delete_failed",
                    "item_oid": want[u].item_oid,
                    "replica_uid": u,
                    "storage_id": batch.storage_id,
                    "actor": actor,
                    "details": {"path": want[u].path, "error": err[:500]},
                }
                for u, err in bad.items()
            ],
        )
    result.done = len(ok)
    result.failed = len(bad)
    result.bytes = freed
    result.duration_s = duration
    result.errors.update({want[u].path: e for u, e in bad.items()})
    return result


# --------------------------------------------------------------------------- catalogue-only actions


def mark_expired(session: Session, expires: Sequence[ExpireItem], *, actor: str) -> int:
    """Live items whose expiry came go EXPIRED (their copies are deleted next)."""
    oids = [e.item_oid for e in expires]
    if not oids:
        return 0
    done = session.execute(
        update(Item)
        .where(col(Item.oid).in_(oids), col(Item.state).in_([s.value for s in LIVE_ITEM_STATES]))
        .values(state=ItemState.EXPIRED.value, updated_at=utcnow())
        .returning(col(Item.oid))
    ).all()
    reasons = {e.item_oid: e.reason for e in expires}
    audit.record_many(
        session,
        [
            {"kind": "item.expired", "item_oid": r[0], "actor": actor, "details": {"reason": reasons[r[0]]}}
            for r in done
        ],
    )
    return len(done)


def finish_expired(session: Session, *, actor: str) -> int:
    """EXPIRED items with no copy left become DELETED tombstones."""
    live_copy = (
        select(col(Replica.item_oid))
        .where(col(Replica.state).notin_([ReplicaState.DELETED.value, ReplicaState.LOST.value]))
        .where(col(Replica.item_oid) == col(Item.oid))
        .exists()
    )
    done = session.execute(
        update(Item)
        .where(col(Item.state) == ItemState.EXPIRED.value, ~live_copy)
        .values(state=ItemState.DELETED.value, updated_at=utcnow())
        .returning(col(Item.oid), col(Item.name), col(Item.version))
    ).all()
    audit.record_many(
        session,
        [
            {
                "kind": "item.deleted",
                "item_oid": r[0],
                "actor": actor,
                "details": {"name": r[1], "version": r[2]},
            }
            for r in done
        ],
    )
    return len(done)


def apply_phase_changes(session: Session, changes: Sequence[SetPhase], *, actor: str) -> int:
    """Raise target phases as aging rules ask (never lowers one)."""
    n = 0
    for ch in changes:
        lower = [p.value for p in Phase if p.rank < ch.phase.rank]
        done = session.execute(
            update(Item)
            .where(col(Item.oid) == ch.item_oid, col(Item.target_phase).in_(lower))
            .values(target_phase=ch.phase.value, updated_at=utcnow())
            .returning(col(Item.oid))
        ).all()
        if done:
            n += 1
            audit.record(
                session,
                "item.phase_changed",
                item_oid=ch.item_oid,
                actor=actor,
                details={"to": ch.phase.value, "reason": ch.reason},
            )
    return n


def record_refusals(session: Session, refusals: Sequence[Refusal], *, actor: str) -> int:
    """One `policy.refused` event per refused action (e.g. an expiry that would break the phase)."""
    return audit.record_many(
        session,
        [
            {
                "kind": "policy.refused",
                "item_oid": r.item_oid,
                "replica_uid": r.replica_uid,
                "actor": actor,
                "details": {"reason": r.reason},
            }
            for r in refusals
        ],
    )


def record_drained(session: Session, drained: Sequence[Drained], *, actor: str) -> list[str]:
    """A `storage.drained` event for each draining storage that has just emptied (once)."""
    names = []
    for d in drained:
        storage = session.get(Storage, d.storage_id)
        if storage is None or storage.state != StorageState.DRAINING:
            continue
        last = session.scalars(
            select(Event)
            .where(
                col(Event.storage_id) == d.storage_id,
                col(Event.item_oid).is_(None),
                col(Event.kind).startswith("storage."),  # not e.g. reconcile.link_skipped
            )
            .order_by(col(Event.id).desc())
            .limit(1)
        ).first()
        if last is None or last.kind != "storage.drained":
            audit.record(
                session,
                "storage.drained",
                storage_id=d.storage_id,
                actor=actor,
                details={"name": storage.name},
            )
        names.append(storage.name)
    return names


def delete_item_now(
    oid: uuid.UUID,
    *,
    policy: Policy,
    sessions: SessionFactory = default_sessions,
    actor: str = "user",
    reason: str = "deleted by user",
) -> list[BatchResult]:
    """An explicit delete: the item goes EXPIRED, every copy is deleted (one rclone process per
    storage), and the item row stays as a DELETED tombstone once no copy is left.

    Raises ItemNotFoundError, PolicyViolationError (already deleted).
    """
    from lifecycle.errors import ItemNotFoundError, PolicyViolationError

    with sessions() as s:
        item = s.get(Item, oid)
        if item is None:
            raise ItemNotFoundError(f"no item {oid}")
        if item.state == ItemState.DELETED:
            raise PolicyViolationError(f"{item.name} v{item.version} is already deleted")
        mark_expired(s, [ExpireItem(oid, reason)], actor=actor)
        reps = s.scalars(
            select(Replica).where(
                col(Replica.item_oid) == oid,
                col(Replica.state).in_([ReplicaState.READY.value, ReplicaState.CORRUPTED.value]),
            )
        ).all()
        deletes = [DeleteReplica(r.uid, oid, r.storage_id, r.path, item.size, reason) for r in reps]
    results = [
        apply_delete_batch(b, policy=policy, sessions=sessions, actor=actor)
        for b in batch_deletes(deletes, max_files=1000, expiring=[oid])
    ]
    with sessions() as s:
        finish_expired(s, actor=actor)
    return results
