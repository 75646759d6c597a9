"""The expire planner: expired replicas and items to delete, never the last intact copy of a live item."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from lifecycle.planning.actions import (
    ITEM_EXPIRED,
    REPLICA_EXPIRED,
    Action,
    DeleteReplica,
    ExpireItem,
    ItemGroup,
    Refusal,
)
from lifecycle.planning.planner import GONE, NO_ACTIONS, Planner, due
from lifecycle.planning.policy import Policy
from lifecycle.states import (
    LIVE_ITEM_STATES,
    ItemState,
    ReplicaState,
)

# --------------------------------------------------------------------------- expire


class ExpirePlanner(Planner):
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
        if item.state == ItemState.EXPIRED or (item.state in LIVE_ITEM_STATES and due(item.expires_at, now)):
            return self._expire_item(group)
        if item.state not in LIVE_ITEM_STATES:
            return NO_ACTIONS
        expired = [
            r
            for r in group.replicas
            if r.expires_at is not None
            and r.expires_at <= now
            and (r.state == ReplicaState.READY or r.state == ReplicaState.CORRUPTED)
        ]
        if not expired:
            return NO_ACTIONS
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
            actions.append(DeleteReplica(r.uid, item.oid, r.storage_id, r.path, item.size, REPLICA_EXPIRED))
        return actions

    def _expire_item(self, group: ItemGroup) -> list[Action]:
        item = group.item
        actions: list[Action] = []
        if item.state != ItemState.EXPIRED:
            when = item.expires_at.isoformat() if item.expires_at else "?"
            self.counters["items_expired"] += 1
            actions.append(ExpireItem(item.oid, f"item expired at {when}"))
        for r in group.replicas:
            if r.state in GONE or r.state == ReplicaState.DELETING:
                continue
            self.counters["deletes"] += 1
            actions.append(DeleteReplica(r.uid, item.oid, r.storage_id, r.path, item.size, ITEM_EXPIRED))
        return actions
