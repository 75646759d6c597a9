"""Partitioned runs: K runs of one pipeline share its plan by item, each keeping the actions of
the items whose oid falls in its partition (oid mod K), so no two of them act on one item."""

from __future__ import annotations

from dataclasses import replace
from uuid import UUID

from lifecycle.errors import InvalidValueError
from lifecycle.planning.plan import Plan

# Each partition plans the whole catalogue (and is a sub-run on a deployment): far more
# partitions than workers only multiplies that cost.
MAX_PARTITIONS = 256


def check_partition(partitions: int, partition: int | None) -> None:
    """Raises InvalidValueError unless 1 <= partitions <= MAX_PARTITIONS and
    0 <= partition < partitions."""
    if partitions < 1:
        raise InvalidValueError(f"partitions must be at least 1, not {partitions}")
    if partitions > MAX_PARTITIONS:
        raise InvalidValueError(f"partitions must be at most {MAX_PARTITIONS}, not {partitions}")
    if partition is not None and not 0 <= partition < partitions:
        raise InvalidValueError(f"partition must be in 0..{partitions - 1}, not {partition}")


def in_partition(oid: UUID, partitions: int, partition: int) -> bool:
    """Whether item `oid` belongs to `partition` of `partitions` (its oid as an integer, mod K)."""
    return oid.int % partitions == partition


def partition_plan(plan: Plan, partitions: int, partition: int) -> Plan:
    """The part of `plan` that partition `partition` of `partitions` applies: the actions of its
    items; storage-wide ones (drained storages) go to partition 0. Counters stay the whole
    plan's."""
    check_partition(partitions, partition)
    if partitions == 1:
        return plan

    def mine(oid: UUID) -> bool:
        return in_partition(oid, partitions, partition)

    return replace(
        plan,
        copies=[a for a in plan.copies if mine(a.item_oid)],
        deletes=[a for a in plan.deletes if mine(a.item_oid)],
        expires=[a for a in plan.expires if mine(a.item_oid)],
        phases=[a for a in plan.phases if mine(a.item_oid)],
        refusals=[a for a in plan.refusals if mine(a.item_oid)],
        shortfalls=[a for a in plan.shortfalls if mine(a.item_oid)],
        drained=list(plan.drained) if partition == 0 else [],
        counters=dict(plan.counters),
    )
