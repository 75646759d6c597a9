"""Apply the plan actions that change only the catalogue: expiry, phase changes, refusals,
drained storages, and deleting an item now.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from enum import StrEnum

from sqlalchemy import ColumnElement, and_, select, update
from sqlmodel import Session, col

from lifecycle.apply.delete import apply_delete_batch
from lifecycle.apply.result import BatchResult
from lifecycle.catalogue import audit
from lifecycle.catalogue.models import Event, Item, Replica, Storage, utcnow
from lifecycle.catalogue.sql import SessionFactory, chunks, default_sessions
from lifecycle.errors import ItemNotFoundError, PolicyViolationError
from lifecycle.planning.actions import (
    DeleteReplica,
    Drained,
    ExpireItem,
    Refusal,
    SetPhase,
)
from lifecycle.planning.plan import Plan, batch_deletes
from lifecycle.planning.policy import (
    Policy,
)
from lifecycle.reports import Settled
from lifecycle.states import (
    LIVE_ITEM_STATES,
    EventKind,
    ItemState,
    Phase,
    ReplicaState,
    StorageState,
)

# --------------------------------------------------------------------------- catalogue-only actions


class SettleStage(StrEnum):
    """When a run applies its catalogue-only actions: before its copies and deletions, or after."""

    BEFORE = "before"  # expiries (their copies are deleted next), phase changes
    AFTER = "after"  # tombstones for items with no copy left, refusals, drained storages


def settle_plan(plan: Plan, stage: SettleStage, *, session: Session, actor: str) -> Settled:
    """Apply the plan's catalogue-only actions of `stage`; the other stage's counts stay 0."""
    if stage is SettleStage.BEFORE:
        return Settled(
            # the plan may be seconds old (`dlm run` reuses its idle check's): an item whose
            # expiry was cleared or moved on since is not expired
            expired=mark_expired(session, plan.expires, actor=actor, due=utcnow()),
            phase_changes=apply_phase_changes(session, plan.phases, actor=actor),
        )
    return Settled(
        deleted_items=finish_expired(session, actor=actor),
        refusals=record_refusals(session, plan.refusals, actor=actor),
        drained=record_drained(session, plan.drained, actor=actor),
    )


def mark_expired(
    session: Session, expires: Sequence[ExpireItem], *, actor: str, due: datetime | None = None
) -> int:
    """Live items whose expiry came go EXPIRED (their copies are deleted next). With `due`,
    only those whose expiry time, as the catalogue has it now, is at or before `due`."""
    oids = [e.item_oid for e in expires]
    if not oids:
        return 0
    where: list[ColumnElement[bool]] = [
        col(Item.oid).in_(oids),
        col(Item.state).in_([s.value for s in LIVE_ITEM_STATES]),
    ]
    if due is not None:
        where += [col(Item.expires_at).is_not(None), col(Item.expires_at) <= due]
    done = session.execute(
        update(Item)
        .where(*where)
        .values(state=ItemState.EXPIRED.value, updated_at=utcnow())
        .returning(col(Item.oid))
    ).all()
    reasons = {e.item_oid: e.reason for e in expires}
    audit.record_many(
        session,
        [
            {
                "kind": EventKind.ITEM_EXPIRED,
                "item_oid": r[0],
                "actor": actor,
                "details": {"reason": reasons[r[0]]},
            }
            for r in done
        ],
    )
    return len(done)


def expired_among(session: Session, oids: Collection[uuid.UUID]) -> set[uuid.UUID]:
    """Which of `oids` the catalogue has EXPIRED or DELETED now (bulk, by chunks)."""
    gone = [ItemState.EXPIRED.value, ItemState.DELETED.value]
    found: set[uuid.UUID] = set()
    for chunk in chunks(sorted(oids), 5000):
        found.update(
            session.execute(
                select(col(Item.oid)).where(col(Item.oid).in_(chunk), col(Item.state).in_(gone))
            ).scalars()
        )
    return found


def _expired_without_copies() -> ColumnElement[bool]:
    """EXPIRED items with no live copy left: what finish_expired tombstones."""
    live_copy = (
        select(col(Replica.item_oid))
        .where(col(Replica.state).notin_([ReplicaState.DELETED.value, ReplicaState.LOST.value]))
        .where(col(Replica.item_oid) == col(Item.oid))
        .exists()
    )
    return and_(col(Item.state) == ItemState.EXPIRED.value, ~live_copy)


def expired_to_finish(session: Session) -> bool:
    """Whether finish_expired has an item to tombstone (reads only)."""
    found = session.execute(select(col(Item.oid)).where(_expired_without_copies()).limit(1)).first()
    return found is not None


def finish_expired(session: Session, *, actor: str) -> int:
    """EXPIRED items with no copy left become DELETED tombstones."""
    done = session.execute(
        update(Item)
        .where(_expired_without_copies())
        .values(state=ItemState.DELETED.value, updated_at=utcnow())
        .returning(col(Item.oid), col(Item.name), col(Item.version))
    ).all()
    audit.record_many(
        session,
        [
            {
                "kind": EventKind.ITEM_DELETED,
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
                EventKind.ITEM_PHASE_CHANGED,
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
                "kind": EventKind.POLICY_REFUSED,
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
        if last is None or last.kind != EventKind.STORAGE_DRAINED:
            audit.record(
                session,
                EventKind.STORAGE_DRAINED,
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
