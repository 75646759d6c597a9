"""The actions a planner emits (copy, delete a replica, expire, set a phase, refuse,
shortfall, drained) and the grouped view of one item it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple
from uuid import UUID

from lifecycle.planning.policy import ItemView, ReplicaView
from lifecycle.states import (
    Phase,
)


class ItemGroup(NamedTuple):
    """One item with all its replica rows, and the indexes of the aging rules (Policy.rules) it matched."""

    item: ItemView
    replicas: tuple[ReplicaView, ...]
    matched_rules: frozenset[int] = frozenset()


PathOwner = Callable[[UUID, str], UUID | None]


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


# DeleteReplica.reason of a copy deleted because its own expiry came (re-checked when applied)
REPLICA_EXPIRED = "replica expired"
# The reason of the deletions of an expired item's copies: applied only while the catalogue
# still has the item EXPIRED (an expiry cleared after planning keeps them all).
ITEM_EXPIRED = "item expired"


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
