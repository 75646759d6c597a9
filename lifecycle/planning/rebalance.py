"""The rebalance planner: move copies off draining or over-full storages, copy first, delete after."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime
from uuid import UUID

from lifecycle.planning.actions import Action, DeleteReplica, Drained, ItemGroup, PathOwner, Shortfall
from lifecycle.planning.planner import GONE, IN_FLIGHT, NO_ACTIONS, Planner, live_unexpired
from lifecycle.planning.policy import ItemView, Policy, ReplicaView
from lifecycle.states import (
    StorageState,
)

# --------------------------------------------------------------------------- rebalance


class RebalancePlanner(Planner):
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
            return NO_ACTIONS
        live_rows = self._live_rows
        touches = False
        for r in group.replicas:
            if r.storage_id in budget:
                touches = True
                if r.storage_id in live_rows and r.state not in GONE:
                    live_rows[r.storage_id] += 1
        if not touches:
            return NO_ACTIONS
        item = group.item
        if not live_unexpired(item, self.now):
            self.counters["skipped"] += 1
            return NO_ACTIONS
        index = self.index
        storages, pos_get = index.storages, index.pos.get
        sources = self._sources(group.replicas)
        remaining = {p for p, _ in sources}
        _, occupied = self._have_and_occupied(group.replicas)
        in_flight = 0
        for r in group.replicas:
            if r.state in IN_FLIGHT and r.storage_id not in budget:
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
