"""Partitions split a plan by item: every action lands in exactly one partition."""

from __future__ import annotations

import uuid

import pytest

from lifecycle.errors import InvalidValueError
from lifecycle.planning.actions import Copy, Drained, SetPhase
from lifecycle.planning.partition import partition_plan
from lifecycle.planning.plan import Plan
from lifecycle.states import Phase


def plan_of(n: int) -> Plan:
    src, dst = uuid.uuid4(), uuid.uuid4()
    oids = [uuid.uuid4() for _ in range(n)]
    return Plan(
        "replicate",
        copies=[Copy(o, src, f"p{i}", dst, f"p{i}", 10, "below target") for i, o in enumerate(oids)],
        phases=[SetPhase(o, Phase.SOLID, "rule") for o in oids[: n // 2]],
        drained=[Drained(src)],
        counters={"items": n},
    )


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_every_item_is_in_exactly_one_partition(k: int) -> None:
    plan = plan_of(200)
    parts = [partition_plan(plan, k, i) for i in range(k)]

    copied = [c.item_oid for p in parts for c in p.copies]
    assert sorted(copied) == sorted(c.item_oid for c in plan.copies)  # none lost, none twice
    phased = [a.item_oid for p in parts for a in p.phases]
    assert sorted(phased) == sorted(a.item_oid for a in plan.phases)
    for p in parts:  # an item's actions stay together
        assert {a.item_oid for a in p.phases} <= {c.item_oid for c in p.copies}
    assert [len(p.drained) for p in parts] == [1] + [0] * (k - 1)
    if k > 1:
        assert all(p.copies for p in parts)  # 200 items spread over every partition


@pytest.mark.parametrize(
    ("k", "i", "message"),
    [
        (0, 0, "partitions must be at least 1, not 0"),
        (2, 2, "partition must be in 0..1, not 2"),
        (3, -1, "partition must be in 0..2, not -1"),
    ],
)
def test_a_partition_out_of_range_is_refused_in_one_line(k: int, i: int, message: str) -> None:
    with pytest.raises(InvalidValueError) as exc:
        partition_plan(plan_of(3), k, i)
    assert str(exc.value) == message
