"""Per-storage limits: Prefect global concurrency limits `storage:NAME` hold batches back, and
a holder killed with its slot does not block later runs for longer than its lease."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlmodel import col

from devrig.workers import REPO, PrefectServer, base_env, running_workers, stop_group
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Storage, Transfer
from lifecycle.states import TransferKind
from tests.factories import Estate
from tests.workers.conftest import catalogue_copies, ingest, worker_env

pytestmark = [pytest.mark.prefect, pytest.mark.workers]

LEASE_S = 60  # DLM_TRANSFER__SLOT_LEASE_S: the least Prefect's server accepts
REPOSSESS_S = 2  # the test server's PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS
# A killed holder's slot is free again within its lease, one repossessor pass, and the
# waiting client's back-off between attempts.
BOUND_S = LEASE_S + REPOSSESS_S + 20

HOLD = """
import sys, time
from tasks.slots import storage_slots
with storage_slots(sys.argv[1:]):
    print("held", flush=True)
    time.sleep(3600)
"""
TAKE = """
import sys, time
from tasks.slots import storage_slots
t = time.monotonic()
with storage_slots(sys.argv[1:]):
    print(f"acquired after {time.monotonic() - t:.1f}s", flush=True)
"""


def slot_env(server: PrefectServer, tmp: Path, wait_s: float) -> dict[str, str]:
    return {
        **base_env(),
        **server.env(),
        "PYTHONPATH": str(REPO),
        "DLM_HOME": str(tmp),
        "DLM_TRANSFER__STORAGE_SLOTS": "1",
        "DLM_TRANSFER__SLOT_LEASE_S": str(LEASE_S),
        "DLM_TRANSFER__SLOT_WAIT_S": str(wait_s),
    }


def take(server: PrefectServer, tmp: Path, storage: str, wait_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", TAKE, storage],
        env=slot_env(server, tmp, wait_s),
        capture_output=True,
        text=True,
        timeout=wait_s + 60,
    )


def test_a_killed_holder_keeps_its_slot_while_alive_and_frees_it_within_the_lease(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, "killed"],
        env=slot_env(prefect_server, tmp_path, 30),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().decode().strip() == "held"
        held_at = time.monotonic()
        # created on first use with DLM_TRANSFER__STORAGE_SLOTS slots, one of them taken
        limit = prefect_server.get("/v2/concurrency_limits/storage:killed")
        assert (limit["limit"], limit["active_slots"]) == (1, 1)

        # Past its first lease the holder still has the slot: it renews the lease.
        time.sleep(max(0.0, held_at + LEASE_S + 2 * REPOSSESS_S + 3 - time.monotonic()))
        refused = take(prefect_server, tmp_path, "killed", wait_s=3)
        assert refused.returncode != 0
        assert "waited 3s for a slot of storage:killed" in refused.stderr

        os.killpg(holder.pid, signal.SIGKILL)  # no release, no more renewals
        killed_at = time.monotonic()
        taken = take(prefect_server, tmp_path, "killed", wait_s=BOUND_S + 30)
        took = time.monotonic() - killed_at
        assert taken.returncode == 0, taken.stderr[-2000:]
        assert "acquired" in taken.stdout
        assert took <= BOUND_S, f"the killed holder's slot was freed only after {took:.0f}s"
    finally:
        stop_group(holder)
        if holder.stdout:
            holder.stdout.close()


def batch_spans(storage: str) -> list[tuple[datetime, datetime, str | None]]:
    """Every copy batch to or from `storage`: (claimed at, last copy settled at, flow run)."""
    with session_scope() as s:
        sid = s.execute(select(Storage.id).where(col(Storage.name) == storage)).scalar_one()
        rows = s.execute(
            select(Transfer.started_at, func.max(Transfer.finished_at), Transfer.flow_run_id)
            .where(
                col(Transfer.kind) == TransferKind.COPY.value,
                (col(Transfer.src_storage_id) == sid) | (col(Transfer.dst_storage_id) == sid),
            )
            .group_by(
                Transfer.started_at, Transfer.flow_run_id, Transfer.src_storage_id, Transfer.dst_storage_id
            )
            .order_by(Transfer.started_at)
        ).all()
    return [(a, b, r) for a, b, r in rows]


@pytest.mark.postgres
@pytest.mark.s3
@pytest.mark.rclone
def test_with_one_slot_batches_on_a_storage_never_overlap(
    prefect_server: PrefectServer, estate: Estate, pg_db_url: str, tmp_path: Path
) -> None:
    names = ingest(estate, 40, prefix="one", size=4096)
    prefect_server.set_limit("storage:hot", 1)  # as an operator caps it
    env = worker_env(pg_db_url, estate, transfer__batch_files="4", transfer__parallel_batches="2")
    try:
        with running_workers(prefect_server, tmp_path / "workers", env, limit=2) as workers:
            parent = prefect_server.create_flow_run("replicate/replicate", {"partitions": 2})
            run = prefect_server.wait_run(parent)
            assert run["state_type"] == "COMPLETED", workers.log("w1")[-3000:] + workers.log("w2")[-3000:]
    finally:
        prefect_server.set_limit("storage:hot", 4)

    spans = batch_spans("hot")
    assert len(spans) >= 10 and len({r for *_, r in spans}) == 2  # both sub-runs copied
    for (_, end, _), (start, _, _) in itertools.pairwise(spans):
        assert start >= end, f"two batches on 'hot' overlapped: one ended {end}, the next began {start}"
    copies = catalogue_copies(estate, "one", 4096)
    assert set(copies.ready) == set(names)
    assert copies.copy_transfers == {n: 1 for n in names}
