"""Synthetic catalogues for the planning benchmark: lazily built item groups and a timed plan over them."""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID

from lifecycle.planning.actions import ItemGroup
from lifecycle.planning.expire import ExpirePlanner
from lifecycle.planning.planner import MigratePlanner, Planner, ReplicatePlanner
from lifecycle.planning.policy import ItemView, Policy, ReplicaView, StorageView
from lifecycle.planning.rebalance import RebalancePlanner
from lifecycle.states import (
    ItemState,
    Phase,
    ReplicaState,
    StorageKind,
    StorageState,
    Tier,
)

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
    planners: dict[str, Planner] = {
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
