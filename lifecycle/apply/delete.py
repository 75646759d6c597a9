"""Apply a delete batch: claim the replicas, confirm the surviving copies physically exist
(check before delete), delete in one rclone call, settle.

A delete batch (one storage) claims its replicas (READY -> DELETING) after re-checking,
with the item rows locked on PostgreSQL, that every item keeps its target phase and an
intact copy without them (unless the item itself expired); the other copies such a deletion
relies on are then confirmed on their storages (check before delete: one listing per
storage, and one `rclone hashsum` re-reading the copies whose hash the storage does not
keep; a posix copy that is the same file as the one to delete does not count), those found
missing become LOST (other bytes: CORRUPTED) and the deletions no longer safe are given
back; then one rclone process deletes the files, and the rows become DELETED.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlmodel import Session, col

from lifecycle.apply.confirm import confirm_copies, same_files
from lifecycle.apply.result import BatchResult
from lifecycle.apply.settle import (
    COPY_COLUMNS,
    Check,
    ReplicaChange,
    apply_replica_changes,
    check_of,
    settle_items,
)
from lifecycle.catalogue import audit
from lifecycle.catalogue.models import Item, Replica, Storage, utcnow
from lifecycle.catalogue.sql import SessionFactory, chunks, default_sessions, is_postgres, worker_id
from lifecycle.errors import DLMError
from lifecycle.planning.actions import (
    REPLICA_EXPIRED,
    DeleteReplica,
)
from lifecycle.planning.plan import DeleteBatch
from lifecycle.planning.policy import (
    INTACT_STORAGE_STATES,
    Policy,
    ReplicaView,
    StorageIndex,
    phase_satisfied,
)
from lifecycle.planning.snapshot import ITEM_COLUMNS, REPLICA_COLUMNS, item_view, storage_views
from lifecycle.states import (
    LIVE_ITEM_STATES,
    EventKind,
    ItemState,
    ReplicaState,
    StorageState,
)
from lifecycle.storage import identity
from lifecycle.storage.backends import backend_for
from lifecycle.transfer.operations import DeleteReport, delete_files

# --------------------------------------------------------------------------- deletions


def _lock_items(session: Session, oids: Sequence[uuid.UUID]) -> None:
    """Serialise the deciders on the same items (PostgreSQL row locks, taken in oid order so two
    runs cannot deadlock; SQLite has one writer at a time)."""
    if is_postgres(session) and oids:
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
        r[0]: item_view(r) for r in session.execute(select(*ITEM_COLUMNS).where(col(Item.oid).in_(oids)))
    }
    reps: dict[uuid.UUID, list[ReplicaView]] = defaultdict(list)
    for r in session.execute(select(*REPLICA_COLUMNS).where(col(Replica.item_oid).in_(oids))):
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
    checks: list[Check] = []
    todo = sorted(oids)
    for chunk in chunks(todo):
        checks += map(
            check_of,
            session.execute(
                select(*COPY_COLUMNS)
                .join(Item, col(Item.oid) == col(Replica.item_oid))
                .where(
                    col(Replica.item_oid).in_(chunk),
                    col(Replica.state) == ReplicaState.READY.value,
                    col(Replica.storage_id).in_(list(intact)),
                )
            ),
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
) -> tuple[set[uuid.UUID], int]:
    """Check before delete: confirm on their storages (outside any transaction) the copies
    the claimed deletions rely on: a survivor that is the same posix file as the copy to
    delete (or as another survivor) does not count; the others are listed (one listing per
    storage) and, where the storage keeps no hash of them, re-hashed from their bytes (one
    `rclone hashsum` per storage). Then, in one transaction, mark the missing ones LOST
    (another size or hash: CORRUPTED), re-run the safety check counting only the confirmed
    copies, and give back the claims no longer safe (their previous state, `policy.refused`,
    the reason also put in `refusals`). A storage that cannot be listed confirms nothing and
    marks nothing. Returns the replica uids still claimed (to delete) and the bytes read."""
    confirmed: set[uuid.UUID] = set()
    changes: dict[uuid.UUID, list[ReplicaChange]] = {}
    unlisted: dict[str, str] = {}  # storage name -> why it could not be listed
    found: dict[uuid.UUID, list[str]] = defaultdict(list)  # item -> what the check found
    doomed = {oid: path for oid, _, path in claim.rows.values() if oid in claim.relying}
    twins = same_files(storage, doomed, claim.storages, claim.survivors)
    for c in (c for checks in claim.survivors.values() for c in checks if c.replica_uid in twins):
        found[c.item_oid].append(twins[c.replica_uid])
    read = 0
    for sid, checks in claim.survivors.items():
        st = claim.storages[sid]
        try:
            got = confirm_copies(st, [c for c in checks if c.replica_uid not in twins])
        except DLMError as exc:
            unlisted[st.name] = " ".join(str(exc).split())[:300]
            continue
        confirmed |= {c.replica_uid for c in got.intact}
        read += got.bytes_read
        for c in checks:
            if c.path in got.unread:
                found[c.item_oid].append(f"its copy on {st.name} could not be read ({got.unread[c.path]})")
        if got.changes:
            changes[sid] = got.changes
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
        for ch in damaged:
            where = claim.storages[ch.check.storage_id].name
            found[ch.check.item_oid].append(f"its copy on {where} is {ch.to.value}")
        for sid, checks in claim.survivors.items():
            name = claim.storages[sid].name
            if name in unlisted:
                for c in checks:
                    found[c.item_oid].append(f"{name} could not be listed ({unlisted[name]})")
        events: list[audit.EventRow] = []
        back: dict[str, list[uuid.UUID]] = defaultdict(list)
        for uid, why in refused.items():
            oid, was, _ = claim.rows[uid]
            back[was].append(uid)
            refusals[uid] = f"kept: {why} ({'; '.join(found[oid]) or 'other copies unconfirmed'})"
            events.append(
                {
                    "kind": EventKind.POLICY_REFUSED,
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
    return set(claim.rows) - set(refused), read


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
        stmt = select(
            col(Replica.uid),
            col(Replica.item_oid),
            col(Replica.state),
            col(Replica.path),
            col(Replica.expires_at),
        ).where(
            col(Replica.uid).in_(list(want)),
            # not DELETING: another run holds those (a dead run's are settled by lifecycle.recovery)
            col(Replica.state).in_([ReplicaState.READY.value, ReplicaState.CORRUPTED.value]),
        )
        if is_postgres(s):
            stmt = stmt.with_for_update(skip_locked=True)
        rows = s.execute(stmt).all()
        # a copy deleted for its own expiry goes only if that expiry, as the catalogue has it
        # now, has come: the plan may be seconds old (`dlm run` reuses its idle check's)
        now = utcnow()
        not_due = {
            r[0] for r in rows if want[r[0]].reason == REPLICA_EXPIRED and (r[4] is None or r[4] > now)
        }
        rows = [r for r in rows if r[0] not in not_due]
        _lock_items(s, sorted({r[1] for r in rows}))
        index = StorageIndex(tuple(storage_views(s)))
        allowed, refused, relying = _safe_to_delete(
            s, policy, index, [(r[0], r[1]) for r in rows], batch.expiring
        )
        refused.update(dict.fromkeys(not_due, "the copy's expiry was cleared or moved on"))
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
                    "kind": EventKind.POLICY_REFUSED,
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
        t0 = time.monotonic()
        still, result.read_bytes = _confirm_survivors(
            claim,
            storage,
            want,
            policy=policy,
            expiring=batch.expiring,
            sessions=sessions,
            actor=actor,
            refusals=kept,
        )
        result.stages["confirm"] = time.monotonic() - t0
    result.skipped = len(batch.deletes) - len(still)
    result.errors = {want[u].path: why for u, why in kept.items()}
    if not still:
        return result
    started = time.monotonic()
    paths = {path: uid for uid, (_, _, path) in claim.rows.items() if uid in still}
    not_ours = identity.refusal(storage)  # the root is still this storage's own
    report = (
        delete_files(backend_for(storage).rclone_target(), list(paths))
        if not_ours is None
        else DeleteReport(failed=dict.fromkeys(paths, not_ours))
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
        for chunk in chunks(ok):
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
        events: list[audit.EventRow] = [
            {
                "kind": EventKind.REPLICA_DELETED,
                "item_oid": want[u].item_oid,
                "replica_uid": u,
                "storage_id": batch.storage_id,
                "actor": actor,
                "details": {"path": want[u].path, "reason": want[u].reason, "storage": storage.name},
            }
            for u in ok
        ]
        events += [
            {
                "kind": EventKind.REPLICA_DELETE_FAILED,
                "item_oid": want[u].item_oid,
                "replica_uid": u,
                "storage_id": batch.storage_id,
                "actor": actor,
                "details": {"path": want[u].path, "error": err[:500]},
            }
            for u, err in bad.items()
        ]
        audit.record_many(s, events)
    result.done = len(ok)
    result.failed = len(bad)
    result.bytes = freed
    result.duration_s = duration
    result.errors.update({want[u].path: e for u, e in bad.items()})
    return result
