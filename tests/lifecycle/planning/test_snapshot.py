"""The catalogue stream the planners read (lifecycle.planning.snapshot), on SQLite and PostgreSQL.

make_plan reads only the items a pipeline may act on, each with its replicas and the paths
other items hold, in one streamed statement. Its plan must be the plan of the same planner fed
every item of the catalogue with all its non-deleted replicas and every other item's live
rows (the prefilter only leaves out items the planner would do nothing with), edge cases
included: items without replicas, copies PENDING/COPYING/DELETING/LOST/CORRUPTED/DELETED,
expired items and copies, offline, draining and over-full storages, aging rules, paths
held by other items.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlmodel import Session, col

from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Item, Replica, Storage, StorageCreate
from lifecycle.catalogue.query_sql import compile_filter
from lifecycle.catalogue.storages import add_storage, set_storage_state
from lifecycle.planning.actions import Action, ItemGroup
from lifecycle.planning.expire import ExpirePlanner
from lifecycle.planning.pipelines import make_plan
from lifecycle.planning.plan import Plan
from lifecycle.planning.planner import MigratePlanner, ReplicatePlanner
from lifecycle.planning.policy import AgingRule, ItemView, Policy, ReplicaView
from lifecycle.planning.rebalance import RebalancePlanner
from lifecycle.planning.snapshot import shedding_storages, storage_views
from lifecycle.states import (
    LIVE_REPLICA_STATES,
    ItemState,
    Phase,
    ReplicaState,
    StorageState,
    Tier,
)

NOW = datetime(2030, 6, 1, tzinfo=UTC)
PAST = NOW - timedelta(days=2)
FUTURE = NOW + timedelta(days=30)

# name, kind, tier, location, state, capacity
STORAGES = (
    ("hot-a", "posix", "hot", "site-a", "online", None),
    ("hot-b", "posix", "hot", "site-a", "online", 10**9),
    ("warm-b", "s3", "warm", "site-b", "online", None),
    ("cold-c", "s3", "cold", "site-c", "online", None),
    ("full", "s3", "warm", "site-b", "online", 10_000),  # over high water once loaded
    ("drain", "posix", "hot", "site-a", "draining", None),
    ("off", "posix", "hot", "site-a", "offline", None),
)
R, P, C, D, X, L, K = (
    ReplicaState.READY,
    ReplicaState.PENDING,
    ReplicaState.COPYING,
    ReplicaState.DELETING,
    ReplicaState.DELETED,
    ReplicaState.LOST,
    ReplicaState.CORRUPTED,
)

# Items: (phase, state, expires_at, created days ago, kind meta, [(storage, replica state, expires_at)]).
CASES: tuple[tuple[Phase, ItemState, datetime | None, int, str, list[tuple[str, ReplicaState, Any]]], ...] = (
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", []),  # no replicas at all
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("hot-a", R, None)]),  # below target
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("hot-a", R, None), ("warm-b", R, None)]),  # at target
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("hot-a", R, None), ("warm-b", P, None)]),  # in flight
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("hot-a", R, None), ("warm-b", C, None)]),
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("hot-a", R, None), ("warm-b", D, None)]),
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("hot-a", R, None), ("warm-b", X, None)]),  # history
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("hot-a", R, None), ("warm-b", L, None)]),
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("hot-a", R, None), ("warm-b", K, None)]),
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("off", R, None)]),  # only copy offline
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("off", R, None), ("hot-a", P, None)]),
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("drain", R, None)]),  # only copy draining
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("drain", R, None), ("hot-a", R, None)]),
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("full", R, None), ("hot-a", R, None)]),
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("full", R, None), ("drain", R, None)]),
    (Phase.LIQUID, ItemState.READY, PAST, 1, "raw", [("hot-a", R, None), ("warm-b", R, None)]),  # expired
    (Phase.LIQUID, ItemState.READY, PAST, 1, "raw", [("hot-a", R, None)]),
    (Phase.LIQUID, ItemState.READY, FUTURE, 1, "raw", [("hot-a", R, None)]),  # expires later
    (Phase.LIQUID, ItemState.EXPIRED, PAST, 1, "raw", [("hot-a", R, None), ("warm-b", D, None)]),
    (Phase.LIQUID, ItemState.INITIALISED, PAST, 1, "raw", [("hot-a", P, None)]),
    (Phase.LIQUID, ItemState.CORRUPTED, None, 1, "raw", [("hot-a", K, None)]),
    (Phase.LIQUID, ItemState.DELETED, None, 1, "raw", [("hot-a", X, None)]),
    (
        Phase.LIQUID,
        ItemState.READY,
        None,
        1,
        "raw",
        [("hot-a", R, PAST), ("warm-b", R, None)],
    ),  # copy expired
    (
        Phase.LIQUID,
        ItemState.READY,
        None,
        1,
        "raw",
        [("hot-a", R, PAST), ("warm-b", R, None), ("cold-c", R, None)],
    ),
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("hot-a", K, PAST), ("warm-b", R, None)]),
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("off", R, PAST), ("warm-b", R, None)]),
    (Phase.LIQUID, ItemState.READY, None, 1, "raw", [("hot-a", R, FUTURE), ("warm-b", R, None)]),
    (
        Phase.LIQUID,
        ItemState.READY,
        None,
        1,
        "raw",
        [("hot-a", R, None), ("warm-b", R, None), ("cold-c", R, None)],
    ),
    (
        Phase.SOLID,
        ItemState.READY,
        None,
        1,
        "raw",
        [("hot-a", R, None), ("warm-b", R, None), ("cold-c", R, None)],
    ),
    (
        Phase.SOLID,
        ItemState.READY,
        None,
        1,
        "raw",
        [("hot-a", R, None), ("hot-b", R, None), ("warm-b", R, None)],
    ),
    (
        Phase.SOLID,
        ItemState.READY,
        None,
        1,
        "raw",
        [("hot-a", R, None), ("hot-b", R, None), ("drain", R, None)],
    ),
    (Phase.GAS, ItemState.READY, None, 1, "raw", [("hot-a", R, None), ("warm-b", R, None)]),  # surplus
    (Phase.PLASMA, ItemState.READY, None, 1, "raw", [("hot-a", R, PAST)]),
    (Phase.LIQUID, ItemState.READY, None, 90, "old", [("hot-a", R, None), ("warm-b", R, None)]),  # aging rule
    (
        Phase.LIQUID,
        ItemState.READY,
        None,
        90,
        "old",
        [("hot-a", R, None), ("cold-c", R, None), ("warm-b", R, None)],
    ),
    (Phase.LIQUID, ItemState.READY, None, 10, "old", [("hot-a", R, None)]),  # not old enough
)


@pytest.fixture
def catalogue(db_url: str) -> Iterator[dict[str, uuid.UUID]]:
    ids: dict[str, uuid.UUID] = {}
    with session_scope() as s:
        for name, kind, tier, location, _, capacity in STORAGES:
            root = f"/data/{name}" if kind == "posix" else f"bucket-{name}"
            st = add_storage(
                StorageCreate(name=name, kind=kind, root=root, tier=tier, location=location),
                check=False,
                session=s,
            )
            ids[name] = st.id
            if capacity is not None:
                s.execute(update(Storage).where(col(Storage.id) == st.id).values(capacity_bytes=capacity))
        for name, *_, state, _cap in STORAGES:
            if state != "online":
                set_storage_state(name, StorageState(state), session=s)
        n = 0
        for rep in range(3):  # each case three times, with sizes that differ (rebalance's order)
            for phase, state, expires, age, kind, copies in CASES:
                n += 1
                item = Item(
                    name=f"run/obs{n:04d}.fits",
                    size=1000 + (n * 7919) % 5000,
                    target_phase=phase,
                    state=state,
                    expires_at=expires,
                    created_at=NOW - timedelta(days=age),
                    meta={"kind": kind, "rep": rep},
                    checksum=f"{n:032x}",
                )
                s.add(item)
                s.flush()
                for where, rstate, rexp in copies:
                    s.add(
                        Replica(
                            item_oid=item.oid,
                            storage_id=ids[where],
                            path=item.name,
                            state=rstate,
                            expires_at=rexp,
                        )
                    )
        # Items at target that hold, on other storages, the paths of items that need a copy:
        # the planners must not copy onto them (nor count them as the other item's copies).
        for target, where in (
            ("run/obs0002.fits", "hot-b"),
            ("run/obs0002.fits", "warm-b"),
            ("run/obs0012.fits", "hot-b"),
        ):
            holder = Item(
                name=f"holder-{where}-{target}", size=10, target_phase=Phase.GAS, state=ItemState.READY
            )
            s.add(holder)
            s.flush()
            s.add(Replica(item_oid=holder.oid, storage_id=ids[where], path=target, state=R))
        # A holder that itself needs a copy, so it is planned in the same chunk as the item
        # whose path it holds: its row must still count against that item.
        for rep in (1, 2):
            target = f"run/obs{2 + rep * len(CASES):04d}.fits"
            holder = Item(
                name=f"holder-candidate-{rep}", size=10, target_phase=Phase.LIQUID, state=ItemState.READY
            )
            s.add(holder)
            s.flush()
            s.add(Replica(item_oid=holder.oid, storage_id=ids["warm-b"], path=target, state=R))
        s.flush()
        used = dict.fromkeys(ids.values(), 0)
        for sid, size in s.execute(
            select(col(Replica.storage_id), col(Item.size))
            .join(Item, col(Item.oid) == col(Replica.item_oid))
            .where(col(Replica.state) == R.value)
        ):
            used[sid] += size
        for sid, b in used.items():
            s.execute(update(Storage).where(col(Storage.id) == sid).values(used_bytes=b))
    yield ids


POLICY = Policy(
    rules=(
        AgingRule(
            where="meta.kind = 'old'",
            older_than=timedelta(days=30),
            phase=Phase.SOLID,
            drop_tiers=frozenset({Tier.HOT}),
        ),
    ),
    high_water=0.5,
    low_water=0.4,
)


def _every_group(s: Session, *, by_size: bool = False) -> list[ItemGroup]:
    """Every item with all its non-deleted replicas (by uid), and the rules it matches."""
    matched = {
        i: set(
            s.execute(
                select(col(Item.oid)).where(
                    compile_filter(rule.where, now=NOW), col(Item.created_at) <= NOW - rule.older_than
                )
            ).scalars()
        )
        for i, rule in enumerate(POLICY.rules)
    }
    reps: dict[uuid.UUID, list[ReplicaView]] = {}
    for r in s.execute(select(Replica).order_by(col(Replica.uid))).scalars():
        if r.state != ReplicaState.DELETED:
            reps.setdefault(r.item_oid, []).append(
                ReplicaView(
                    r.uid, r.item_oid, r.storage_id, r.path, ReplicaState(r.state), r.expires_at, r.created_at
                )
            )
    items = list(s.execute(select(Item)).scalars())
    items.sort(key=lambda i: (-i.size, i.oid) if by_size else (0, i.oid))
    return [
        ItemGroup(
            ItemView(
                i.oid,
                i.name,
                i.version,
                i.size,
                Phase(i.target_phase),
                ItemState(i.state),
                i.expires_at,
                i.created_at,
                i.checksum,
            ),
            tuple(reps.get(i.oid, ())),
            frozenset(k for k, oids in matched.items() if i.oid in oids),
        )
        for i in items
    ]


def _reference(pipeline: str) -> list[Action]:
    """The plan of the planner fed the whole catalogue (every path known; for migrate, the
    items it acts on, picked in Python)."""
    with session_scope() as s:
        storages = storage_views(s)
        online = {v.id for v in storages if v.state == StorageState.ONLINE}
        owners = {
            (r.storage_id, r.path): r.item_oid
            for r in s.execute(select(Replica)).scalars()
            if r.state in LIVE_REPLICA_STATES and r.storage_id in online
        }
        groups = _every_group(s, by_size=pipeline == "rebalance")
    if pipeline == "migrate":
        # migrate acts on READY items with surplus READY copies or a matured rule (the rest,
        # short of copies, are replicate's): the same items, told apart in Python
        groups = [
            g
            for g in groups
            if g.item.state == ItemState.READY
            and (
                g.matched_rules
                or sum(r.state == ReplicaState.READY for r in g.replicas)
                > POLICY.copies_for(g.item.target_phase)
            )
        ]

    def owner(sid: uuid.UUID, path: str) -> uuid.UUID | None:
        return owners.get((sid, path))

    planner: Any
    if pipeline == "replicate":
        planner = ReplicatePlanner(POLICY, now=NOW, path_owner=owner)
    elif pipeline == "migrate":
        planner = MigratePlanner(POLICY, now=NOW, path_owner=owner)
    elif pipeline == "expire":
        planner = ExpirePlanner(POLICY, now=NOW)
    else:
        assert shedding_storages(storages, POLICY), "the case needs a shedding storage"
        planner = RebalancePlanner(POLICY, now=NOW, path_owner=owner)
    return list(planner.plan(storages, groups))


def _actions(plan: Plan) -> list[Action]:
    return [
        *plan.copies,
        *plan.deletes,
        *plan.expires,
        *plan.phases,
        *plan.refusals,
        *plan.shortfalls,
        *plan.drained,
    ]


@pytest.mark.parametrize("pipeline", ["replicate", "migrate", "expire", "rebalance"])
def test_plan_from_the_stream_is_the_plan_over_the_whole_catalogue(
    catalogue: dict[str, uuid.UUID], pipeline: str
) -> None:
    with session_scope() as s:
        plan = make_plan(s, pipeline, now=NOW, policy=POLICY, max_items=None, max_bytes=None)
    expected = Plan.collect(pipeline, _reference(pipeline))
    assert _actions(plan), "the case plans something"
    assert _actions(plan) == _actions(expected)


def test_small_stream_chunks_give_the_same_plan(
    catalogue: dict[str, uuid.UUID], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Items cut across stream chunks (and their paths looked up per chunk) plan the same."""
    with session_scope() as s:
        whole = {
            p: _actions(make_plan(s, p, now=NOW, policy=POLICY, max_items=None, max_bytes=None))
            for p in ("replicate", "migrate", "expire", "rebalance")
        }
    monkeypatch.setattr("lifecycle.planning.snapshot.CHUNK", 3)
    with session_scope() as s:
        for p, actions in whole.items():
            assert (
                _actions(make_plan(s, p, now=NOW, policy=POLICY, max_items=None, max_bytes=None)) == actions
            ), p


@pytest.mark.parametrize("pipeline", ["migrate", "expire"])
def test_a_bounded_run_acts_on_whole_items_and_leaves_the_rest_for_later(
    catalogue: dict[str, uuid.UUID], pipeline: str
) -> None:
    """DLM_TRANSFER__MAX_ITEMS_PER_RUN bounds a run's deletions, expiries and phase changes as
    well as its copies (so a plan's memory stays bounded at any catalogue size): with a bound
    of one, the plan holds every such action of one item and none of another's, and counts
    the rest as deferred."""

    def acting(plan: Plan) -> list[Action]:
        return [*plan.deletes, *plan.expires, *plan.phases]

    with session_scope() as s:
        whole = make_plan(s, pipeline, now=NOW, policy=POLICY, max_items=None, max_bytes=None)
        bounded = make_plan(s, pipeline, now=NOW, policy=POLICY, max_items=1, max_bytes=None)
    assert len({a.item_oid for a in acting(whole)}) >= 2, "the case acts on more items than the bound"
    kept = {a.item_oid for a in acting(bounded)}
    assert len(kept) == 1
    assert sorted(map(repr, acting(bounded))) == sorted(repr(a) for a in acting(whole) if a.item_oid in kept)
    left = len(acting(whole)) - len(acting(bounded)) + len(whole.copies) - len(bounded.copies)
    assert bounded.summary()["deferred"] == left > 0
    assert bounded.refusals == whole.refusals and bounded.shortfalls == whole.shortfalls
