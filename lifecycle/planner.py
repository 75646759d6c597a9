"""Pure, streaming planners of the replicate, migrate, expire and rebalance pipelines (no I/O).

Every planner takes the (small) list of storages and an iterable of per-item groups,
and yields actions; the only state it keeps across items is small (bytes planned per
storage, destination paths planned in this run, per-storage shedding budgets). A flow
streams the catalogue in, applies the actions in batches, and runs the planner again:
runs are convergent, never one-shot.

The invariant (DESIGN.md section 3), enforced here on the copies that are READY *now*
with all of the plan's deletions applied together: a live item never loses its last
intact copy, and nothing but the item's own expiry takes an item below its target
phase. Copies planned in a run never count for deletions in that run, so moving a copy
takes two runs: run 1 emits `Copy`; once the copy is READY, run 2 emits `DeleteReplica`
of the old one (migrate's surplus, rebalance's source copy).
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NamedTuple
from uuid import UUID

from lifecycle.policy import (
    ItemView,
    Policy,
    ReplicaView,
    StorageIndex,
    StorageView,
)
from lifecycle.states import (
    LIVE_ITEM_STATES,
    ItemState,
    Phase,
    ReplicaState,
    StorageKind,
    StorageState,
    Tier,
)

__all__ = [
    "Action",
    "Copy",
    "DeleteReplica",
    "Drained",
    "ExpireItem",
    "ExpirePlanner",
    "ItemGroup",
    "MigratePlanner",
    "PathOwner",
    "RebalancePlanner",
    "Refusal",
    "ReplicatePlanner",
    "SetPhase",
    "Shortfall",
    "bench_plan",
    "synthetic_groups",
]


class ItemGroup(NamedTuple):
    """One item with all its replica rows, and the indexes of the aging rules (Policy.rules) it matched."""

    item: ItemView
    replicas: tuple[ReplicaView, ...]
    matched_rules: frozenset[int] = frozenset()


PathOwner = Callable[[UUID, str], UUID | None]
"""(storage_id, path) -> oid of the item whose live replica uses that path there, or None."""


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Copy:
    """Copy an item's replica to another storage, at the same relative path."""

    item_oid: UUID
    src_storage_id: UUID
    src_path: str
    dst_storage_id: UUID
    dst_path: str
    size: int
    reason: str


@dataclass(frozen=True, slots=True)
class DeleteReplica:
    """Delete one physical copy."""

    replica_uid: UUID
    item_oid: UUID
    storage_id: UUID
    path: str
    size: int
    reason: str


@dataclass(frozen=True, slots=True)
class ExpireItem:
    """The item goes EXPIRED (its copies are deleted by the DeleteReplica actions beside it)."""

    item_oid: UUID
    reason: str


@dataclass(frozen=True, slots=True)
class SetPhase:
    """Raise the item's target_phase in the catalogue (an aging rule matured)."""

    item_oid: UUID
    phase: Phase
    reason: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """An action policy forbids (reported as an event, not applied)."""

    item_oid: UUID
    replica_uid: UUID | None
    reason: str


@dataclass(frozen=True, slots=True)
class Shortfall:
    """The item cannot reach what it needs: too few usable storages, capacity or free paths."""

    item_oid: UUID
    reason: str


@dataclass(frozen=True, slots=True)
class Drained:
    """A draining storage holds no live replica any more: it can be retired."""

    storage_id: UUID


Action = Copy | DeleteReplica | ExpireItem | SetPhase | Refusal | Shortfall | Drained

_GONE = frozenset({ReplicaState.DELETED, ReplicaState.LOST})
_IN_FLIGHT = frozenset({ReplicaState.PENDING, ReplicaState.COPYING})
_TIER_PREFERENCE = {Tier.HOT: 3, Tier.WARM: 2, Tier.COLD: 1, Tier.ARCHIVE: 0}
_SOURCE_TIER_RANK = {Tier.HOT: 0, Tier.WARM: 1, Tier.COLD: 2, Tier.ARCHIVE: 3}
_NO_ACTIONS: tuple[Action, ...] = ()
# Members bound once: the hot loops compare against these (enum attribute lookups cost).
_READY = ReplicaState.READY
_ITEM_READY = ItemState.READY


def _due(when: datetime | None, now: datetime | None) -> bool:
    return when is not None and now is not None and when <= now


# --------------------------------------------------------------------------- shared machinery


class _Planner:
    """State shared by all planners: storages, bytes planned per destination, planned paths.

    Inside a plan, storages are handled by position in `index.storages`.
    """

    def __init__(self, policy: Policy, *, now: datetime | None = None, path_owner: PathOwner | None = None):
        self.policy = policy
        self.now = now
        self.path_owner = path_owner
        self.counters: Counter[str] = Counter()
        self.index = StorageIndex(())
        self._planned: list[int] = []
        self._planned_paths: dict[tuple[int, str], UUID] = {}

    def plan(self, storages: Sequence[StorageView], groups: Iterable[ItemGroup]) -> Iterator[Action]:
        """Yield the actions for these groups; counters and planned bytes start afresh.

        Raises InvalidValueError if two storages share an id.
        """
        self.index = StorageIndex(storages)
        self.counters = Counter()
        self._planned = [0] * len(self.index.storages)
        self._planned_paths = {}
        self._start()
        plan_group = self._plan_group
        for group in groups:
            actions = plan_group(group)
            if actions:
                yield from actions
        yield from self._finish()

    @property
    def planned_bytes(self) -> dict[UUID, int]:
        """Bytes this plan copies to each storage (so far)."""
        return {s.id: b for s, b in zip(self.index.storages, self._planned, strict=True) if b}

    def _start(self) -> None:
        pass

    def _plan_group(self, group: ItemGroup) -> Sequence[Action]:
        raise NotImplementedError

    def _finish(self) -> Iterator[Action]:
        return iter(())

    # -- destinations

    def _free(self, p: int) -> int | None:
        """Capacity minus used minus bytes planned in this run; None when unbounded."""
        s = self.index.storages[p]
        if s.capacity_bytes is None:
            return None
        return s.capacity_bytes - s.used_bytes - self._planned[p]

    def _free_ratio(self, p: int) -> float:
        free = self._free(p)
        cap = self.index.storages[p].capacity_bytes
        if free is None or not cap:
            return 1.0
        return free / cap

    def _path_free(self, p: int, path: str, oid: UUID) -> bool:
        planned = self._planned_paths.get((p, path))
        if planned is not None and planned != oid:
            return False
        if self.path_owner is not None:
            owner = self.path_owner(self.index.storages[p].id, path)
            if owner is not None and owner != oid:
                return False
        return True

    def _copy(self, item: ItemView, src: ReplicaView, dst: int, reason: str) -> Copy:
        self._planned[dst] += item.size
        self._planned_paths[(dst, src.path)] = item.oid
        self.counters["copies"] += 1
        self.counters["bytes_copied"] += item.size
        dst_id = self.index.storages[dst].id
        return Copy(item.oid, src.storage_id, src.path, dst_id, src.path, item.size, reason)

    def _sources(self, replicas: Iterable[ReplicaView]) -> list[tuple[int, ReplicaView]]:
        """Intact replicas with their positions, best source first.

        Online before draining (a draining storage is on its way out), then hot before
        cold (fast to read, no archive recall), then posix (cheapest to read), by name.
        """
        index = self.index
        pos_get, intact = index.pos.get, index.intact
        found: list[tuple[int, ReplicaView]] = []
        for r in replicas:
            if r.state == ReplicaState.READY:
                p = pos_get(r.storage_id)
                if p is not None and intact[p]:
                    found.append((p, r))
        if len(found) > 1:
            storages = index.storages

            def key(pr: tuple[int, ReplicaView]) -> tuple[bool, int, bool, str]:
                s = storages[pr[0]]
                return (
                    s.state != StorageState.ONLINE,
                    _SOURCE_TIER_RANK[s.tier],
                    s.kind != StorageKind.POSIX,
                    s.name,
                )

            found.sort(key=key)
        return found

    def _have_and_occupied(
        self, replicas: Iterable[ReplicaView], exclude_tiers: frozenset[Tier] = frozenset()
    ) -> tuple[set[int], set[int]]:
        """Storages whose copies count (intact, or in flight to online), and all with a live row."""
        index = self.index
        pos_get, intact, online, storages = index.pos.get, index.intact, index.online, index.storages
        have: set[int] = set()
        occupied: set[int] = set()
        for r in replicas:
            st = r.state
            if st in _GONE:
                continue
            p = pos_get(r.storage_id)
            if p is None:
                continue
            occupied.add(p)
            if exclude_tiers and storages[p].tier in exclude_tiers:
                continue
            if st == _READY:
                if intact[p]:
                    have.add(p)
            elif st in _IN_FLIGHT and online[p]:
                have.add(p)
        return have, occupied

    def _fill(
        self,
        item: ItemView,
        phase: Phase,
        have: set[int],
        occupied: set[int],
        sources: Sequence[tuple[int, ReplicaView]],
        reason: str,
        exclude_tiers: frozenset[Tier] = frozenset(),
    ) -> list[Action]:
        """Add copies, greedily, until copies on `have` meet `phase`; then a Shortfall if they still do not.

        A candidate is an ONLINE storage without a live row of this item, not on an
        excluded tier, with room for the item and a source path free there. Each step
        picks the candidate that helps the most unmet rules (count, a cold copy, a second
        location), then the preferred tier (hot first), then the largest free ratio. The
        rules are all 'at least one/at least n' and a copy's fit on one storage does not
        depend on copies to others, so the greedy choice reaches the phase whenever any
        set of candidates can.
        """
        index, policy = self.index, self.policy
        storages, cold, location = index.storages, index.cold, index.location
        actions: list[Action] = []
        need = policy.copies[phase.rank]
        solid = phase == Phase.SOLID and need > 0
        collided = False
        while not index.meets(policy, phase, have):
            count_def = 1 if len(have) < need else 0
            cold_def = solid and index.has_cold and not index.any_cold(have)
            locations = index.locations(have)
            loc_def = solid and index.multi_location and len(locations) < 2
            best: tuple[tuple[int, int, float, float, str], int, ReplicaView] | None = None
            for p in index.online_positions:
                s = storages[p]
                if p in have or p in occupied or s.tier in exclude_tiers:
                    continue
                helps = count_def
                if cold_def and cold[p]:
                    helps += 1
                loc = location[p]
                if loc_def and loc is not None and loc not in locations:
                    helps += 1
                if not helps:
                    continue
                free = self._free(p)
                if free is not None and free < item.size:
                    continue
                src = next((r for _, r in sources if self._path_free(p, r.path, item.oid)), None)
                if src is None:
                    collided = True
                    continue
                key = (
                    helps,
                    _TIER_PREFERENCE[s.tier],
                    self._free_ratio(p),
                    float("inf") if free is None else float(free),
                    s.name,
                )
                if best is None or key > best[0]:
                    best = (key, p, src)
            if best is None:
                break
            _, dst, src = best
            actions.append(self._copy(item, src, dst, reason))
            have.add(dst)
            occupied.add(dst)
        if not index.meets(policy, phase, have):
            self.counters["shortfalls"] += 1
            actions.append(Shortfall(item.oid, self._shortfall_reason(phase, have, collided)))
        return actions

    def _shortfall_reason(self, phase: Phase, have: set[int], collided: bool) -> str:
        index, need = self.index, self.policy.copies[phase.rank]
        parts: list[str] = []
        if len(have) < need:
            parts.append(f"{len(have)} of {need} copies possible")
        if phase == Phase.SOLID and need > 0:
            if index.has_cold and not index.any_cold(have):
                parts.append("no cold/archive storage with room")
            if index.multi_location and len(index.locations(have)) < 2:
                parts.append("no second location with room")
        if collided:
            parts.append("path already used by another item on some storages")
        return f"cannot reach {phase.value}: " + (", ".join(parts) or "no storage can take a copy")

    def _deletable(self, phase: Phase, remaining: set[int], p: int) -> bool:
        """Whether the READY-now copies minus the one on `p` keep at least one copy and `phase`."""
        if p not in remaining:
            return True  # not an intact copy: the invariant does not count it
        if len(remaining) <= 1:
            return False
        remaining.discard(p)
        ok = self.index.meets(self.policy, phase, remaining)
        remaining.add(p)
        return ok


def _live_unexpired(item: ItemView, now: datetime | None) -> bool:
    if item.state != _ITEM_READY:
        return False
    expires_at = item.expires_at
    return expires_at is None or now is None or expires_at > now


# --------------------------------------------------------------------------- replicate


class ReplicatePlanner(_Planner):
    """Add copies until each READY, unexpired item meets its target phase.

    Copies in flight (PENDING/COPYING on an online storage) count as present, so a
    run does not duplicate the previous run's work. Items whose only copies are on
    offline storages, or that cannot get enough room, storages or free paths, yield a
    Shortfall (after whatever partial copies help).
    """

    def _plan_group(self, group: ItemGroup) -> Sequence[Action]:
        item = group.item
        if not _live_unexpired(item, self.now):
            self.counters["skipped"] += 1
            return _NO_ACTIONS
        have, occupied = self._have_and_occupied(group.replicas)
        if self.index.meets(self.policy, item.target_phase, have):
            self.counters["satisfied"] += 1
            return _NO_ACTIONS
        sources = self._sources(group.replicas)
        if not sources:
            self.counters["shortfalls"] += 1
            return [Shortfall(item.oid, self._no_source_reason(group))]
        return self._fill(item, item.target_phase, have, occupied, sources, "replicate")

    def _no_source_reason(self, group: ItemGroup) -> str:
        pos, storages = self.index.pos, self.index.storages
        ready = [r for r in group.replicas if r.state == ReplicaState.READY]
        if ready and all(
            r.storage_id in pos and storages[pos[r.storage_id]].state == StorageState.OFFLINE for r in ready
        ):
            return "no intact copy to copy from: its only copies are on offline storages"
        return "no intact copy to copy from"


# --------------------------------------------------------------------------- migrate


class MigratePlanner(_Planner):
    """Bring placement to what the item's phase and age ask for, then drop surplus copies.

    A matched aging rule whose age has come (created_at + older_than <= now) raises the
    effective target to the rule's phase (never lowers it; a SetPhase records it) and
    marks copies on its drop_tiers as surplus; copies on draining storages and copies
    beyond what the phase needs are surplus too. Copies are added (never to a dropped
    tier) until the copies that are kept (online, not on a dropped tier, READY or in
    flight) meet the effective target; surplus copies are deleted only if the copies
    READY now, minus every deletion of this plan, still meet it. So a migration
    converges in two runs: copies first, deletions once they are READY. Surplus is
    deleted dropped tiers first, then draining storages, then the fullest storage.
    """

    def __init__(self, policy: Policy, *, now: datetime, path_owner: PathOwner | None = None):
        super().__init__(policy, now=now, path_owner=path_owner)
        self.now_required: datetime = now

    def _plan_group(self, group: ItemGroup) -> Sequence[Action]:
        item = group.item
        if not _live_unexpired(item, self.now):
            self.counters["skipped"] += 1
            return _NO_ACTIONS
        policy, index = self.policy, self.index
        target = item.target_phase
        drop: frozenset[Tier] = frozenset()
        actions: list[Action] = []
        if group.matched_rules:
            raised_by: int | None = None
            for i in sorted(group.matched_rules):
                if not 0 <= i < len(policy.rules):
                    continue
                rule = policy.rules[i]
                if not rule.matured(item.created_at, self.now_required):
                    continue
                if rule.phase is not None and rule.phase.rank > target.rank:
                    target, raised_by = rule.phase, i
                drop |= rule.drop_tiers
            if raised_by is not None:
                self.counters["phase_raised"] += 1
                actions.append(SetPhase(item.oid, target, f"aging rule [{raised_by}] matured"))
        keep, occupied = self._have_and_occupied(group.replicas, drop)
        online = index.online
        for p in keep:
            if not online[p]:
                keep = {p for p in keep if online[p]}
                break
        sources: list[tuple[int, ReplicaView]] | None = None
        if not index.meets(policy, target, keep):
            sources = self._sources(group.replicas)
            if sources:
                actions.extend(self._fill(item, target, keep, occupied, sources, "migrate", drop))
            else:
                self.counters["shortfalls"] += 1
                actions.append(Shortfall(item.oid, "migrate: no intact copy to copy from"))
        need = max(policy.copies[target.rank], 1)
        if len(group.replicas) > need:  # a deletion must leave `need` intact copies
            if sources is None:
                sources = self._sources(group.replicas)
            if len(sources) > need:
                actions.extend(self._surplus(item, sources, target, drop))
        return actions

    def _surplus(
        self, item: ItemView, intact: list[tuple[int, ReplicaView]], phase: Phase, drop: frozenset[Tier]
    ) -> list[Action]:
        storages = self.index.storages
        remaining = {p for p, _ in intact}

        def order(pr: tuple[int, ReplicaView]) -> tuple[int, float, str]:
            s = storages[pr[0]]
            kind = 0 if s.tier in drop else 1 if s.state == StorageState.DRAINING else 2
            return (kind, self._free_ratio(pr[0]), s.name)

        actions: list[Action] = []
        for p, r in sorted(intact, key=order):
            if p not in remaining:
                continue  # a second READY row on one storage: the first decides
            if self._deletable(phase, remaining, p):
                remaining.discard(p)
                s = storages[p]
                if s.tier in drop:
                    why = f"migrate: tier {s.tier.value} dropped"
                elif s.state == StorageState.DRAINING:
                    why = "migrate: storage draining"
                else:
                    why = f"migrate: surplus copy for {phase.value}"
                self.counters["deletes"] += 1
                actions.append(DeleteReplica(r.uid, item.oid, r.storage_id, r.path, item.size, why))
        return actions


# --------------------------------------------------------------------------- expire


class ExpirePlanner(_Planner):
    """Delete expired items (all their copies) and expired copies that policy can spare.

    Item expiry (expires_at <= now on an INITIALISED, READY or CORRUPTED item) yields
    ExpireItem plus a DeleteReplica for every copy not already DELETED, LOST or
    DELETING; an item already EXPIRED gets deletes for the copies it still has (a run
    killed part-way). Replica expiry deletes an expired READY or CORRUPTED copy on a
    reachable (online/draining) storage only if the item keeps its target phase and at
    least one intact copy without it (and without the copies deleted before it in this
    plan, taken in order of expiry); otherwise it yields a Refusal saying why. PLASMA
    items need no copies, so their expired copies go down to the last one, never that.
    """

    def __init__(self, policy: Policy, *, now: datetime):
        super().__init__(policy, now=now)
        self.now_required: datetime = now

    def _plan_group(self, group: ItemGroup) -> Sequence[Action]:
        item, now = group.item, self.now_required
        if item.state == ItemState.EXPIRED or (item.state in LIVE_ITEM_STATES and _due(item.expires_at, now)):
            return self._expire_item(group)
        if item.state not in LIVE_ITEM_STATES:
            return _NO_ACTIONS
        expired = [
            r
            for r in group.replicas
            if r.expires_at is not None
            and r.expires_at <= now
            and (r.state == ReplicaState.READY or r.state == ReplicaState.CORRUPTED)
        ]
        if not expired:
            return _NO_ACTIONS
        index = self.index
        remaining = index.intact_positions(group.replicas)
        actions: list[Action] = []
        expired.sort(key=lambda r: (r.expires_at or now, str(r.uid)))
        for r in expired:
            p = index.pos.get(r.storage_id)
            if p is None or not index.intact[p]:
                self.counters["unreachable"] += 1
                continue
            intact = r.state == ReplicaState.READY
            if intact and not self._deletable(item.target_phase, remaining, p):
                left = len(remaining) - 1
                if left < 1:
                    why = "replica expiry refused: it is the item's last intact copy"
                else:
                    why = (
                        f"replica expiry refused: the item would fall below its target phase "
                        f"{item.target_phase.value} ({left} intact "
                        f"{'copy' if left == 1 else 'copies'} left)"
                    )
                self.counters["refusals"] += 1
                actions.append(Refusal(item.oid, r.uid, why))
                continue
            if intact:
                remaining.discard(p)
            self.counters["deletes"] += 1
            actions.append(DeleteReplica(r.uid, item.oid, r.storage_id, r.path, item.size, "replica expired"))
        return actions

    def _expire_item(self, group: ItemGroup) -> list[Action]:
        item = group.item
        actions: list[Action] = []
        if item.state != ItemState.EXPIRED:
            when = item.expires_at.isoformat() if item.expires_at else "?"
            self.counters["items_expired"] += 1
            actions.append(ExpireItem(item.oid, f"item expired at {when}"))
        for r in group.replicas:
            if r.state in _GONE or r.state == ReplicaState.DELETING:
                continue
            self.counters["deletes"] += 1
            actions.append(DeleteReplica(r.uid, item.oid, r.storage_id, r.path, item.size, "item expired"))
        return actions


# --------------------------------------------------------------------------- rebalance


class RebalancePlanner(_Planner):
    """Move copies off storages above the high-water mark or draining, to storages below low water.

    A shedding storage is an ONLINE one with used_bytes > high_water * capacity (it
    sheds down to low_water * capacity) or a DRAINING one (it sheds everything). For
    each READY copy on a shedding storage, while it still has bytes to shed:
    - if the item keeps its target phase and another intact copy without it (READY
      copies now, minus this plan's deletions), DeleteReplica (reason 'rebalance');
    - else if a copy of the item is already in flight to a non-shedding online
      storage, the move is under way: its bytes count as shed, nothing is emitted;
    - else Copy it (reason 'rebalance') to an ONLINE, non-shedding storage without a
      live row of the item, whose used + planned + size stays <= low_water * capacity
      (unbounded storages always qualify), preferring a destination that keeps the
      phase once the source goes, then the same tier, the same location, the most free
      ratio. Destinations only fill up during a run, so once a copy of size n on a
      storage finds none, copies of size >= n there are not tried again; the first
      such copy per storage yields a Shortfall, the rest are counted (no_destination).
    The source of a move is the copy being moved (a draining storage is still readable).
    'Largest first' is the stream's order: the flow streams the groups that have a
    copy on a shedding storage by size descending, the same order every run, so the
    copies of run 1 are the first deletions of run 2 and a storage's budget is not
    spent twice. With `report_drained`, a Drained action ends the plan for every
    draining storage on which no group of the stream had a live row: that needs the
    stream to include every item with a replica there.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        now: datetime | None = None,
        path_owner: PathOwner | None = None,
        report_drained: bool = True,
    ):
        super().__init__(policy, now=now, path_owner=path_owner)
        self.report_drained = report_drained
        self._budget: dict[UUID, float] = {}
        self._live_rows: dict[UUID, int] = {}
        self._stuck: dict[int, int] = {}

    def _start(self) -> None:
        policy = self.policy
        self._budget = {}
        self._live_rows = {}
        self._stuck = {}  # shedding storage -> smallest copy size that found no destination
        for s in self.index.storages:
            if s.state == StorageState.DRAINING:
                self._budget[s.id] = float("inf")
                self._live_rows[s.id] = 0
            elif (
                s.state == StorageState.ONLINE
                and s.capacity_bytes is not None
                and s.used_bytes > policy.high_water * s.capacity_bytes
            ):
                self._budget[s.id] = s.used_bytes - policy.low_water * s.capacity_bytes

    def _plan_group(self, group: ItemGroup) -> Sequence[Action]:
        budget = self._budget
        if not budget:
            return _NO_ACTIONS
        live_rows = self._live_rows
        touches = False
        for r in group.replicas:
            if r.storage_id in budget:
                touches = True
                if r.storage_id in live_rows and r.state not in _GONE:
                    live_rows[r.storage_id] += 1
        if not touches:
            return _NO_ACTIONS
        item = group.item
        if not _live_unexpired(item, self.now):
            self.counters["skipped"] += 1
            return _NO_ACTIONS
        index = self.index
        storages, pos_get = index.storages, index.pos.get
        sources = self._sources(group.replicas)
        remaining = {p for p, _ in sources}
        _, occupied = self._have_and_occupied(group.replicas)
        in_flight = 0
        for r in group.replicas:
            if r.state in _IN_FLIGHT and r.storage_id not in budget:
                p = pos_get(r.storage_id)
                if p is not None and index.online[p]:
                    in_flight += 1
        actions: list[Action] = []
        for p, r in sources:
            left = budget.get(r.storage_id)
            if left is None or left <= 0:
                continue
            if self._deletable(item.target_phase, remaining, p):
                remaining.discard(p)
                budget[r.storage_id] = left - item.size
                self.counters["deletes"] += 1
                actions.append(DeleteReplica(r.uid, item.oid, r.storage_id, r.path, item.size, "rebalance"))
                continue
            if in_flight:
                in_flight -= 1
                budget[r.storage_id] = left - item.size
                self.counters["moves_in_flight"] += 1
                continue
            stuck = self._stuck.get(p)
            dst = (
                None
                if stuck is not None and item.size >= stuck
                else self._destination(item, p, r, remaining, occupied)
            )
            if dst is None:
                self.counters["no_destination"] += 1
                if stuck is None:  # one Shortfall per storage and run: the rest are counted
                    name = storages[p].name
                    actions.append(
                        Shortfall(
                            item.oid, f"rebalance: no storage below low water can take its copy on {name}"
                        )
                    )
                self._stuck[p] = item.size if stuck is None else min(stuck, item.size)
                continue
            budget[r.storage_id] = left - item.size
            occupied.add(dst)
            actions.append(self._copy(item, r, dst, "rebalance"))
        return actions

    def _destination(
        self, item: ItemView, src_pos: int, src: ReplicaView, remaining: set[int], occupied: set[int]
    ) -> int | None:
        index, policy, budget = self.index, self.policy, self._budget
        storages = index.storages
        source = storages[src_pos]
        after_move = remaining - {src_pos}
        best: tuple[tuple[bool, bool, bool, float, str], int] | None = None
        for p in index.online_positions:
            s = storages[p]
            if p in occupied or s.id in budget:
                continue
            if s.capacity_bytes is not None and (
                s.used_bytes + self._planned[p] + item.size > policy.low_water * s.capacity_bytes
            ):
                continue
            if not self._path_free(p, src.path, item.oid):
                continue
            after_move.add(p)
            keeps = index.meets(policy, item.target_phase, after_move)
            after_move.discard(p)
            key = (keeps, s.tier == source.tier, s.location == source.location, self._free_ratio(p), s.name)
            if best is None or key > best[0]:
                best = (key, p)
        return None if best is None else best[1]

    def _finish(self) -> Iterator[Action]:
        if not self.report_drained:
            return
        for sid, rows in self._live_rows.items():
            if rows == 0:
                self.counters["drained"] += 1
                yield Drained(sid)


# --------------------------------------------------------------------------- benchmark helper


def synthetic_groups(
    storages: Sequence[StorageView], n: int, *, now: datetime, replicas_per_item: int = 2
) -> Iterator[ItemGroup]:
    """N synthetic LIQUID items with `replicas_per_item` READY copies each, built lazily.

    Every 20th item has one copy fewer (replicate has work to do) and every 50th copy
    has expired (expire has work to do).
    """
    created = now - timedelta(days=60)
    expired_at = now - timedelta(days=1)
    ids = [s.id for s in storages]
    n_storages = len(ids)
    item_cls, replica_cls, group_cls = ItemView, ReplicaView, ItemGroup
    liquid, ready_item, ready = Phase.LIQUID, ItemState.READY, ReplicaState.READY
    no_rules: frozenset[int] = frozenset()
    for i in range(n):
        oid = UUID(int=i + 1)
        path = f"data/{i}"
        item = item_cls(oid, path, 1, 1000 + i % 7919, liquid, ready_item, None, created, None)
        k = replicas_per_item - 1 if i % 20 == 0 else replicas_per_item
        reps = tuple(
            replica_cls(
                UUID(int=(i << 4) + j + 1),
                oid,
                ids[(i + j) % n_storages],
                path,
                ready,
                expired_at if (i + j) % 50 == 0 else None,
                created,
            )
            for j in range(k)
        )
        yield group_cls(item, reps, no_rules)


def bench_plan(n: int = 1_000_000, planner: str = "replicate") -> tuple[float, float, Counter[str]]:
    """Plan `planner` over n synthetic items (about 2n replicas).

    Returns (planning seconds, seconds spent building the synthetic views, counters):
    the views are built in chunks outside the planning clock, since in production they
    come from the catalogue query. Seconds are CPU time of this process (process_time),
    so a busy machine does not inflate them.
    """
    now = datetime.now(UTC)
    storages = [
        StorageView(
            uuid.uuid4(),
            f"s{k}",
            StorageKind.POSIX,
            (Tier.HOT, Tier.WARM, Tier.COLD, Tier.HOT)[k % 4],
            f"site{k % 3}",
            None if k % 2 else 10**15,
            10**12,
            StorageState.DRAINING if k == 7 and planner == "rebalance" else StorageState.ONLINE,
        )
        for k in range(8)
    ]
    policy = Policy()
    planners: dict[str, _Planner] = {
        "replicate": ReplicatePlanner(policy, now=now),
        "migrate": MigratePlanner(policy, now=now),
        "expire": ExpirePlanner(policy, now=now),
        "rebalance": RebalancePlanner(policy, now=now),
    }
    p = planners[planner]
    build = 0.0
    source = synthetic_groups(storages, n, now=now)

    def chunks() -> Iterator[ItemGroup]:
        nonlocal build
        while True:
            t = time.process_time()
            chunk = list(itertools.islice(source, 20_000))
            build += time.process_time() - t
            if not chunk:
                return
            yield from chunk

    start = time.process_time()
    for _ in p.plan(storages, chunks()):
        pass
    total = time.process_time() - start
    return total - build, build, p.counters
