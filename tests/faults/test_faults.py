"""Fault injection with real PostgreSQL/SQLite, SeaweedFS and rclone: kills, outages, races, dropped DB."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select
from sqlmodel import col

from devrig.seaweed import SeaweedServer
from lifecycle.catalogue.catalog import get_item, set_expiry
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Event, Item, Replica, Transfer, utcnow
from lifecycle.catalogue.storages import get_storage
from tests.faults.conftest import assert_truthful, in_flight, kill_group, make_estate, ready_on, wait_for

pytestmark = [pytest.mark.prefect, pytest.mark.s3, pytest.mark.rclone]

SLOW = {"RCLONE_BWLIMIT": "1M", "DLM_TRANSFER__BATCH_FILES": "40", "DLM_TRANSFER__TRANSFERS": "2"}


def test_kill_9_mid_batch_then_rerun_converges(db_url, tmp_path: Path, s3_env, s3_bucket, dlm_proc) -> None:  # type: ignore[no-untyped-def]
    from flows.pipelines import replicate

    names = make_estate(tmp_path, s3=s3_env, bucket=s3_bucket, n=160, size=64 * 1024)
    # batches run in parallel and each takes ~6 s at 400 KB/s: kill in the middle of them
    p = dlm_proc("run", "replicate", env={**SLOW, "RCLONE_BWLIMIT": "400k"})
    wait_for(lambda: in_flight() > 0, 120, "copies in flight", proc=p)
    time.sleep(2.5)
    kill_group(p)
    assert in_flight() > 0  # the crash left claims behind
    report = replicate().as_json()
    assert report["recovered"]["rolled_back"] + report["recovered"]["completed"] > 0
    assert ready_on("dst") == len(names)
    assert_truthful(s3_env, s3_bucket, tmp_path)
    with session_scope() as s:
        assert s.execute(
            select(func.count()).select_from(Transfer).where(col(Transfer.state) == "DONE")
        ).one()[0] == len(names)


def test_s3_server_stopped_mid_run_then_restart_completes(db_url, tmp_path: Path, s3_env, dlm_proc) -> None:  # type: ignore[no-untyped-def]
    from flows.pipelines import replicate

    server = SeaweedServer(tmp_path / "own-s3", access_key=s3_env.access_key, secret_key=s3_env.secret_key)
    server.start()
    try:
        server.create_bucket("outage")
        names = make_estate(tmp_path, s3=server, bucket="outage", n=60, size=256 * 1024)
        p = dlm_proc("run", "replicate", env={**SLOW, "DLM_TRANSFER__BATCH_FILES": "20"})
        wait_for(lambda: in_flight() > 0, 120, "copies in flight", proc=p)
        time.sleep(2)  # a few files are on S3, most are not
        server.stop(grace=0)  # the S3 server dies mid-run
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 1, err.decode()[-2000:]  # the run reports failures, cleanly
        assert "Traceback" not in err.decode()
        with session_scope() as s:
            failed = s.execute(
                select(func.count()).select_from(Transfer).where(col(Transfer.state) == "FAILED")
            ).one()[0]
            deleted = s.execute(
                select(func.count()).select_from(Event).where(col(Event.kind) == "replica.deleted")
            ).one()[0]
            states = set(s.scalars(select(Item.state)))
        assert failed > 0 and deleted == 0 and states == {"READY"}
        assert ready_on("src") == len(names)  # every item keeps its phase-1 copy
        assert in_flight() == 0
        server.start()  # same ports, same data
        report = replicate().as_json()
        assert report["failed"] == 0
        assert ready_on("dst") == len(names)
        assert_truthful(server, "outage", tmp_path)
    finally:
        server.stop()


@pytest.mark.postgres
def test_two_expire_and_two_replicate_runs_at_once(
    pg_db_url, tmp_path: Path, s3_env, s3_bucket, dlm_proc
) -> None:  # type: ignore[no-untyped-def]
    names = make_estate(tmp_path, s3=s3_env, bucket=s3_bucket, n=120, size=8 * 1024)
    expired = names[:40]
    with session_scope() as s:
        for name in expired:
            set_expiry(name, utcnow(), session=s)
    procs = [dlm_proc("run", p) for p in ("expire", "replicate", "expire", "replicate")]
    for p in procs:
        _out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()[-2000:]
    # a second round settles whatever the first round's races left for later
    for p in [dlm_proc("run", "replicate"), dlm_proc("run", "expire")]:
        p.communicate(timeout=600)
    with session_scope() as s:
        for name in expired:
            assert get_item(name, session=s).state == "DELETED"
        per_replica = s.execute(
            select(col(Event.replica_uid), func.count())
            .where(col(Event.kind) == "replica.deleted")
            .group_by(col(Event.replica_uid))
        ).all()
        copies = s.execute(
            select(func.count()).select_from(Transfer).where(col(Transfer.state) == "DONE")
        ).one()[0]
    assert per_replica and all(n == 1 for _, n in per_replica)  # no double deletion
    assert copies == ready_on("dst") + sum(1 for _ in ()) and copies <= len(names)  # no double copy
    assert ready_on("dst") == len(names) - len(expired)
    assert_truthful(s3_env, s3_bucket, tmp_path)


@pytest.mark.postgres
def test_database_connection_dropped_mid_run(pg_db_url, tmp_path: Path, s3_env, s3_bucket, dlm_proc) -> None:  # type: ignore[no-untyped-def]
    from flows.pipelines import replicate

    names = make_estate(tmp_path, s3=s3_env, bucket=s3_bucket, n=120, size=64 * 1024)
    p = dlm_proc("run", "replicate", env=SLOW)
    wait_for(lambda: in_flight() > 0, 120, "copies in flight", proc=p)
    admin = sa.create_engine(pg_db_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).scalar()
    finally:
        admin.dispose()
    assert killed and killed > 0
    _out, err = p.communicate(timeout=300)
    text = err.decode()
    assert "Traceback" not in text.split("dlm: error:")[-1]
    report = replicate().as_json()
    assert report["failed"] == 0
    assert ready_on("dst") == len(names)
    assert_truthful(s3_env, s3_bucket, tmp_path)


def test_recovery_leaves_live_claims_alone(db_url, tmp_path: Path, s3_env, s3_bucket, flows_env) -> None:  # type: ignore[no-untyped-def]
    """A claim held by a live process is not rolled back by another run's recovery."""
    from datetime import timedelta

    from lifecycle.integrity.recovery import settle_in_flight

    [name] = make_estate(tmp_path, s3=s3_env, bucket=s3_bucket, n=1, size=1024)
    with session_scope() as s:
        item = get_item(name, session=s)
        dst = get_storage("dst", session=s)
        s.add(
            Replica(
                item_oid=item.oid, storage_id=dst.id, path=name, state="COPYING", claimed_by="elsewhere:1"
            )
        )
    with session_scope() as s:
        rep = settle_in_flight(s, stale_after=timedelta(hours=1))
    assert rep.skipped_live == 1 and in_flight() == 1
    time.sleep(0.01)
    with session_scope() as s:
        rep = settle_in_flight(s, stale_after=timedelta(0))  # now it counts as stale
    assert rep.rolled_back == 1 and in_flight() == 0
