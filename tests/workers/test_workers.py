"""DLM on Prefect workers: `prefect deploy --all`, two `prefect worker` processes on the
`dlm-process` pool, runs started through the REST API, bytes read back from the storages."""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlmodel import col

from devrig.workers import PrefectServer, running_workers
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Item, Replica
from lifecycle.planning.partition import in_partition
from tests.factories import Estate
from tests.workers.conftest import catalogue_copies, ingest, worker_env

pytestmark = [
    pytest.mark.prefect,
    pytest.mark.workers,
    pytest.mark.postgres,
    pytest.mark.s3,
    pytest.mark.rclone,
]

SIZE = 2048


def test_a_worker_runs_replicate_started_through_the_rest_api(
    prefect_server: PrefectServer, estate: Estate, pg_db_url: str, tmp_path: Path
) -> None:
    names = ingest(estate, 8, prefix="rest", size=SIZE)
    env = worker_env(pg_db_url, estate, transfer__batch_files="3")
    with running_workers(prefect_server, tmp_path / "workers", env) as workers:
        run_id = prefect_server.create_flow_run("replicate/replicate", {})
        run = prefect_server.wait_run(run_id)
        assert run["state_type"] == "COMPLETED", workers.log("w1")[-3000:] + workers.log("w2")[-3000:]
        assert len(workers.ran(run_id)) == 1  # one of the two workers picked it up

    copies = catalogue_copies(estate, "rest", SIZE)
    # LIQUID: two copies, each holding the ingested bytes (read back from the storage)
    assert set(copies.ready) == set(names)
    assert all(len(where) == 2 and "hot" in where for where in copies.ready.values()), copies.ready
    assert copies.copy_transfers == {n: 1 for n in names}


def test_a_partitioned_replicate_shares_the_items_among_sub_runs_and_copies_each_once(
    prefect_server: PrefectServer, estate: Estate, pg_db_url: str, tmp_path: Path
) -> None:
    names = ingest(estate, 30, prefix="part", size=SIZE)
    env = worker_env(pg_db_url, estate, transfer__batch_files="4")
    # one run at a time per worker: the parent run holds one worker while it waits, so the two
    # sub-runs (both scheduled at once, workers polling every second) go to the other two
    names_w = ("w0", "w1", "w2")
    with running_workers(prefect_server, tmp_path / "workers", env, names=names_w, limit=1) as workers:
        parent = prefect_server.create_flow_run("replicate/replicate", {"partitions": 2})
        run = prefect_server.wait_run(parent)
        assert run["state_type"] == "COMPLETED", "".join(workers.log(w)[-2000:] for w in names_w)
        subs = [
            r
            for r in prefect_server.flow_runs("replicate/replicate")
            if r["name"].startswith("replicate-part-")
        ]
        assert sorted(r["name"] for r in subs) == ["replicate-part-1-of-2", "replicate-part-2-of-2"]
        assert all(r["state_type"] == "COMPLETED" for r in subs)
        ran_on = {r["name"]: workers.ran(r["id"]) for r in subs}
        parent_on = workers.ran(parent)
        assert len(parent_on) == 1, parent_on
        # each sub-run ran once, on its own worker, and not on the one waiting for them
        on = [w for ws in ran_on.values() for w in ws]
        assert len(on) == 2 and len(set(on)) == 2 and parent_on[0] not in on, (parent_on, ran_on)

        copies = catalogue_copies(estate, "part", SIZE)
        assert set(copies.ready) == set(names)
        assert all(len(where) == 2 and "hot" in where for where in copies.ready.values()), copies.ready
        assert copies.copy_transfers == {n: 1 for n in names}  # nothing copied twice

        # verify, partitioned the same way: each sub-run reads both copies of its own items
        verify = prefect_server.create_flow_run("verify/verify", {"partitions": 2})
        run = prefect_server.wait_run(verify)
        assert run["state_type"] == "COMPLETED", "".join(workers.log(w)[-2000:] for w in names_w)
        runs = prefect_server.flow_runs("verify/verify")
        vsubs = {r["name"]: r for r in runs if r["name"].startswith("verify-part-")}
        assert sorted(vsubs) == ["verify-part-1-of-2", "verify-part-2-of-2"]
        assert all(r["state_type"] == "COMPLETED" for r in vsubs.values())
        with session_scope() as s:
            oids = s.execute(select(col(Item.oid)).where(col(Item.name).like("part/%"))).scalars().all()
        for i in range(2):
            mine = sum(1 for oid in oids if in_partition(oid, 2, i))
            read = _logged_selection(prefect_server, vsubs[f"verify-part-{i + 1}-of-2"]["id"])
            assert read == 2 * mine, (i, read, mine)  # every copy once: none twice, none left out
    with session_scope() as s:
        unverified = s.execute(
            select(func.count())
            .select_from(Replica)
            .join(Item, col(Item.oid) == col(Replica.item_oid))
            .where(
                col(Item.name).like("part/%"),
                col(Replica.verified_at).is_(None) | (col(Replica.verified_at) < run_started(run)),
            )
        ).scalar_one()
    assert unverified == 0


def _logged_selection(server: PrefectServer, flow_run_id: str, timeout: float = 30) -> int:
    """How many copies a verify run selected, from its log line `verify: N copies (...)` (the
    run's logs reach the server shortly after its end)."""
    deadline = time.monotonic() + timeout
    while True:
        logs = server.post("/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}})
        found = [re.match(r"verify: (\d+) copies \(", entry["message"]) for entry in logs]
        counts = [int(m.group(1)) for m in found if m]
        if counts or time.monotonic() > deadline:
            (count,) = counts
            return count
        time.sleep(1)


def run_started(run: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(str(run["start_time"]).replace("Z", "+00:00"))
