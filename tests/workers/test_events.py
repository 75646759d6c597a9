"""Bursts of `dlm.item.ready` events coalesce into a few replicate runs on the workers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import col

from deployments.serve import READY_WINDOW_S
from devrig.workers import PrefectServer, running_workers
from flows.events import announce_items_ready
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Item
from tests.factories import Estate
from tests.workers.conftest import catalogue_copies, ingest, worker_env

pytestmark = [
    pytest.mark.prefect,
    pytest.mark.workers,
    pytest.mark.postgres,
    pytest.mark.s3,
    pytest.mark.rclone,
]

ON_READY = "replicate/replicate-on-ready"


def test_two_hundred_ready_events_start_a_handful_of_runs_and_every_item_is_replicated(
    prefect_server: PrefectServer,
    estate: Estate,
    pg_db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = ingest(estate, 200, prefix="burst", size=1024)
    with session_scope() as s:
        oids = [str(o) for o in s.execute(select(Item.oid).where(col(Item.name).like("burst/%"))).scalars()]
    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api)
    env = worker_env(pg_db_url, estate, transfer__batch_files="50")
    with running_workers(prefect_server, tmp_path / "workers", env) as workers:
        time.sleep(3)  # the server's trigger service has loaded the deployment's automation
        for i in range(0, 200, 25):  # as eight `dlm ingest` commands would, over ~4 s
            assert announce_items_ready(oids[i : i + 25])
            time.sleep(0.5)
        deadline = time.monotonic() + 60
        while not prefect_server.flow_runs(ON_READY) and time.monotonic() < deadline:
            time.sleep(1)
        runs = prefect_server.wait_quiet(ON_READY)
        time.sleep(READY_WINDOW_S + 3)  # no late run starts either
        runs = prefect_server.wait_quiet(ON_READY)
        logs = workers.log("w1")[-2000:] + workers.log("w2")[-2000:]

    assert 1 <= len(runs) <= 3, [r["name"] for r in runs]
    assert all(r["state_type"] == "COMPLETED" for r in runs), logs
    copies = catalogue_copies(estate, "burst", 1024)
    assert set(copies.ready) == set(names)
    assert all(len(where) == 2 for where in copies.ready.values())
    assert copies.copy_transfers == {n: 1 for n in names}
