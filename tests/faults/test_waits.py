"""Bounded waits and clean-up, with real parts: a SIGSTOPped SeaweedFS, a held SQLite writer
lock, temporary files of killed uploads, and reconcile settling what a dead run left."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import col

from devrig.seaweed import SeaweedServer
from lifecycle import settings as settings_mod
from lifecycle.catalogue.catalog import get_item
from lifecycle.catalogue.db import init_db, session_scope
from lifecycle.catalogue.ingest import IngestOptions, ingest, plan_ingest
from lifecycle.catalogue.models import Event, Replica, StorageCreate, Transfer
from lifecycle.catalogue.storages import add_storage, get_storage
from lifecycle.errors import StorageUnavailableError
from lifecycle.states import Phase, StorageKind
from lifecycle.storage.posix import PosixStorage
from lifecycle.storage.s3 import S3Storage
from lifecycle.transfer.operations import copy_files, hashsum, lsjson
from tests.faults.conftest import assert_truthful, in_flight, kill_group, make_estate, ready_on, wait_for

pytestmark = [pytest.mark.rclone]


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def stalled_s3(tmp_path: Path, s3_env) -> Iterator[SeaweedServer]:  # type: ignore[no-untyped-def]
    """A second SeaweedFS server of our own, to be SIGSTOPped; always continued and stopped."""
    server = SeaweedServer(tmp_path / "own-s3", access_key=s3_env.access_key, secret_key=s3_env.secret_key)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            os.killpg(server.proc.pid, signal.SIGCONT)
        server.stop()


def _freeze(server: SeaweedServer) -> None:
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGSTOP)


def _thaw(server: SeaweedServer) -> None:
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGCONT)


# --------------------------------------------------------------------------- a stalled storage

# Small bounds for the tests: a request with no answer for 2 s fails, one attempt each, and a
# batch gets 8 s plus 1 s per MiB.
TIGHT = {
    "DLM_TRANSFER__STALL_TIMEOUT_S": "2",
    "DLM_TRANSFER__CONTIMEOUT_S": "2",
    "DLM_TRANSFER__LOW_LEVEL_RETRIES": "1",
    "DLM_TRANSFER__DEADLINE_BASE_S": "8",
    "DLM_TRANSFER__DEADLINE_PER_FILE_S": "0",
}


@pytest.mark.s3
@pytest.mark.prefect
def test_stalled_s3_fails_the_run_within_the_bound_then_next_run_completes(  # type: ignore[no-untyped-def]
    db_url, tmp_path: Path, stalled_s3: SeaweedServer, dlm_proc
) -> None:
    from flows.pipelines import replicate

    stalled_s3.create_bucket("stalls")
    names = make_estate(tmp_path, s3=stalled_s3, bucket="stalls", n=8, size=4 * 1024**2)
    env = {**TIGHT, "RCLONE_BWLIMIT": "1M", "DLM_TRANSFER__BATCH_FILES": "4", "DLM_TRANSFER__TRANSFERS": "2"}
    p = dlm_proc("run", "replicate", env=env)
    wait_for(lambda: in_flight() > 0, 120, "copies in flight", poll=0.05, proc=p)
    _freeze(stalled_s3)  # the S3 server stops answering before any 4 MiB file is through
    frozen = time.monotonic()
    try:
        _out, err = p.communicate(timeout=180)  # the old code hung here for many minutes
    except subprocess.TimeoutExpired:
        kill_group(p)
        pytest.fail("dlm run replicate still hangs 180 s after the S3 server stalled")
    took = time.monotonic() - frozen
    text = err.decode(errors="replace")
    # Each of the two batches ends by its breaker or its 8 s + 8 s deadline; with start-up and
    # settling the run is over well within a minute.
    assert took < 60, f"the stalled run took {took:.0f}s"
    assert p.returncode == 1, text[-2000:]
    assert "Traceback" not in text
    with session_scope() as s:
        errors = list(s.scalars(select(Transfer.error).where(col(Transfer.state) == "FAILED")))
    assert len(errors) == len(names)
    assert all(e and "stalled" in e for e in errors), errors
    assert ready_on("dst") == 0 and ready_on("src") == len(names)
    assert in_flight() == 0
    _thaw(stalled_s3)
    report = replicate().as_json()
    assert report["failed"] == 0
    assert ready_on("dst") == len(names)
    assert_truthful(stalled_s3, "stalls", tmp_path)  # the objects in the bucket are the catalogue's


@pytest.mark.s3
def test_every_rclone_call_and_s3_client_gives_up_on_a_stalled_server(  # type: ignore[no-untyped-def]
    tmp_path: Path, stalled_s3: SeaweedServer, monkeypatch
) -> None:
    """The batch deadline kills rclone even when rclone's own timeouts are long, and the
    listing, hashing and boto3 calls fail within their bounds instead of hanging."""
    stalled_s3.create_bucket("frozen")
    monkeypatch.setenv("STALL_ACCESS_KEY_ID", stalled_s3.access_key)
    monkeypatch.setenv("STALL_SECRET_ACCESS_KEY", stalled_s3.secret_key)
    src = tmp_path / "src"
    src.mkdir()
    files = [f"f{i}.bin" for i in range(4)]
    for name in files:
        (src / name).write_bytes(os.urandom(1024**2))
    s3 = S3Storage("frozen", "frozen", endpoint=stalled_s3.endpoint, credentials_env="STALL")
    s3.put("seen.bin", src / files[0])
    dst = s3.rclone_target()
    # rclone would wait 120 s per request; the batch's deadline is 3 s + 4 MiB at 4 MiB/s
    for key, value in {
        "DLM_TRANSFER__STALL_TIMEOUT_S": "120",
        "DLM_TRANSFER__DEADLINE_BASE_S": "3",
        "DLM_TRANSFER__DEADLINE_PER_FILE_S": "0",
        "DLM_TRANSFER__MIN_RATE_BYTES_S": str(4 * 1024**2),
    }.items():
        monkeypatch.setenv(key, value)
    settings_mod.reset_settings()
    _freeze(stalled_s3)
    started = time.monotonic()
    report = copy_files(PosixStorage("src", src).rclone_target(), dst, files, nbytes=4 * 1024**2)
    took = time.monotonic() - started
    assert 3.5 <= took < 15, took
    assert not report.ok and set(report.failed) == set(files)
    assert all("stalled" in why and "deadline of 4s" in why for why in report.failed.values()), report.failed
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="stalled"):
        hashsum(dst, ["seen.bin"], "md5")
    assert time.monotonic() - started < 15
    # rclone's own stall timeout, and the boto3 client's
    monkeypatch.setenv("DLM_TRANSFER__STALL_TIMEOUT_S", "2")
    monkeypatch.setenv("DLM_TRANSFER__LOW_LEVEL_RETRIES", "1")
    settings_mod.reset_settings()
    started = time.monotonic()
    with pytest.raises(StorageUnavailableError, match="stalled"):
        list(lsjson(dst))
    assert time.monotonic() - started < 15
    fresh = S3Storage("frozen", "frozen", endpoint=stalled_s3.endpoint, credentials_env="STALL")
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 (whichever error: it must not hang)
        fresh.stat("seen.bin")
    assert time.monotonic() - started < 15
    _thaw(stalled_s3)
    assert hashsum(dst, ["seen.bin"], "md5") == {
        "seen.bin": hashlib.md5((src / files[0]).read_bytes()).hexdigest()
    }


# --------------------------------------------------------------------------- the writer lock


def _posix_estate(tmp: Path, n: int, size: int) -> None:
    """Posix storages 'a' (n LIQUID files) and 'b' (empty) at two locations."""
    for d in ("a", "b"):
        (tmp / d).mkdir()
    with session_scope() as s:
        a = add_storage(
            StorageCreate(name="a", kind=StorageKind.POSIX, root=str(tmp / "a"), location="x"), session=s
        )
        add_storage(
            StorageCreate(name="b", kind=StorageKind.POSIX, root=str(tmp / "b"), location="y"), session=s
        )
        names = []
        for i in range(n):
            name = f"d/f{i:03d}.bin"
            path = tmp / "a" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(hashlib.sha256(str(i).encode()).digest() * (size // 32))
            names.append(name)
        sources = plan_ingest(storage=a, paths=names, upload=False, session=s)
        ingest(storage=a, sources=sources, options=IngestOptions(phase=Phase.LIQUID), session=s)


@pytest.fixture
def sqlite_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'catalogue.db'}"
    init_db(url)
    monkeypatch.setenv("DLM_DATABASE_URL", url)
    settings_mod.reset_settings()
    return url


@pytest.mark.prefect
def test_a_run_waiting_for_the_writer_lock_names_the_holder_and_gives_up(  # type: ignore[no-untyped-def]
    sqlite_url: str, tmp_path: Path, dlm_proc
) -> None:
    _posix_estate(tmp_path, n=20, size=256 * 1024)
    holder = dlm_proc("run", "replicate", env={"RCLONE_BWLIMIT": "100k", "DLM_TRANSFER__TRANSFERS": "1"})
    wait_for(lambda: in_flight() > 0, 120, "the first run to hold the lock", proc=holder)
    started = time.monotonic()
    waiter = dlm_proc("run", "replicate", env={"DLM_WRITER_LOCK_TIMEOUT_S": "3"})
    _out, err = waiter.communicate(timeout=120)
    took = time.monotonic() - started
    text = err.decode(errors="replace")
    assert waiter.returncode == 1, text[-2000:]
    assert "Traceback" not in text
    waiting = [line for line in text.splitlines() if "holds its writer lock" in line]
    assert len(waiting) == 1, text[-2000:]  # said once, naming the holder
    assert f"replicate (pid {holder.pid} on {socket.gethostname()}" in waiting[0]
    last = text.strip().splitlines()[-1]
    assert last.startswith("dlm: error: gave up after 3s waiting for the catalogue's writer lock"), last
    assert f"pid {holder.pid}" in last
    assert 3 <= took < 60
    assert holder.poll() is None  # the holder was not disturbed
    kill_group(holder)  # a killed holder releases the lock at once (the kernel drops the flock)
    after = dlm_proc("run", "replicate", env={"DLM_WRITER_LOCK_TIMEOUT_S": "3"})
    _out, err = after.communicate(timeout=300)
    assert after.returncode == 0, err.decode(errors="replace")[-2000:]
    assert "holds its writer lock" not in err.decode(errors="replace")
    assert ready_on("b") == 20 and in_flight() == 0
    for i in range(20):
        name = f"d/f{i:03d}.bin"
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()


# --------------------------------------------------------------------------- clean-up


@pytest.mark.prefect
def test_the_next_run_removes_dead_uploads_temp_files_and_keeps_live_ones(  # type: ignore[no-untyped-def]
    db_url, tmp_path: Path, flows_env
) -> None:
    from flows.pipelines import replicate

    _posix_estate(tmp_path, n=2, size=1024)
    host = socket.gethostname()
    dead = _dead_pid()
    a = tmp_path / "a"
    hour_ago = time.time() - 7200
    files = {
        # a killed upload on this host (its pid is gone): removed whatever its age
        f"d/.dlm-tmp-{host}-{dead}-k1l2": (b"x" * 5000, None, False),
        # an upload still running in this very process: kept
        f"d/.dlm-tmp-{host}-{os.getpid()}-live": (b"y" * 300, hour_ago, True),
        # another host's upload: kept until it is stale, then removed
        f".dlm-tmp-otherhost.example-{dead}-fresh": (b"z" * 70, None, True),
        f".dlm-tmp-otherhost.example-{dead}-old": (b"w" * 90, hour_ago, False),
        # the old naming: only by age
        ".dlm-tmp-abc123": (b"v" * 11, None, True),
        "d/.dlm-tmp-oldstyle": (b"u" * 13, hour_ago, False),
    }
    for rel, (data, mtime, _) in files.items():
        path = a / rel
        path.write_bytes(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
    (tmp_path / "outside.txt").write_bytes(b"not ours")
    # a user's file whose name looks like a dead writer's, registered in place: never removed
    mine = a / f".dlm-tmp-otherhost.example-{dead}-mine"
    mine.write_bytes(b"registered")
    os.utime(mine, (hour_ago, hour_ago))
    with session_scope() as s:
        sources = plan_ingest(  # an item may not be named .dlm-*, its path may
            storage=get_storage("a", session=s), paths=[mine.name], upload=False, name="mine", session=s
        )
        ingest(storage=get_storage("a", session=s), sources=sources, options=IngestOptions(), session=s)
    report = replicate().as_json()
    rec = report["recovered"]
    gone = [rel for rel, (_, _, keep) in files.items() if not keep]
    assert rec["temp_removed"] == len(gone)
    assert rec["temp_removed_bytes"] == sum(len(files[rel][0]) for rel in gone)
    assert rec["temp_kept_live"] == len(files) - len(gone)
    for rel, (_, _, keep) in files.items():
        assert (a / rel).exists() == keep, rel
    assert (tmp_path / "outside.txt").read_bytes() == b"not ours"
    assert mine.read_bytes() == b"registered"
    for i in range(2):  # the items' own files are untouched and replicated
        name = f"d/f{i:03d}.bin"
        assert (tmp_path / "b" / name).read_bytes() == (a / name).read_bytes()
    with session_scope() as s:
        [event] = s.scalars(select(Event).where(col(Event.kind) == "storage.temp_removed"))
    assert event.details["count"] == len(gone)


@pytest.mark.prefect
def test_reconcile_settles_a_dead_claim_and_reports_stray_temporary_files(  # type: ignore[no-untyped-def]
    db_url, tmp_path: Path, flows_env
) -> None:
    from flows.integrity import reconcile

    _posix_estate(tmp_path, n=2, size=1024)
    b = tmp_path / "b"
    name = "d/f000.bin"
    # a run that died mid-copy to b: its COPYING row, a partial file at the path, rclone's
    # .partial of another file, and a temporary upload file of a live writer (this process)
    with session_scope() as s:
        item = get_item(name, session=s)
        dst_id = get_storage("b", session=s).id
        s.add(
            Replica(
                item_oid=item.oid,
                storage_id=dst_id,
                path=name,
                state="COPYING",
                claimed_by=f"{socket.gethostname()}:{_dead_pid()}",
            )
        )
    (b / "d").mkdir()
    (b / name).write_bytes(b"half")
    # a user's own file whose name looks temporary, registered in place: judged like any copy
    (b / "notes.partial").write_bytes(b"mine")
    with session_scope() as s:
        sources = plan_ingest(
            storage=get_storage("b", session=s), paths=["notes.partial"], upload=False, session=s
        )
        ingest(storage=get_storage("b", session=s), sources=sources, options=IngestOptions(), session=s)
    (b / "d" / "f001.bin.4f2a91c0.partial").write_bytes(b"p" * 777)
    (b / f".dlm-tmp-{socket.gethostname()}-{os.getpid()}-up").write_bytes(b"q" * 33)
    report = reconcile(storage="b").as_json()
    assert report["recovered"]["rolled_back"] == 1
    assert in_flight() == 0
    assert not (b / name).exists()  # the dead run's partial copy is gone, not adopted or judged
    assert report["unknown"] == 0 and report["in_flight"] == 0
    assert report["matched"] == 1 and report["lost"] == 0  # notes.partial is not taken for missing
    assert report["ignored"] == 2 and report["temporary_bytes"] == 777 + 33
    assert sorted(o["path"] for o in report["temporary_objects"]) == sorted(
        ["d/f001.bin.4f2a91c0.partial", f".dlm-tmp-{socket.gethostname()}-{os.getpid()}-up"]
    )
    assert (b / "d" / "f001.bin.4f2a91c0.partial").exists()  # reported, not removed
    with session_scope() as s:  # the claim is gone: b holds no copy of f000
        on_b = s.scalars(select(Replica.path).where(col(Replica.storage_id) == dst_id)).all()
    assert on_b == ["notes.partial"]


def test_temp_writer_names() -> None:
    from lifecycle.integrity.recovery import temp_is_dead, temp_writer
    from lifecycle.storage.posix import temp_prefix

    host = socket.gethostname()
    assert temp_writer(f"{temp_prefix()}abc") == (host, os.getpid())
    assert temp_writer(".dlm-tmp-my-host-1.lab-42-x1y2") == ("my-host-1.lab", 42)
    assert temp_writer(".dlm-tmp-k3j4_z") is None
    now = time.time()
    assert not temp_is_dead(f"{temp_prefix()}abc", mtime=now - 1e6, stale_after=timedelta(hours=1))
    assert temp_is_dead(f".dlm-tmp-{host}-{_dead_pid()}-a", mtime=now, stale_after=timedelta(hours=1))
    assert not temp_is_dead(".dlm-tmp-elsewhere-1-a", mtime=now, stale_after=timedelta(hours=1))
    assert temp_is_dead(".dlm-tmp-elsewhere-1-a", mtime=now - 7200, stale_after=timedelta(hours=1))
