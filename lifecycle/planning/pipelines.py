"""Plans each lifecycle pipeline from the catalogue: storage views, prefiltered groups, a planner.

`make_plan` is what every flow calls first (and all that `--dry-run` does): it reads the
catalogue and returns the actions, changing nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlmodel import Session

from lifecycle.catalogue.models import utcnow
from lifecycle.catalogue.query_sql import compile_filter
from lifecycle.planning.expire import ExpirePlanner
from lifecycle.planning.plan import Plan
from lifecycle.planning.planner import MigratePlanner, ReplicatePlanner
from lifecycle.planning.policy import Policy, StorageIndex
from lifecycle.planning.rebalance import RebalancePlanner
from lifecycle.planning.snapshot import (
    PathIndex,
    expire_groups,
    migrate_groups,
    rebalance_groups,
    replicate_groups,
    shedding_storages,
    storage_views,
)
from lifecycle.runs import PLACEMENT, Pipeline, parse_pipeline
from lifecycle.settings import Settings, get_settings
from lifecycle.states import StorageState


def policy_from(settings: Settings | None = None) -> Policy:
    """The policy in force. Raises InvalidValueError for a bad copies count or aging rule."""
    s = settings or get_settings()
    return Policy.from_settings(s.policy, s.rebalance)


def make_plan(
    session: Session,
    pipeline: Pipeline | str,
    *,
    now: datetime | None = None,
    only: Sequence[uuid.UUID] | None = None,
    policy: Policy | None = None,
    max_items: int | None = None,
    max_bytes: int | None = None,
) -> Plan:
    """Plan one pipeline over the catalogue as it is now.

    `pipeline` is a placement pipeline (lifecycle.runs.PLACEMENT), or its name. `only`
    restricts replicate to those items (an event-triggered run). Raises InvalidValueError
    for an unknown pipeline (or one that does not plan) or a bad policy, InvalidFilterError
    for an aging rule whose filter does not parse.
    """
    pipeline = parse_pipeline(pipeline, among=PLACEMENT)
    settings = get_settings()
    policy = policy or policy_from(settings)
    now = now or utcnow()
    max_items = max_items if max_items is not None else settings.transfer.max_items_per_run
    max_bytes = max_bytes if max_bytes is not None else settings.transfer.max_bytes_per_run
    storages = storage_views(session)
    index = StorageIndex(storages)
    paths = PathIndex(storages=[s.id for s in storages if s.state == StorageState.ONLINE])
    if pipeline is Pipeline.REPLICATE:
        planner: ReplicatePlanner | MigratePlanner | ExpirePlanner | RebalancePlanner = ReplicatePlanner(
            policy, now=now, path_owner=paths
        )
        groups = replicate_groups(session, policy, index, now=now, only=only, path_index=paths)
    elif pipeline is Pipeline.MIGRATE:
        planner = MigratePlanner(policy, now=now, path_owner=paths)
        groups = migrate_groups(session, policy, now=now, compile_rule=compile_filter, path_index=paths)
    elif pipeline is Pipeline.EXPIRE:
        planner = ExpirePlanner(policy, now=now)
        groups = expire_groups(session, now=now)
    else:  # Pipeline.REBALANCE
        shedding = shedding_storages(storages, policy)
        # a shedding storage is never a destination: its paths need no lookup
        paths.storages = [sid for sid in paths.storages if sid not in shedding]
        planner = RebalancePlanner(policy, now=now, path_owner=paths)
        groups = rebalance_groups(session, shedding, path_index=paths)
    plan = Plan.collect(
        pipeline.value,
        planner.plan(storages, groups),
        max_items=max_items,
        max_bytes=max_bytes,
        on_deferred=planner.unplan,
    )
    plan.counters.update({k: int(v) for k, v in planner.counters.items()})
    return plan
