"""Streams the catalogue into the planners: storage views and per-item groups, prefiltered in SQL.

Each pipeline selects only the items it may act on (items below target, expired items or
copies, items with copies on shedding storages, items matched by aging rules), streams them
in chunks, and loads each chunk's replicas with one query, so planning over millions of
items holds one chunk in memory at a time.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, exists, func, literal, or_, select, text
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col

from lifecycle.catalogue.db import none_of, one_of
from lifecycle.catalogue.models import Item, Location, Replica, Storage
from lifecycle.planning.actions import ItemGroup
from lifecycle.planning.policy import COLD_TIERS, ItemView, Policy, ReplicaView, StorageIndex, StorageView
from lifecycle.states import (
    LIVE_ITEM_STATES,
    LIVE_REPLICA_STATES,
    ItemState,
    Phase,
    ReplicaState,
    StorageKind,
    StorageState,
    Tier,
)

CHUNK = 2000
_INTACT_STORAGE = (StorageState.ONLINE.value, StorageState.DRAINING.value)


def storage_views(session: Session) -> list[StorageView]:
    """Every storage that is not retired, as the planners see it."""
    rows = session.execute(
        select(Storage, col(Location.name))
        .outerjoin(Location, col(Location.id) == col(Storage.location_id))
        .where(col(Storage.state) != StorageState.RETIRED.value)
        .order_by(col(Storage.name))
    ).all()
    return [
        StorageView(
            s.id,
            s.name,
            StorageKind(s.kind),
            Tier(s.tier),
            loc,
            s.capacity_bytes,
            int(s.used_bytes),
            StorageState(s.state),
        )
        for s, loc in rows
    ]


ITEM_COLUMNS = (
    col(Item.oid),
    col(Item.name),
    col(Item.version),
    col(Item.size),
    col(Item.target_phase),
    col(Item.state),
    col(Item.expires_at),
    col(Item.created_at),
    col(Item.checksum),
)


# A copy as the planners see it: uid, item, storage, path, state (a ReplicaView's first five).
REPLICA_COLUMNS = (
    col(Replica.uid),
    col(Replica.item_oid),
    col(Replica.storage_id),
    col(Replica.path),
    col(Replica.state),
)


def item_view(row: Any) -> ItemView:
    return ItemView(
        row[0], row[1], row[2], int(row[3]), Phase(row[4]), ItemState(row[5]), row[6], row[7], row[8]
    )


@dataclass
class PathIndex:
    """(storage_id, path) -> oid of another item's live replica there, for the chunk being planned."""

    owners: dict[tuple[uuid.UUID, str], uuid.UUID] = field(default_factory=dict)
    # the storages a copy may go to (only their paths can collide)
    storages: list[uuid.UUID] = field(default_factory=list)

    def __call__(self, storage_id: uuid.UUID, path: str) -> uuid.UUID | None:
        return self.owners.get((storage_id, path))


def stream_groups(
    session: Session,
    where: ColumnElement[bool] | None,
    *,
    order_by: Sequence[Any] = (),
    limit: int | None = None,
    rule_matchers: Sequence[ColumnElement[bool]] = (),
    path_index: PathIndex | None = None,
    chunk: int = CHUNK,
) -> Iterator[ItemGroup]:
    """Item groups (item, its non-deleted replicas, matched rule indexes) for items matching `where`.

    With `path_index`, the live replicas of other items that use any of the chunk's paths
    are loaded into it before the chunk is yielded (the planners ask it for collisions).
    """
    rule_cols = [case((m, literal(True)), else_=literal(False)) for m in rule_matchers]
    stmt = select(*ITEM_COLUMNS, *rule_cols)
    if where is not None:
        stmt = stmt.where(where)
    stmt = stmt.order_by(*order_by, col(Item.oid))
    if limit is not None:
        stmt = stmt.limit(limit)
    # Core rows (session.connection()): the ORM's per-row processing costs more than the planning
    conn = session.connection()
    result = conn.execute(stmt.execution_options(yield_per=chunk))
    n_rules = len(rule_cols)
    for rows in result.partitions():
        items = [(item_view(r), frozenset(i for i in range(n_rules) if r[9 + i])) for r in rows]
        oids = [iv.oid for iv, _ in items]
        reps: dict[uuid.UUID, list[ReplicaView]] = {o: [] for o in oids}
        paths: set[str] = set()
        for r in conn.execute(
            select(*REPLICA_COLUMNS, col(Replica.expires_at), col(Replica.created_at)).where(
                one_of(conn.dialect.name, col(Replica.item_oid), oids),
                col(Replica.state).notin_([ReplicaState.DELETED.value]),
            )
        ).all():
            reps[r[1]].append(ReplicaView(r[0], r[1], r[2], r[3], ReplicaState(r[4]), r[5], r[6]))
            paths.add(r[3])
        if path_index is not None:
            path_index.owners.clear()
            for sid, path, oid in conn.execute(
                select(col(Replica.storage_id), col(Replica.path), col(Replica.item_oid)).where(
                    # (storage_id, path) leads the index ix_replica_storage_path
                    col(Replica.storage_id).in_(path_index.storages),
                    one_of(conn.dialect.name, col(Replica.path), list(paths)),
                    col(Replica.state).in_(LIVE_REPLICA_STATES),
                    # an item's own copies never block it: only other items' rows matter
                    none_of(conn.dialect.name, col(Replica.item_oid), oids),
                )
            ).all():
                path_index.owners[(sid, path)] = oid
        for iv, matched in items:
            yield ItemGroup(iv, tuple(reps[iv.oid]), matched)


def _required(policy: Policy) -> Any:
    return case(
        (col(Item.target_phase) == Phase.SOLID.value, policy.copies[3]),
        (col(Item.target_phase) == Phase.LIQUID.value, policy.copies[2]),
        (col(Item.target_phase) == Phase.GAS.value, policy.copies[1]),
        else_=policy.copies[0],
    )


def _copy_stats(storages: Sequence[StorageView]) -> Any:
    """Per item: copies that count (READY on online/draining storages, or in flight to online
    ones), distinct locations among them, and whether one is on a cold or archive tier.

    The storages are few, so their facts go into the query as literal id lists and a CASE
    (no join with the storage table): one hash aggregate over the replica rows."""
    intact = [s.id for s in storages if s.state in (StorageState.ONLINE, StorageState.DRAINING)]
    online = [s.id for s in storages if s.state == StorageState.ONLINE]
    cold = [s.id for s in intact_views(storages) if s.tier in COLD_TIERS]
    sid = col(Replica.storage_id)
    counts = or_(
        and_(col(Replica.state) == ReplicaState.READY.value, sid.in_(intact)),
        and_(
            col(Replica.state).in_([ReplicaState.PENDING.value, ReplicaState.COPYING.value]),
            sid.in_(online),
        ),
    )
    # distinct locations as a sum of per-location "any copy there" flags: no DISTINCT, so the
    # aggregate can run partially in parallel workers
    sites: dict[str, list[uuid.UUID]] = {}
    for s in storages:
        if s.location is not None:
            sites.setdefault(s.location, []).append(s.id)
    n_loc = (
        sum((func.max(case((sid.in_(ids), 1), else_=0)) for ids in sites.values()), literal(0))
        if sites
        else literal(0)
    )
    return (
        select(
            col(Replica.item_oid).label("item_oid"),
            func.count().label("n"),
            n_loc.label("n_loc"),
            func.max(case((sid.in_(cold), 1), else_=0)).label("cold") if cold else literal(0).label("cold"),
        )
        .where(
            col(Replica.state).in_(
                [ReplicaState.READY.value, ReplicaState.PENDING.value, ReplicaState.COPYING.value]
            ),
            counts,
        )
        .group_by(col(Replica.item_oid))
        .subquery()
    )


def intact_views(storages: Sequence[StorageView]) -> list[StorageView]:
    return [s for s in storages if s.state in (StorageState.ONLINE, StorageState.DRAINING)]


def replicate_groups(
    session: Session,
    policy: Policy,
    index: StorageIndex,
    *,
    now: datetime,
    only: Sequence[uuid.UUID] | None = None,
    limit: int | None = None,
    path_index: PathIndex | None = None,
) -> Iterator[ItemGroup]:
    """READY, unexpired items whose counted copies are fewer than their phase needs, or SOLID
    items short of a second location or a cold copy (where those exist)."""
    stats = _copy_stats(index.storages)
    n = func.coalesce(stats.c.n, 0)
    below: ColumnElement[bool] = n < _required(policy)
    solid_extra = []
    if index.multi_location:
        solid_extra.append(func.coalesce(stats.c.n_loc, 0) < 2)
    if index.has_cold:
        solid_extra.append(func.coalesce(stats.c.cold, 0) == 0)
    if solid_extra:
        below = or_(below, and_(col(Item.target_phase) == Phase.SOLID.value, or_(*solid_extra)))
    where = and_(
        col(Item.state) == ItemState.READY.value,
        or_(col(Item.expires_at).is_(None), col(Item.expires_at) > now),
        below,
    )
    if only is not None:
        where = and_(where, col(Item.oid).in_(list(only)))
    subq_oids = (
        select(col(Item.oid))
        .outerjoin(stats, stats.c.item_oid == col(Item.oid))
        .where(where)
        .scalar_subquery()
    )
    if session.get_bind().dialect.name == "postgresql":
        # A parallel plan recomputes the per-item aggregate in every worker (EXPLAIN: loops=3,
        # 2.9 s over 2M replicas); the serial plan merges item and replica by oid in one
        # stream (1.6 s). For this planning transaction only.
        session.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))
    return stream_groups(session, col(Item.oid).in_(subq_oids), limit=limit, path_index=path_index)


def expire_groups(session: Session, *, now: datetime, limit: int | None = None) -> Iterator[ItemGroup]:
    """Items that are due (or EXPIRED with copies left) and items with an expired copy."""
    due_item = or_(
        col(Item.state) == ItemState.EXPIRED.value,
        and_(
            col(Item.state).in_([s.value for s in LIVE_ITEM_STATES]),
            col(Item.expires_at).is_not(None),
            col(Item.expires_at) <= now,
        ),
    )
    due_copy = exists().where(
        col(Replica.item_oid) == col(Item.oid),
        col(Replica.expires_at).is_not(None),
        col(Replica.expires_at) <= now,
        col(Replica.state).in_([ReplicaState.READY.value, ReplicaState.CORRUPTED.value]),
    )
    return stream_groups(
        session,
        or_(due_item, and_(col(Item.state).in_([s.value for s in LIVE_ITEM_STATES]), due_copy)),
        limit=limit,
    )


def migrate_groups(
    session: Session,
    policy: Policy,
    *,
    now: datetime,
    compile_rule: Callable[[str], ColumnElement[bool]],
    limit: int | None = None,
    path_index: PathIndex | None = None,
) -> Iterator[ItemGroup]:
    """Live items matched by a matured aging rule, and items holding more READY copies than
    their phase needs (surplus to drop)."""
    matchers = [
        and_(compile_rule(rule.where), col(Item.created_at) <= now - rule.older_than) for rule in policy.rules
    ]
    ready = (
        select(col(Replica.item_oid).label("item_oid"), func.count().label("n"))
        .where(col(Replica.state) == ReplicaState.READY.value)
        .group_by(col(Replica.item_oid))
        .subquery()
    )
    surplus = col(Item.oid).in_(
        select(ready.c.item_oid)
        .join(Item, col(Item.oid) == ready.c.item_oid)
        .where(ready.c.n > _required(policy))
    )
    candidates = [surplus, *matchers]
    where = and_(col(Item.state) == ItemState.READY.value, or_(*candidates))
    return stream_groups(session, where, rule_matchers=matchers, limit=limit, path_index=path_index)


def rebalance_groups(
    session: Session,
    shedding: Sequence[uuid.UUID],
    *,
    limit: int | None = None,
    path_index: PathIndex | None = None,
) -> Iterator[ItemGroup]:
    """Items with a live copy on a shedding storage (over high water, or draining), largest first."""
    if not shedding:
        return iter(())
    on_shedding = exists().where(
        col(Replica.item_oid) == col(Item.oid),
        col(Replica.storage_id).in_(list(shedding)),
        col(Replica.state).in_(LIVE_REPLICA_STATES),
    )
    return stream_groups(
        session,
        on_shedding,
        order_by=[col(Item.size).desc()],
        limit=limit,
        path_index=path_index,
    )


def shedding_storages(storages: Sequence[StorageView], policy: Policy) -> list[uuid.UUID]:
    """Draining storages and online storages above the high-water mark."""
    return [
        s.id
        for s in storages
        if s.state == StorageState.DRAINING
        or (
            s.state == StorageState.ONLINE
            and s.capacity_bytes is not None
            and s.used_bytes > policy.high_water * s.capacity_bytes
        )
    ]
