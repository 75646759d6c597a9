"""An in-memory catalogue for planner tests: build views, stream groups, apply a plan's actions."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from uuid import UUID

from lifecycle.planning.actions import Action, Copy, DeleteReplica, ExpireItem, ItemGroup, PathOwner, SetPhase
from lifecycle.planning.policy import ItemView, ReplicaView, StorageIndex, StorageView
from lifecycle.states import ItemState, Phase, ReplicaState, StorageKind, StorageState, Tier

NOW = datetime(2026, 1, 1, tzinfo=UTC)
GONE = (ReplicaState.DELETED, ReplicaState.LOST)
_ids = itertools.count(1)


def new_id() -> UUID:
    """A fresh, deterministic-enough UUID."""
    return UUID(int=next(_ids))


def storage(
    name: str,
    *,
    tier: Tier = Tier.HOT,
    location: str | None = "site-a",
    capacity: int | None = None,
    used: int = 0,
    state: StorageState = StorageState.ONLINE,
    kind: StorageKind = StorageKind.POSIX,
) -> StorageView:
    """A storage view with test defaults."""
    return StorageView(new_id(), name, kind, tier, location, capacity, used, state)


def item(
    name: str,
    *,
    size: int = 10,
    phase: Phase = Phase.GAS,
    state: ItemState = ItemState.READY,
    expires_at: datetime | None = None,
    created_at: datetime = NOW - timedelta(days=1),
) -> ItemView:
    """An item view with test defaults."""
    return ItemView(new_id(), name, 1, size, phase, state, expires_at, created_at, "md5:x")


def replica(
    of: ItemView,
    on: StorageView,
    *,
    state: ReplicaState = ReplicaState.READY,
    path: str | None = None,
    expires_at: datetime | None = None,
) -> ReplicaView:
    """A replica view of `of` on `on`, at the item's name unless `path` is given."""
    return ReplicaView(new_id(), of.oid, on.id, path or of.name, state, expires_at, NOW - timedelta(days=1))


@dataclass
class Model:
    """Storages, items and replicas; `apply` returns the catalogue after a plan's actions."""

    storages: list[StorageView]
    items: list[ItemView]
    replicas: list[ReplicaView]
    matched: dict[UUID, frozenset[int]] = field(default_factory=dict)

    def groups(self) -> list[ItemGroup]:
        """One group per item, in item order, as a flow would stream them."""
        by_item: dict[UUID, list[ReplicaView]] = {i.oid: [] for i in self.items}
        for r in self.replicas:
            by_item[r.item_oid].append(r)
        return [ItemGroup(i, tuple(by_item[i.oid]), self.matched.get(i.oid, frozenset())) for i in self.items]

    def path_owner(self) -> PathOwner:
        """(storage, path) -> owner of a live replica there, from a snapshot of the catalogue."""
        owners = {(r.storage_id, r.path): r.item_oid for r in self.replicas if r.state not in GONE}
        return lambda sid, path: owners.get((sid, path))

    def item(self, oid: UUID) -> ItemView:
        return next(i for i in self.items if i.oid == oid)

    def replicas_of(self, oid: UUID) -> list[ReplicaView]:
        return [r for r in self.replicas if r.item_oid == oid]

    def index(self) -> StorageIndex:
        return StorageIndex(self.storages)

    def intact(self, oid: UUID) -> set[int]:
        """Positions of the storages holding an intact copy of the item."""
        return self.index().intact_positions(self.replicas_of(oid))

    def apply(
        self,
        actions: Iterable[Action],
        *,
        copy_state: ReplicaState = ReplicaState.READY,
        kinds: tuple[type, ...] = (Copy, DeleteReplica, ExpireItem, SetPhase),
    ) -> Model:
        """The catalogue once the actions of the given kinds are done (copies land in `copy_state`)."""
        storages = {s.id: s for s in self.storages}
        items = {i.oid: i for i in self.items}
        replicas = {r.uid: r for r in self.replicas}
        sizes = {i.oid: i.size for i in self.items}
        for a in actions:
            if not isinstance(a, kinds):
                continue
            if isinstance(a, Copy):
                uid = new_id()
                replicas[uid] = ReplicaView(
                    uid, a.item_oid, a.dst_storage_id, a.dst_path, copy_state, None, NOW
                )
                s = storages[a.dst_storage_id]
                storages[s.id] = s._replace(used_bytes=s.used_bytes + a.size)
            elif isinstance(a, DeleteReplica):
                r = replicas[a.replica_uid]
                replicas[r.uid] = r._replace(state=ReplicaState.DELETED)
                s = storages[r.storage_id]
                storages[s.id] = s._replace(used_bytes=max(0, s.used_bytes - sizes[r.item_oid]))
            elif isinstance(a, ExpireItem):
                items[a.item_oid] = items[a.item_oid]._replace(state=ItemState.EXPIRED)
            elif isinstance(a, SetPhase):
                items[a.item_oid] = items[a.item_oid]._replace(target_phase=a.phase)
        return replace(
            self,
            storages=[storages[s.id] for s in self.storages],
            items=[items[i.oid] for i in self.items],
            replicas=list(replicas.values()),
        )

    def finish_copies(self) -> Model:
        """Every PENDING/COPYING copy becomes READY (the transfers of the last run completed)."""
        done = [
            r._replace(state=ReplicaState.READY)
            if r.state in (ReplicaState.PENDING, ReplicaState.COPYING)
            else r
            for r in self.replicas
        ]
        return replace(self, replicas=done)
