"""Settle the catalogue after copies change: item states from their replicas, and bulk
replica state changes with their events.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import aliased
from sqlmodel import Session, col

from lifecycle.catalogue import audit
from lifecycle.catalogue.models import Item, Replica, Storage, utcnow
from lifecycle.catalogue.sql import chunks
from lifecycle.states import (
    EventKind,
    ItemState,
    ReplicaState,
)


def no_other_live_copy() -> ColumnElement[bool]:
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


# --------------------------------------------------------------------------- settling items


def settle_items(session: Session, oids: Iterable[uuid.UUID], *, actor: str) -> tuple[int, int]:
    """Of `oids`: READY items with no READY copy left become CORRUPTED (`item.corrupted`);
    CORRUPTED items with a READY copy again become READY (`item.repaired`). Returns
    (corrupted, repaired)."""
    todo = sorted(set(oids))
    events: list[audit.EventRow] = []
    now = utcnow()
    has_ready = (
        select(col(Replica.uid))
        .where(col(Replica.item_oid) == col(Item.oid), col(Replica.state) == ReplicaState.READY.value)
        .exists()
    )
    corrupted = repaired = 0
    for chunk in chunks(todo):
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
                "kind": EventKind.ITEM_CORRUPTED,
                "item_oid": oid,
                "actor": actor,
                "details": {"name": name, "version": version, "reason": "no intact copy left"},
            }
            for oid, name, version in lost_all
        ]
        events += [
            {
                "kind": EventKind.ITEM_REPAIRED,
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
    kind: EventKind | None
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
        for chunk in chunks(list(by_uid)):
            values: dict[str, Any] = {"state": to.value, "updated_at": now}
            if to == ReplicaState.READY:
                values["verified_at"] = now
            stmt = update(Replica).where(col(Replica.uid).in_(chunk), col(Replica.state) == was.value)
            if was == ReplicaState.LOST:
                stmt = stmt.where(no_other_live_copy())
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


# A copy to check, confirm or repair: uid, item, storage, path, state, and the item's size and
# checksum (select them joined with Item; `check_of` makes the row a Check).
COPY_COLUMNS = (
    col(Replica.uid),
    col(Replica.item_oid),
    col(Replica.storage_id),
    col(Replica.path),
    col(Replica.state),
    col(Item.size),
    col(Item.checksum),
    col(Item.checksum_algo),
)


def check_of(row: Sequence[Any]) -> Check:
    """The Check of a row that starts with COPY_COLUMNS (no checksum: "", no algorithm: md5)."""
    uid, oid, sid, path, state, size, checksum, algo = row[:8]
    return Check(uid, oid, sid, path, int(size), checksum or "", algo or "md5", ReplicaState(state))
