"""The plan of one pipeline run and its batches: what planning hands to apply."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
from lifecycle.planning.batching import cut

# --------------------------------------------------------------------------- plans and batches


@dataclass
class Plan:
    """The actions of one planning run, sorted by kind, with the planner's counters."""

    pipeline: str
    copies: list[Copy] = field(default_factory=list)
    deletes: list[DeleteReplica] = field(default_factory=list)
    expires: list[ExpireItem] = field(default_factory=list)
    phases: list[SetPhase] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    shortfalls: list[Shortfall] = field(default_factory=list)
    drained: list[Drained] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    @classmethod
    def collect(
        cls,
        pipeline: str,
        actions: Iterable[Action],
        *,
        max_items: int | None = None,
        max_bytes: int | None = None,
        on_deferred: Callable[[Copy], None] | None = None,
    ) -> Plan:
        """Sort actions by kind; what lies beyond the run's bounds is left for a later run (and
        counted as deferred): copies beyond `max_items` copies or `max_bytes`, and the
        deletions, expiries and phase changes of items beyond the first `max_items` items
        that have any (an item's are kept or left together). A plan, and the memory its
        planning takes, so stays bounded however large the catalogue; reports (refusals,
        shortfalls, drained storages) are all kept."""
        plan = cls(pipeline)
        acting: set[uuid.UUID] = set()  # items with deletions, expiries or phase changes kept
        by_kind: dict[type, list[Any]] = {
            DeleteReplica: plan.deletes,
            ExpireItem: plan.expires,
            SetPhase: plan.phases,
            Refusal: plan.refusals,
            Shortfall: plan.shortfalls,
            Drained: plan.drained,
        }
        copied_bytes = deferred = 0
        for a in actions:
            if isinstance(a, DeleteReplica | ExpireItem | SetPhase):
                if max_items is not None and a.item_oid not in acting and len(acting) >= max_items:
                    deferred += 1
                    continue
                acting.add(a.item_oid)
                by_kind[type(a)].append(a)
            elif not isinstance(a, Copy):
                by_kind[type(a)].append(a)
            elif (max_items is not None and len(plan.copies) >= max_items) or (
                max_bytes is not None and copied_bytes + a.size > max_bytes and plan.copies
            ):
                deferred += 1
                if on_deferred is not None:  # the planner forgets it (Planner.unplan)
                    on_deferred(a)
            else:
                copied_bytes += a.size
                plan.copies.append(a)
        if deferred:
            plan.counters["deferred"] = deferred
        return plan

    @property
    def empty(self) -> bool:
        return not (
            self.copies or self.deletes or self.expires or self.phases or self.refusals or self.drained
        )

    def summary(self) -> dict[str, int]:
        return {
            "copies": len(self.copies),
            "copy_bytes": sum(c.size for c in self.copies),
            "deletes": len(self.deletes),
            "expired_items": len(self.expires),
            "phase_changes": len(self.phases),
            "refusals": len(self.refusals),
            "shortfalls": len(self.shortfalls),
            "drained": len(self.drained),
            "deferred": self.counters.get("deferred", 0),
        }


@dataclass(frozen=True)
class CopyBatch:
    src_storage_id: uuid.UUID
    dst_storage_id: uuid.UUID
    copies: tuple[Copy, ...]

    @property
    def bytes(self) -> int:
        return sum(c.size for c in self.copies)


@dataclass(frozen=True)
class DeleteBatch:
    storage_id: uuid.UUID
    deletes: tuple[DeleteReplica, ...]
    expiring: frozenset[uuid.UUID] = frozenset()


def batch_copies(copies: Sequence[Copy], *, max_files: int, max_bytes: int) -> list[CopyBatch]:
    """Group copies by (source, destination) storage, then cut at max_files or max_bytes."""
    cuts = cut(
        copies, key=lambda c: (c.src_storage_id, c.dst_storage_id), max_files=max_files, max_bytes=max_bytes
    )
    return [CopyBatch(src, dst, batch) for (src, dst), batch in cuts]


def batch_deletes(
    deletes: Sequence[DeleteReplica], *, max_files: int, expiring: Iterable[uuid.UUID] = ()
) -> list[DeleteBatch]:
    """Group deletions by storage, cut at max_files."""
    exp = frozenset(expiring)
    groups: dict[uuid.UUID, list[DeleteReplica]] = defaultdict(list)
    for d in deletes:
        groups[d.storage_id].append(d)
    return [
        DeleteBatch(sid, tuple(group[i : i + max_files]), exp)
        for sid, group in groups.items()
        for i in range(0, len(group), max_files)
    ]
