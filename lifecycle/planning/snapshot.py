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
from datetime import UTC, datetime
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import DateTime as SADateTime
from sqlalchemy import and_, case, exists, func, literal, or_, select, text, true, type_coerce
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col

from lifecycle.catalogue.db import one_of
from lifecycle.catalogue.models import Item, Location, Replica, Storage, UTCDateTime
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
    """(storage_id, path) -> oid of another item's live replica there, for the chunk being planned.

    Filled by the stream before it yields each chunk: the live replicas (PENDING, COPYING,
    READY, DELETING) on `storages`, at any path of the chunk's replicas, of any item (the chunk's
    own items included: one of them may hold the path another's copy would take).
    """

    owners: dict[tuple[uuid.UUID, str], uuid.UUID] = field(default_factory=dict)
    # the storages a copy may go to (only their paths can collide)
    storages: list[uuid.UUID] = field(default_factory=list)

    def __call__(self, storage_id: uuid.UUID, path: str) -> uuid.UUID | None:
        return self.owners.get((storage_id, path))


_ETC_UTC, _ZONE_UTC = ZoneInfo("Etc/UTC"), ZoneInfo("UTC")  # ZoneInfo instances are cached: one each
_PHASES = {p.value: p for p in Phase}
_ITEM_STATES = {s.value: s for s in ItemState}
_REPLICA_STATES = {s.value: s for s in ReplicaState}


def stream_groups(
    session: Session,
    where: ColumnElement[bool] | None,
    *,
    sort_keys: Sequence[tuple[Any, bool]] = (),
    limit: int | None = None,
    rule_matchers: Sequence[ColumnElement[bool]] = (),
    path_index: PathIndex | None = None,
    chunk: int | None = None,
    source: Any = None,
) -> Iterator[ItemGroup]:
    """Item groups (item, its non-deleted replicas, matched rule indexes) for items matching `where`.

    One statement, streamed: the candidate items (`where` over `source`, default the item
    table), each with its replica rows (a LEFT JOIN: an item without any comes alone), ordered
    by `sort_keys` (column, descending), oid, then replica uid, so an item's rows come together.
    On PostgreSQL the replicas are one probe of ix_replica_item per candidate (LATERAL), and
    the candidates, selected in oid order, need no sort (no per-chunk query by oid list).

    With `path_index`, the live replicas on `path_index.storages` at any path of a chunk's
    items are loaded into it before the chunk is yielded (the planners ask it for
    collisions), leaving out the rows of the chunk's own items.
    """
    chunk = chunk or CHUNK
    conn = session.connection()
    dialect = conn.dialect.name
    item_cols: list[Any] = list(ITEM_COLUMNS)
    r = sa_table(Replica).alias("r")
    rep_cols: list[Any] = [r.c.uid, r.c.storage_id, r.c.path, r.c.state, r.c.expires_at, r.c.created_at]
    if dialect == "postgresql":
        # psycopg returns aware datetimes already: no per-value conversion (UTCDateTime's
        # result processing is 0.9 s of the expire plan); made UTC below only if not UTC
        item_cols = [_plain_datetime(c) for c in item_cols]
        rep_cols = [_plain_datetime(c) for c in rep_cols]
    rule_cols = [case((m, literal(True)), else_=literal(False)) for m in rule_matchers]
    key_cols = [c.label(f"key_{i}") for i, (c, _) in enumerate(sort_keys)]
    cand_stmt = select(*item_cols, *rule_cols, *key_cols)
    if source is not None:
        cand_stmt = cand_stmt.select_from(source)
    if where is not None:
        cand_stmt = cand_stmt.where(where)
    if limit is not None:
        cand_stmt = cand_stmt.order_by(*_ordering(sort_keys, key_cols), col(Item.oid)).limit(limit)
    cand = cand_stmt.subquery("cand")
    n_item = len(item_cols)
    n_rules = len(rule_cols)
    cand_cols = list(cand.c)[: n_item + n_rules]
    keys = [cand.c[f"key_{i}"] for i in range(len(key_cols))]
    alive = r.c.state != ReplicaState.DELETED.value
    if dialect == "postgresql":
        # A probe of ix_replica_item per candidate, whatever the candidates' estimate (that of
        # a filter on an aggregate is far off: 300,000 for 50,000): a join the planner may turn
        # into a merge reads the whole replica index. OFFSET 0 keeps the subquery a subquery.
        per_item = select(*rep_cols).where(r.c.item_oid == cand.c.oid, alive).offset(0).lateral("x")
        joined = cand.outerjoin(per_item, true())
        rep_out = list(per_item.c)
    else:
        joined = cand.outerjoin(r, and_(r.c.item_oid == cand.c.oid, alive))
        rep_out = rep_cols
    stmt = (
        select(*cand_cols, *rep_out)
        .select_from(joined)
        .order_by(*_ordering(sort_keys, keys), cand.c.oid, rep_out[0])
    )
    if dialect == "postgresql":
        _tune_planning_transaction(session)
    result = conn.execute(stmt.execution_options(yield_per=chunk))
    o_rep = n_item + n_rules
    phases, item_states, replica_states = _PHASES, _ITEM_STATES, _REPLICA_STATES
    utc = _utc
    groups: list[ItemGroup] = []
    item: ItemView | None = None
    matched: frozenset[int] = frozenset()
    replicas: list[ReplicaView] = []
    no_rules: frozenset[int] = frozenset()
    for rows in result.partitions():
        for row in rows:
            oid = row[0]
            if item is None or oid != item.oid:
                if item is not None:
                    groups.append(ItemGroup(item, tuple(replicas), matched))
                    replicas = []
                    if len(groups) >= chunk:
                        yield from _with_paths(conn, groups, path_index)
                        groups = []
                item = ItemView(
                    oid,
                    row[1],
                    row[2],
                    int(row[3]),
                    phases[row[4]],
                    item_states[row[5]],
                    utc(row[6]),
                    cast(datetime, utc(row[7])),
                    row[8],
                )
                matched = frozenset(i for i in range(n_rules) if row[9 + i]) if n_rules else no_rules
            uid = row[o_rep]
            if uid is not None:
                replicas.append(
                    ReplicaView(
                        uid,
                        oid,
                        row[o_rep + 1],
                        row[o_rep + 2],
                        replica_states[row[o_rep + 3]],
                        utc(row[o_rep + 4]),
                        utc(row[o_rep + 5]),
                    )
                )
    if item is not None:
        groups.append(ItemGroup(item, tuple(replicas), matched))
    yield from _with_paths(conn, groups, path_index)


def _ordering(sort_keys: Sequence[tuple[Any, bool]], cols: Sequence[Any]) -> list[Any]:
    return [c.desc() if desc else c for c, (_, desc) in zip(cols, sort_keys, strict=True)]


def _plain_datetime(column: Any) -> Any:
    """The column read as the driver returns it, if it is a UTCDateTime (no result processing)."""
    if isinstance(column.type, UTCDateTime):
        return type_coerce(column, SADateTime(timezone=True)).label(column.key)
    return column


def _utc(value: datetime | None) -> datetime | None:
    """An aware datetime at UTC, as UTCDateTime reads it. Values psycopg reads in a UTC session
    (tzinfo ZoneInfo('Etc/UTC') or 'UTC') are the same instants at offset 0: kept as they are."""
    if value is None:
        return None
    tz = value.tzinfo
    if tz is UTC or tz is _ETC_UTC or tz is _ZONE_UTC:
        return value
    if tz is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _with_paths(conn: Any, groups: list[ItemGroup], path_index: PathIndex | None) -> list[ItemGroup]:
    """The groups, after loading into `path_index` the live rows on its storages at their paths."""
    if path_index is None or not groups:
        return groups
    path_index.owners.clear()
    if not path_index.storages:
        return groups
    paths = {r.path for g in groups for r in g.replicas}
    if not paths:
        return groups
    dialect = conn.dialect.name
    for sid, path, oid in conn.execute(
        select(col(Replica.storage_id), col(Replica.path), col(Replica.item_oid)).where(
            # (storage_id, path) leads the index uq_replica_storage_path_live
            one_of(dialect, col(Replica.storage_id), path_index.storages),
            one_of(dialect, col(Replica.path), sorted(paths)),
            col(Replica.state).in_(LIVE_REPLICA_STATES),
            # every item's rows, the chunk's own included: another item of the same chunk may
            # hold the path a copy would take (the planners skip only owner == the item itself)
        )
    ).all():
        path_index.owners[(sid, path)] = oid
    return groups


def _tune_planning_transaction(session: Session) -> None:
    """Settings for this planning transaction only (SET LOCAL), on PostgreSQL.

    No JIT: its compilation cost (up to 0.6 s at 1M items, for the expire query whose cost
    estimate is high) is never won back by a stream this short. No parallel workers: a
    parallel plan recomputes the per-item aggregate in every worker (EXPLAIN: loops=3,
    2.9 s over 2M replicas), while the serial plan merges item and replica by oid in one
    stream (1.6 s).
    """
    session.execute(text("SET LOCAL jit = off"))
    session.execute(text("SET LOCAL max_parallel_workers_per_gather = 0"))


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


def sa_table(model: Any) -> Any:
    """The Core table of a table model."""
    return model.__table__


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
    # the item table joined with the per-item aggregate directly (PostgreSQL merges the two in
    # oid order): not `oid IN (subquery)`, which scans the item table a second time
    source = sa_table(Item).outerjoin(stats, stats.c.item_oid == col(Item.oid))
    return stream_groups(session, where, source=source, limit=limit, path_index=path_index)


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
    # surplus: more READY copies than the phase needs (an item without READY copies has none)
    surplus = func.coalesce(ready.c.n, 0) > _required(policy)
    where = and_(col(Item.state) == ItemState.READY.value, or_(surplus, *matchers))
    source = sa_table(Item).outerjoin(ready, ready.c.item_oid == col(Item.oid))
    return stream_groups(
        session, where, source=source, rule_matchers=matchers, limit=limit, path_index=path_index
    )


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
        sort_keys=[(col(Item.size), True)],
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
