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

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from uuid import UUID

from lifecycle.planning.actions import Action, Copy, DeleteReplica, ItemGroup, PathOwner, SetPhase, Shortfall
from lifecycle.planning.policy import ItemView, Policy, ReplicaView, StorageIndex, StorageView
from lifecycle.states import ItemState, Phase, ReplicaState, StorageKind, StorageState, Tier

__all__ = [
    "Action",
    "Copy",
    "DeleteReplica",
    "ItemGroup",
    "MigratePlanner",
    "PathOwner",
    "ReplicatePlanner",
    "SetPhase",
    "Shortfall",
]
"""(storage_id, path) -> oid of the item whose live replica uses that path there, or None."""

GONE = frozenset({ReplicaState.DELETED, ReplicaState.LOST})
IN_FLIGHT = frozenset({ReplicaState.PENDING, ReplicaState.COPYING})
_TIER_PREFERENCE = {Tier.HOT: 3, Tier.WARM: 2, Tier.COLD: 1, Tier.ARCHIVE: 0}
_SOURCE_TIER_RANK = {Tier.HOT: 0, Tier.WARM: 1, Tier.COLD: 2, Tier.ARCHIVE: 3}
NO_ACTIONS: tuple[Action, ...] = ()
# Members bound once: the hot loops compare against these (enum attribute lookups cost).
_READY = ReplicaState.READY
_ITEM_READY = ItemState.READY


def due(when: datetime | None, now: datetime | None) -> bool:
    return when is not None and now is not None and when <= now


# --------------------------------------------------------------------------- shared machinery


class Planner:
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

    def unplan(self, copy: Copy) -> None:
        """Forget a copy this plan made but the run leaves for later (beyond its bounds): its
        bytes no longer count against the destination, nor its path as taken, and the plan's
        memory stays bounded by the run's bounds, not by the catalogue."""
        p = self.index.pos[copy.dst_storage_id]
        self._planned[p] -= copy.size
        if self._planned_paths.get((p, copy.dst_path)) == copy.item_oid:
            del self._planned_paths[(p, copy.dst_path)]

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
            if st in GONE:
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
            elif st in IN_FLIGHT and online[p]:
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


def live_unexpired(item: ItemView, now: datetime | None) -> bool:
    if item.state != _ITEM_READY:
        return False
    expires_at = item.expires_at
    return expires_at is None or now is None or expires_at > now


# --------------------------------------------------------------------------- replicate


class ReplicatePlanner(Planner):
    """Add copies until each READY, unexpired item meets its target phase.

    Copies in flight (PENDING/COPYING on an online storage) count as present, so a
    run does not duplicate the previous run's work. Items whose only copies are on
    offline storages, or that cannot get enough room, storages or free paths, yield a
    Shortfall (after whatever partial copies help).
    """

    def _plan_group(self, group: ItemGroup) -> Sequence[Action]:
        item = group.item
        if not live_unexpired(item, self.now):
            self.counters["skipped"] += 1
            return NO_ACTIONS
        have, occupied = self._have_and_occupied(group.replicas)
        if self.index.meets(self.policy, item.target_phase, have):
            self.counters["satisfied"] += 1
            return NO_ACTIONS
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


class MigratePlanner(Planner):
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
        if not live_unexpired(item, self.now):
            self.counters["skipped"] += 1
            return NO_ACTIONS
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
