"""The pure planners: examples per pipeline, and hypothesis properties over random catalogues and policies."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.synthetic import bench_plan
from lifecycle.errors import InvalidValueError
from lifecycle.planning.actions import (
    Action,
    Copy,
    DeleteReplica,
    Drained,
    ExpireItem,
    Refusal,
    SetPhase,
    Shortfall,
)
from lifecycle.planning.expire import ExpirePlanner
from lifecycle.planning.plan import Plan
from lifecycle.planning.planner import MigratePlanner, ReplicatePlanner
from lifecycle.planning.policy import (
    AgingRule,
    Policy,
    StorageIndex,
    StorageView,
    current_phase,
    phase_satisfied,
)
from lifecycle.planning.rebalance import RebalancePlanner
from lifecycle.settings import PolicySettings, RebalanceSettings
from lifecycle.states import (
    LIVE_ITEM_STATES,
    ItemState,
    Phase,
    ReplicaState,
    StorageKind,
    StorageState,
    Tier,
)
from tests.lifecycle.planning.planner_model import GONE, NOW, Model, item, new_id, replica, storage

DEFAULT = Policy()


def run_replicate(m: Model, policy: Policy = DEFAULT) -> list[Action]:
    return list(ReplicatePlanner(policy, now=NOW, path_owner=m.path_owner()).plan(m.storages, m.groups()))


def run_migrate(m: Model, policy: Policy = DEFAULT) -> list[Action]:
    return list(MigratePlanner(policy, now=NOW, path_owner=m.path_owner()).plan(m.storages, m.groups()))


def run_expire(m: Model, policy: Policy = DEFAULT) -> list[Action]:
    return list(ExpirePlanner(policy, now=NOW).plan(m.storages, m.groups()))


def run_rebalance(m: Model, policy: Policy = DEFAULT) -> list[Action]:
    return list(RebalancePlanner(policy, now=NOW, path_owner=m.path_owner()).plan(m.storages, m.groups()))


def of(kind: type, actions: Sequence[Action]) -> list[Action]:
    return [a for a in actions if isinstance(a, kind)]


def by_id(m: Model) -> dict[UUID, StorageView]:
    return {s.id: s for s in m.storages}


# =========================================================================== policy


def test_policy_from_settings_parses_rules_and_water_marks() -> None:
    policy = Policy.from_settings(
        PolicySettings(
            copies_solid=4,
            rules=[
                {"where": "meta.kind = 'raw'", "older_than": "30d", "phase": "solid", "drop_tiers": ["hot"]}
            ],
        ),
        RebalanceSettings(high_water=0.9, low_water=0.5),
    )
    assert policy.copies == (0, 1, 2, 4)
    assert policy.rules == (
        AgingRule("meta.kind = 'raw'", timedelta(days=30), Phase.SOLID, frozenset({Tier.HOT})),
    )
    assert (policy.high_water, policy.low_water) == (0.9, 0.5)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"older_than": "30d", "phase": "SOLID"}, "aging rule [0]: 'where' must be a non-empty"),
        ({"where": "x", "phase": "SOLID"}, "aging rule [0]: 'older_than' is required"),
        ({"where": "x", "older_than": "30 days", "phase": "SOLID"}, "aging rule [0]: 'older_than': invalid"),
        ({"where": "x", "older_than": "30d", "phase": "ICE"}, "invalid phase 'ICE'"),
        ({"where": "x", "older_than": "30d", "drop_tiers": ["tape"]}, "invalid tier 'tape'"),
        ({"where": "x", "older_than": "30d"}, "aging rule [0] does nothing"),
        ({"where": "x", "older_than": "30d", "phase": "GAS", "tier": "hot"}, "unknown key 'tier'"),
    ],
)
def test_bad_aging_rule_is_named_in_one_clear_message(raw: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Policy.from_settings(PolicySettings(rules=[raw]))


def test_bad_copies_and_water_marks_are_refused() -> None:
    with pytest.raises(InvalidValueError, match="higher phase cannot need fewer copies"):
        Policy(copies=(0, 2, 1, 3))
    with pytest.raises(InvalidValueError, match="low_water <= high_water"):
        Policy(high_water=0.5, low_water=0.8)


def test_current_phase_is_the_highest_phase_the_intact_copies_satisfy() -> None:
    a = storage("a", location="x")
    b = storage("b", location="y")
    c = storage("c", tier=Tier.COLD, location="x")
    gone = storage("gone", tier=Tier.COLD, location="y", state=StorageState.OFFLINE)
    it = item("i", phase=Phase.SOLID)
    ra, rb, rc = replica(it, a), replica(it, b), replica(it, c)
    storages = [a, b, c, gone]
    assert current_phase([ra], storages, DEFAULT) == Phase.GAS
    assert current_phase([ra, rb], storages, DEFAULT) == Phase.LIQUID
    assert current_phase([ra, rb, rc], storages, DEFAULT) == Phase.SOLID
    # Three copies, but all in one location while a second exists: only LIQUID.
    c2 = storage("c2", tier=Tier.COLD, location="x")
    assert current_phase([ra, rc, replica(it, c2)], [a, b, c, c2], DEFAULT) == Phase.LIQUID
    # A copy that is not READY, or on an offline storage, is not intact.
    assert not phase_satisfied(it, [ra, rb, replica(it, gone)], storages, DEFAULT)
    assert current_phase([ra._replace(state=ReplicaState.COPYING)], storages, DEFAULT) == Phase.PLASMA


# =========================================================================== replicate


def test_replicate_places_solid_across_two_locations_with_a_cold_copy() -> None:
    hot_a1 = storage("hot-a1", location="a")
    hot_a2 = storage("hot-a2", location="a")
    hot_b = storage("hot-b", location="b")
    cold_a = storage("cold-a", tier=Tier.COLD, location="a")
    it = item("raw/1", phase=Phase.SOLID)
    m = Model([hot_a1, hot_a2, hot_b, cold_a], [it], [replica(it, hot_a1)])
    plan = run_replicate(m)
    copies = of(Copy, plan)
    assert not of(Shortfall, plan)
    assert len(copies) == 2
    dsts = {c.dst_storage_id for c in copies}
    assert cold_a.id in dsts and hot_b.id in dsts  # the cold tier and the second location
    assert all(c.src_storage_id == hot_a1.id and c.dst_path == "raw/1" for c in copies)
    after = m.apply(plan)
    assert phase_satisfied(it, after.replicas, after.storages, DEFAULT)


def test_replicate_prefers_hot_storages_with_most_free_space_for_liquid() -> None:
    src = storage("src", capacity=1000)
    cold = storage("cold", tier=Tier.COLD, capacity=1000)
    full_hot = storage("full-hot", capacity=1000, used=800)
    roomy_hot = storage("roomy-hot", capacity=1000, used=100)
    it = item("x", phase=Phase.LIQUID)
    m = Model([src, cold, full_hot, roomy_hot], [it], [replica(it, src)])
    [copy] = run_replicate(m)
    assert isinstance(copy, Copy) and copy.dst_storage_id == roomy_hot.id


def test_replicate_respects_capacity_across_many_items() -> None:
    src = storage("src")
    small = storage("small", capacity=1000, used=100)
    items = [item(f"f{i}", size=100, phase=Phase.LIQUID) for i in range(20)]
    m = Model([src, small], items, [replica(i, src) for i in items])
    planner = ReplicatePlanner(DEFAULT, now=NOW, path_owner=m.path_owner())
    plan = list(planner.plan(m.storages, m.groups()))
    assert len(of(Copy, plan)) == 9  # 900 bytes free
    assert len(of(Shortfall, plan)) == 11
    assert planner.planned_bytes == {small.id: 900}
    assert planner.counters["shortfalls"] == 11
    assert "1 of 2 copies possible" in of(Shortfall, plan)[0].reason  # type: ignore[attr-defined]


def test_a_copy_left_for_a_later_run_takes_no_room_in_this_one() -> None:
    """A copy beyond the run's byte bound is deferred, and the planner forgets it: its bytes
    do not fill the destination for the items after it, which still get their copies."""
    src = storage("src")
    dst = storage("dst", capacity=130)
    a, b, c = (item(n, size=size, phase=Phase.LIQUID) for n, size in (("a", 60), ("b", 60), ("c", 30)))
    m = Model([src, dst], [a, b, c], [replica(i, src) for i in (a, b, c)])
    planner = ReplicatePlanner(DEFAULT, now=NOW, path_owner=m.path_owner())
    plan = Plan.collect(
        "replicate", planner.plan(m.storages, m.groups()), max_bytes=90, on_deferred=planner.unplan
    )
    assert sorted(m.item(cp.item_oid).name for cp in plan.copies) == ["a", "c"]
    assert plan.summary()["deferred"] == 1 and plan.shortfalls == []
    assert planner.planned_bytes == {dst.id: 90}


def test_replicate_reports_items_whose_only_copies_are_offline() -> None:
    off = storage("off", state=StorageState.OFFLINE)
    on = storage("on")
    it = item("x")
    m = Model([off, on], [it], [replica(it, off)])
    [short] = run_replicate(m)
    assert isinstance(short, Shortfall) and "offline" in short.reason


def test_replicate_does_not_copy_again_while_a_copy_is_in_flight() -> None:
    a, b, c = storage("a"), storage("b"), storage("c")
    it = item("x", phase=Phase.LIQUID)
    m = Model([a, b, c], [it], [replica(it, a), replica(it, b, state=ReplicaState.COPYING)])
    assert run_replicate(m) == []


def test_replicate_never_writes_over_a_path_used_by_another_item() -> None:
    a, b, c = storage("a"), storage("b", capacity=10**6), storage("c", capacity=1000)
    mine, other = item("shared/name", phase=Phase.LIQUID), item("other")
    # `other` already lives at 'shared/name' on b, the roomiest destination.
    m = Model([a, b, c], [mine, other], [replica(mine, a), replica(other, b, path="shared/name")])
    [copy] = run_replicate(m)
    assert isinstance(copy, Copy) and copy.dst_storage_id == c.id
    # With c gone too, the item cannot get its second copy: a Shortfall that says why.
    m2 = Model([a, b], [mine, other], m.replicas)
    [short] = run_replicate(m2)
    assert isinstance(short, Shortfall) and "path already used by another item" in short.reason


def test_two_items_with_one_path_are_not_copied_to_the_same_place_in_one_run() -> None:
    a, b, c, d = storage("a"), storage("b"), storage("c"), storage("d")
    x, y = item("x", phase=Phase.LIQUID), item("y", phase=Phase.LIQUID)
    m = Model([a, b, c, d], [x, y], [replica(x, a, path="p"), replica(y, c, path="p")])
    copies = of(Copy, run_replicate(m))
    assert len(copies) == 2
    assert len({(c.dst_storage_id, c.dst_path) for c in copies}) == 2  # type: ignore[attr-defined]
    # With only three storages, y has nowhere left to put 'p': a Shortfall, not an overwrite.
    plan = run_replicate(Model([a, b, c], [x, y], m.replicas))
    assert [type(a) for a in plan] == [Copy, Shortfall]


# =========================================================================== expire


def test_item_expiry_expires_the_item_and_deletes_every_copy() -> None:
    a, b, off = storage("a"), storage("b"), storage("off", state=StorageState.OFFLINE)
    it = item("x", phase=Phase.LIQUID, expires_at=NOW - timedelta(seconds=1))
    keep = item("y", expires_at=NOW + timedelta(days=1))
    reps = [replica(it, a), replica(it, b), replica(it, off, state=ReplicaState.CORRUPTED)]
    m = Model([a, b, off], [it, keep], [*reps, replica(keep, a)])
    plan = run_expire(m)
    assert of(ExpireItem, plan) == [ExpireItem(it.oid, f"item expired at {it.expires_at.isoformat()}")]  # type: ignore[union-attr]
    deletes = of(DeleteReplica, plan)
    assert {d.replica_uid for d in deletes} == {r.uid for r in reps}  # type: ignore[attr-defined]
    assert all(d.reason == "item expired" for d in deletes)  # type: ignore[attr-defined]


def test_replica_expiry_is_refused_when_it_would_break_the_phase() -> None:
    a, b, c = storage("a"), storage("b"), storage("c")
    it = item("x", phase=Phase.LIQUID)
    past = NOW - timedelta(hours=1)
    r1, r2, r3 = replica(it, a, expires_at=past), replica(it, b, expires_at=past), replica(it, c)
    m = Model([a, b, c], [it], [r1, r2, r3])
    plan = run_expire(m)
    assert of(DeleteReplica, plan) == [DeleteReplica(r1.uid, it.oid, a.id, "x", 10, "replica expired")]
    assert of(Refusal, plan) == [
        Refusal(
            it.oid,
            r2.uid,
            "replica expiry refused: the item would fall below its target phase LIQUID (1 intact copy left)",
        )
    ]


def test_replica_expiry_never_deletes_the_last_copy_even_of_plasma() -> None:
    a, b = storage("a"), storage("b")
    it = item("scratch", phase=Phase.PLASMA)
    past = NOW - timedelta(hours=1)
    r1, r2 = replica(it, a, expires_at=past), replica(it, b, expires_at=past)
    plan = run_expire(Model([a, b], [it], [r1, r2]))
    assert len(of(DeleteReplica, plan)) == 1
    [refusal] = of(Refusal, plan)
    assert "last intact copy" in refusal.reason  # type: ignore[attr-defined]


# =========================================================================== migrate


def test_migrate_raises_phase_then_drops_the_hot_copy_only_once_new_copies_are_ready() -> None:
    hot = storage("hot", location="a")
    warm = storage("warm", tier=Tier.WARM, location="b")
    cold = storage("cold", tier=Tier.COLD, location="a")
    archive = storage("archive", tier=Tier.ARCHIVE, location="b")
    raw = item("raw/1", phase=Phase.LIQUID, created_at=NOW - timedelta(days=40))
    young = item("raw/2", phase=Phase.LIQUID, created_at=NOW - timedelta(days=5))
    policy = Policy(
        rules=(AgingRule("meta.kind = 'raw'", timedelta(days=30), Phase.SOLID, frozenset({Tier.HOT})),)
    )
    m = Model(
        [hot, warm, cold, archive],
        [raw, young],
        [replica(raw, hot), replica(raw, warm), replica(young, hot), replica(young, warm)],
        matched={raw.oid: frozenset({0}), young.oid: frozenset({0})},
    )
    run1 = run_migrate(m, policy)
    assert of(SetPhase, run1) == [SetPhase(raw.oid, Phase.SOLID, "aging rule [0] matured")]
    assert {c.dst_storage_id for c in of(Copy, run1)} == {cold.id, archive.id}  # type: ignore[attr-defined]
    assert not of(DeleteReplica, run1)  # the new copies are not READY yet
    # The copies are still in flight: no deletion, no second copy.
    in_flight = m.apply(run1, copy_state=ReplicaState.COPYING)
    assert of(Copy, run_migrate(in_flight, policy)) == []
    assert of(DeleteReplica, run_migrate(in_flight, policy)) == []
    # Once READY, the hot copy goes; nothing else changes.
    landed = in_flight.finish_copies()
    run2 = run_migrate(landed, policy)
    [delete] = of(DeleteReplica, run2)
    assert delete.storage_id == hot.id and delete.item_oid == raw.oid  # type: ignore[attr-defined]
    assert delete.reason == "migrate: tier hot dropped"  # type: ignore[attr-defined]
    assert not of(Copy, run2)
    final = landed.apply(run2)
    assert current_phase(final.replicas_of(raw.oid), final.storages, policy) == Phase.SOLID
    assert run_migrate(final, policy) == []  # converged


def test_migrate_drops_surplus_copies_down_to_the_phase() -> None:
    a, b, c = storage("a", capacity=100, used=90), storage("b", capacity=100), storage("c", capacity=100)
    it = item("x", phase=Phase.GAS)
    m = Model([a, b, c], [it], [replica(it, a), replica(it, b), replica(it, c)])
    deletes = of(DeleteReplica, run_migrate(m))
    assert len(deletes) == 2
    assert deletes[0].storage_id == a.id  # type: ignore[attr-defined]  # the fullest first


# =========================================================================== rebalance


def test_draining_storage_is_emptied_in_two_runs_then_reported_drained() -> None:
    old = storage("old", state=StorageState.DRAINING, capacity=1000, used=300)
    new1 = storage("new1", capacity=1000)
    new2 = storage("new2", capacity=1000)
    items = [item(f"f{i}", size=100, phase=Phase.LIQUID) for i in range(3)]
    reps = [replica(i, old) for i in items] + [replica(i, new1) for i in items]
    m = Model([old, new1, new2], items, reps)
    run1 = run_rebalance(m)
    assert [type(a) for a in run1] == [Copy, Copy, Copy]
    assert all(c.dst_storage_id == new2.id and c.reason == "rebalance" for c in of(Copy, run1))  # type: ignore[attr-defined]
    m1 = m.apply(run1)
    run2 = run_rebalance(m1)
    assert {d.storage_id for d in of(DeleteReplica, run2)} == {old.id}  # type: ignore[attr-defined]
    assert len(of(DeleteReplica, run2)) == 3 and not of(Drained, run2)
    m2 = m1.apply(run2)
    assert run_rebalance(m2) == [Drained(old.id)]


def test_rebalance_sheds_an_over_full_storage_down_to_low_water_without_filling_another() -> None:
    full = storage("full", capacity=1000, used=950)
    empty = storage("empty", capacity=1000, used=500)
    items = [item(f"f{i}", size=50, phase=Phase.GAS) for i in range(19)]
    m = Model([full, empty], items, [replica(i, full) for i in items])
    plan = run_rebalance(m)
    copies = of(Copy, plan)
    # full sheds 950 - 700 = 250 bytes (5 items); empty may take up to 700 - 500 = 200 (4 items).
    assert len(copies) == 4
    assert len(of(Shortfall, plan)) == 1


# =========================================================================== properties

TIERS = list(Tier)
LOCATIONS = [None, "l1", "l2", "l3"]
STORAGE_STATES = [StorageState.ONLINE] * 8 + [
    StorageState.DRAINING,
    StorageState.OFFLINE,
    StorageState.RETIRED,
]
REPLICA_STATES = [ReplicaState.READY] * 6 + [
    ReplicaState.PENDING,
    ReplicaState.COPYING,
    ReplicaState.DELETING,
    ReplicaState.DELETED,
    ReplicaState.CORRUPTED,
    ReplicaState.LOST,
]
ITEM_STATES = [ItemState.READY] * 5 + [
    ItemState.INITIALISED,
    ItemState.CORRUPTED,
    ItemState.EXPIRED,
    ItemState.DELETED,
]


@st.composite
def policies(draw: st.DrawFn) -> Policy:
    copies = sorted(draw(st.lists(st.integers(0, 4), min_size=4, max_size=4)))
    copies[0] = min(copies[0], 1)
    rules = []
    for _ in range(draw(st.integers(0, 2))):
        phase = draw(st.none() | st.sampled_from(list(Phase)))
        drop = frozenset(draw(st.sets(st.sampled_from(TIERS), max_size=2)))
        if phase is None and not drop:
            phase = Phase.SOLID
        rules.append(AgingRule("x", timedelta(days=draw(st.integers(0, 60))), phase, drop))
    low = draw(st.floats(0.2, 0.9))
    high = draw(st.floats(low, 1.0))
    return Policy(
        copies=(copies[0], copies[1], copies[2], copies[3]),
        rules=tuple(rules),
        high_water=high,
        low_water=low,
    )


@st.composite
def catalogues(draw: st.DrawFn) -> Model:
    storages = []
    for k in range(draw(st.integers(1, 7))):
        cap = draw(st.none() | st.integers(50, 2000) | st.integers(2000, 10_000))
        used = draw(st.integers(0, cap if cap is not None else 3000)) // draw(st.sampled_from([1, 2, 4]))
        storages.append(
            StorageView(
                new_id(),
                f"s{k}",
                draw(st.sampled_from(list(StorageKind))),
                draw(st.sampled_from(TIERS)),
                draw(st.sampled_from(LOCATIONS)),
                cap,
                used,
                draw(st.sampled_from(STORAGE_STATES)),
            )
        )
    items, replicas, matched = [], [], {}
    when = st.sampled_from([None, None, None, NOW - timedelta(days=1), NOW, NOW + timedelta(days=1)])
    for i in range(draw(st.integers(0, 12))):
        it = item(
            f"d/{i}",
            size=draw(st.integers(1, 400)),
            phase=draw(st.sampled_from(list(Phase))),
            state=draw(st.sampled_from(ITEM_STATES)),
            expires_at=draw(when),
            created_at=NOW - timedelta(days=draw(st.integers(0, 90))),
        )
        items.append(it)
        home = draw(st.sampled_from(storages))
        for s in storages:
            if s is home:
                state = draw(st.sampled_from([ReplicaState.READY] * 4 + REPLICA_STATES))
            elif draw(st.integers(0, 3)) == 0:
                state = draw(st.sampled_from(REPLICA_STATES))
            else:
                continue
            path = draw(st.sampled_from([it.name, it.name, it.name, "shared"]))
            replicas.append(replica(it, s, state=state, path=path, expires_at=draw(when)))
        matched[it.oid] = frozenset(draw(st.sets(st.integers(0, 2), max_size=2)))
    return Model(storages, items, replicas, matched)


PLANNERS = {
    "replicate": run_replicate,
    "migrate": run_migrate,
    "expire": run_expire,
    "rebalance": run_rebalance,
}
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_invariant(m: Model, policy: Policy, plan: Sequence[Action], planner: str) -> None:
    """Apply all of the plan's deletions together: nobody loses a last copy or falls below target."""
    index = m.index()
    rows = {r.uid: r for r in m.replicas}
    deletes = of(DeleteReplica, plan)
    assert len({d.replica_uid for d in deletes}) == len(deletes), "a replica deleted twice"  # type: ignore[attr-defined]
    for d in deletes:
        r = rows[d.replica_uid]  # type: ignore[attr-defined]
        assert r.item_oid == d.item_oid and r.storage_id == d.storage_id and r.path == d.path  # type: ignore[attr-defined]
        assert r.state not in GONE
    expired = {a.item_oid for a in of(ExpireItem, plan)}  # type: ignore[attr-defined]
    if expired:
        assert planner == "expire"
    after = m.apply(plan, kinds=(DeleteReplica,))
    for it in m.items:
        if it.oid in expired:
            assert it.expires_at is not None and it.expires_at <= NOW and it.state in LIVE_ITEM_STATES
            assert not [r for r in after.replicas_of(it.oid) if r.state not in (*GONE, ReplicaState.DELETING)]
            continue
        if it.state not in LIVE_ITEM_STATES:
            continue
        before_ids, after_ids = m.intact(it.oid), after.intact(it.oid)
        if before_ids:
            assert after_ids, f"{planner} deleted the last intact copy of {it.name}"
        if index.meets(policy, it.target_phase, before_ids):
            assert index.meets(policy, it.target_phase, after_ids), f"{planner} took {it.name} below target"
        else:
            assert after_ids == before_ids, f"{planner} deleted an intact copy of {it.name}, below target"


def check_copies(m: Model, policy: Policy, plan: Sequence[Action], planner: str) -> None:
    """Copies come from intact sources, never double up on a storage, a path, or a storage's capacity."""
    storages = by_id(m)
    copies: list[Copy] = of(Copy, plan)  # type: ignore[assignment]
    owner = m.path_owner()
    seen_item_dst: set[tuple[UUID, UUID]] = set()
    seen_path: dict[tuple[UUID, str], UUID] = {}
    planned: Counter[UUID] = Counter()
    for c in copies:
        src_rows = [r for r in m.replicas_of(c.item_oid) if r.storage_id == c.src_storage_id]
        assert any(r.state == ReplicaState.READY and r.path == c.src_path for r in src_rows)
        assert storages[c.src_storage_id].state in (StorageState.ONLINE, StorageState.DRAINING)
        dst = storages[c.dst_storage_id]
        assert dst.state == StorageState.ONLINE
        assert c.dst_path == c.src_path
        live_on = {r.storage_id for r in m.replicas_of(c.item_oid) if r.state not in GONE}
        assert c.dst_storage_id not in live_on, "a second copy of an item on one storage"
        assert (c.item_oid, c.dst_storage_id) not in seen_item_dst, "two copies of an item to one storage"
        seen_item_dst.add((c.item_oid, c.dst_storage_id))
        assert owner(c.dst_storage_id, c.dst_path) in (None, c.item_oid), "path used by another item"
        assert seen_path.setdefault((c.dst_storage_id, c.dst_path), c.item_oid) == c.item_oid
        assert c.size == m.item(c.item_oid).size
        planned[c.dst_storage_id] += c.size
    for sid, n in planned.items():
        s = storages[sid]
        if s.capacity_bytes is not None:
            assert s.used_bytes + n <= s.capacity_bytes, "destination overfilled"
            if planner == "rebalance":
                assert s.used_bytes + n <= policy.low_water * s.capacity_bytes


@pytest.mark.parametrize("planner", list(PLANNERS))
@PROPERTY
@given(m=catalogues(), policy=policies())
def test_no_plan_breaks_the_invariant_or_overfills_a_storage(planner: str, m: Model, policy: Policy) -> None:
    plan = PLANNERS[planner](m, policy)
    check_invariant(m, policy, plan, planner)
    check_copies(m, policy, plan, planner)


@PROPERTY
@given(m=catalogues(), policy=policies())
def test_replicate_reaches_the_target_unless_it_reports_a_real_shortfall(m: Model, policy: Policy) -> None:
    plan = run_replicate(m, policy)
    check_copies(m, policy, plan, "replicate")
    short = {a.item_oid for a in of(Shortfall, plan)}  # type: ignore[attr-defined]
    after = m.apply(plan)
    index = after.index()
    owner = after.path_owner()
    for it in after.items:
        if it.state != ItemState.READY or (it.expires_at is not None and it.expires_at <= NOW):
            assert not [a for a in plan if getattr(a, "item_oid", None) == it.oid]
            continue
        rows = after.replicas_of(it.oid)
        have = index.intact_positions(rows) | {
            index.pos[r.storage_id]
            for r in rows
            if r.state in (ReplicaState.PENDING, ReplicaState.COPYING)
            and r.storage_id in index.pos
            and index.online[index.pos[r.storage_id]]
        }
        if it.oid not in short:
            assert index.meets(policy, it.target_phase, have), f"{it.name} neither placed nor a Shortfall"
            continue
        # A real shortfall: even every remaining candidate storage would not be enough.
        sources = [
            r
            for r in rows
            if r.state == ReplicaState.READY
            and r.storage_id in index.pos
            and index.intact[index.pos[r.storage_id]]
        ]
        if not sources:
            continue  # nothing to copy from
        occupied = {r.storage_id for r in rows if r.state not in GONE}
        candidates = {
            index.pos[s.id]
            for s in after.storages
            if s.state == StorageState.ONLINE
            and s.id not in occupied
            and (s.capacity_bytes is None or s.capacity_bytes - s.used_bytes >= it.size)
            and any(owner(s.id, r.path) in (None, it.oid) for r in sources)
        }
        assert not index.meets(policy, it.target_phase, have | candidates), f"{it.name}: Shortfall but room"


@PROPERTY
@given(m=catalogues(), policy=policies())
def test_replicate_converges_in_one_run(m: Model, policy: Policy) -> None:
    plan = run_replicate(m, policy)
    again = run_replicate(m.apply(plan), policy)
    assert not of(Copy, again), "a second run found more to copy"
    assert {a.item_oid for a in of(Shortfall, again)} == {a.item_oid for a in of(Shortfall, plan)}  # type: ignore[attr-defined]


@PROPERTY
@given(m=catalogues(), policy=policies())
def test_migrate_deletes_only_what_the_effective_phase_can_spare(m: Model, policy: Policy) -> None:
    plan = run_migrate(m, policy)
    raised = {a.item_oid: a.phase for a in of(SetPhase, plan)}  # type: ignore[attr-defined]
    for oid, phase in raised.items():
        it = m.item(oid)
        assert phase.rank > it.target_phase.rank
        assert any(
            (r := policy.rules[i]).phase == phase and it.created_at + r.older_than <= NOW
            for i in m.matched.get(oid, frozenset())
            if i < len(policy.rules)
        )
    after = m.apply(plan, kinds=(DeleteReplica,))
    index = m.index()
    for oid in {a.item_oid for a in of(DeleteReplica, plan)}:  # type: ignore[attr-defined]
        it = m.item(oid)
        assert index.meets(policy, raised.get(oid, it.target_phase), after.intact(oid))
    for c in of(Copy, plan):
        it = m.item(c.item_oid)  # type: ignore[attr-defined]
        drop = frozenset().union(
            *(
                policy.rules[i].drop_tiers
                for i in m.matched.get(it.oid, frozenset())
                if i < len(policy.rules) and it.created_at + policy.rules[i].older_than <= NOW
            )
        )
        assert by_id(m)[c.dst_storage_id].tier not in drop  # type: ignore[attr-defined]


@PROPERTY
@given(m=catalogues(), policy=policies())
def test_expire_handles_every_expired_item_and_copy_exactly_once(m: Model, policy: Policy) -> None:
    plan = run_expire(m, policy)
    expired = {a.item_oid for a in of(ExpireItem, plan)}  # type: ignore[attr-defined]
    for it in m.items:
        due = it.expires_at is not None and it.expires_at <= NOW and it.state in LIVE_ITEM_STATES
        assert (it.oid in expired) == due
    deleted = {a.replica_uid for a in of(DeleteReplica, plan)}  # type: ignore[attr-defined]
    refused = {a.replica_uid for a in of(Refusal, plan)}  # type: ignore[attr-defined]
    assert not deleted & refused
    reachable = {s.id for s in m.storages if s.state in (StorageState.ONLINE, StorageState.DRAINING)}
    for r in m.replicas:
        it = m.item(r.item_oid)
        if it.state not in LIVE_ITEM_STATES or it.oid in expired:
            continue
        if (
            r.expires_at is not None
            and r.expires_at <= NOW
            and r.state in (ReplicaState.READY, ReplicaState.CORRUPTED)
            and r.storage_id in reachable
        ):
            assert (r.uid in deleted) != (r.uid in refused)
        else:
            assert r.uid not in deleted and r.uid not in refused


@PROPERTY
@given(m=catalogues(), policy=policies())
def test_rebalance_only_sheds_and_reports_drained_storages_truly_empty(m: Model, policy: Policy) -> None:
    plan = run_rebalance(m, policy)
    storages = by_id(m)

    def shedding(s: StorageView) -> bool:
        over = s.capacity_bytes is not None and s.used_bytes > policy.high_water * s.capacity_bytes
        return s.state == StorageState.DRAINING or (s.state == StorageState.ONLINE and over)

    for a in plan:
        if isinstance(a, DeleteReplica):
            assert shedding(storages[a.storage_id])
        elif isinstance(a, Copy):
            assert shedding(storages[a.src_storage_id]) and not shedding(storages[a.dst_storage_id])
        elif isinstance(a, Drained):
            assert storages[a.storage_id].state == StorageState.DRAINING
            assert not [r for r in m.replicas if r.storage_id == a.storage_id and r.state not in GONE]
    for s in m.storages:
        if s.state == StorageState.DRAINING and not [
            r for r in m.replicas if r.storage_id == s.id and r.state not in GONE
        ]:
            assert Drained(s.id) in plan


def test_planners_need_distinct_storage_ids() -> None:
    a = storage("a")
    with pytest.raises(InvalidValueError, match="duplicate storage id"):
        StorageIndex([a, a])


def test_benchmark_helper_plans_synthetic_items() -> None:
    seconds, build, counters = bench_plan(20_000, "replicate")
    assert counters["satisfied"] == 19_000 and counters["copies"] == 1_000
    assert seconds < 5 and build > 0


def test_rebalance_never_moves_a_copy_onto_a_path_used_by_another_item() -> None:
    old = storage("old", state=StorageState.DRAINING)
    taken = storage("taken", capacity=10**6)
    free = storage("free", capacity=1000)
    mine, other = item("p"), item("other")
    m = Model([old, taken, free], [mine, other], [replica(mine, old), replica(other, taken, path="p")])
    [copy] = run_rebalance(m)
    assert isinstance(copy, Copy) and copy.dst_storage_id == free.id
