"""DLM on Prefect workers: `prefect deploy --all`, two `prefect worker` processes on the
`dlm-process` pool, runs started through the REST API, bytes read back from the storages."""

from __future__ import annotations

from pathlib import Path

import pytest

from devrig.workers import PrefectServer, running_workers
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
