"""Fault-injection helpers: `dlm` as a real subprocess, an estate of many files, invariant checks."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlmodel import col

from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.ingest import IngestOptions, ingest, plan_ingest
from lifecycle.catalogue.models import Item, Replica, Storage, Transfer
from lifecycle.states import ItemState, Phase, ReplicaState, StorageKind
from tests.factories import posix_storage, s3_storage

DLM = [sys.executable, "-m", "dlm.cli"]


def prefect_api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "the Prefect harness must be running"
    return str(url)


@pytest.fixture
def dlm_proc(flows_env: None) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `dlm ARGS` as a subprocess (own process group) against the test catalogue and the
    harness's Prefect server; every process still running at the end is killed."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        full = {**os.environ, "PREFECT_API_URL": prefect_api_url(), "DLM_OWNER": "fault", **(env or {})}
        p = subprocess.Popen(
            [*DLM, *args], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=30)
    # what the runs killed here held on the session's Prefect server (slots, Running flow
    # runs), as the next run on this DLM home would release it
    from tasks.orphans import clean_up_dead_runs, dead_records

    clean_up_dead_runs()
    assert dead_records() == [], "a killed run's slot leases or flow run could not be released"


def kill_group(p: subprocess.Popen[bytes]) -> None:
    """kill -9 the process and its children (rclone)."""
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)


def wait_for(
    cond: Callable[[], bool],
    timeout: float,
    what: str,
    poll: float = 0.1,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll until cond() holds; on time-out (or if `proc` exits first) fail with its stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(poll)
    tail = ""
    if proc is not None:
        if proc.poll() is None:
            kill_group(proc)
        _, err = proc.communicate(timeout=30)
        tail = f"; the run exited {proc.returncode}: " + err.decode(errors="replace")[-3000:]
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")


def make_estate(
    tmp: Path, *, s3: Any, bucket: str, n: int, size: int, phase: Phase = Phase.LIQUID
) -> list[str]:
    """A posix storage 'src' holding n files (ingested at `phase`) and an S3 storage 'dst'."""
    with session_scope() as s:
        src = posix_storage(s, "src", tmp / "src", location="a")
        s3_storage(s, "dst", server=s3, bucket=bucket, location="b")
        names = []
        for i in range(n):
            name = f"data/f{i:05d}.bin"
            p = tmp / "src" / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(hashlib.sha256(f"{i}".encode()).digest() * (size // 32))
            names.append(name)
        sources = plan_ingest(storage=src, paths=names, upload=False, session=s)
        ingest(storage=src, sources=sources, options=IngestOptions(phase=phase), session=s)
    return names


def in_flight() -> int:
    with session_scope() as s:
        return int(
            s.execute(
                select(func.count())
                .select_from(Replica)
                .where(col(Replica.state).in_(["PENDING", "COPYING", "DELETING"]))
            ).one()[0]
        )


def ready_on(storage: str) -> int:
    with session_scope() as s:
        return int(
            s.execute(
                select(func.count())
                .select_from(Replica)
                .join(Storage, col(Storage.id) == col(Replica.storage_id))
                .where(col(Storage.name) == storage, col(Replica.state) == "READY")
            ).one()[0]
        )


def assert_truthful(s3: Any, bucket: str, root: Path) -> None:
    """The catalogue tells the truth: no in-flight rows or running transfers, every READY
    replica's bytes are there with the item's checksum, every live item keeps an intact copy,
    no item has two live copies on one storage, and used_bytes adds up."""
    client = s3.client()
    objects: dict[str, str] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            objects[o["Key"]] = o["ETag"].strip('"')
    with session_scope() as s:
        assert in_flight() == 0
        assert (
            s.execute(
                select(func.count()).select_from(Transfer).where(col(Transfer.state) == "RUNNING")
            ).one()[0]
            == 0
        )
        rows = s.execute(
            select(
                col(Item.oid),
                col(Item.state),
                col(Item.checksum),
                col(Item.size),
                col(Replica.path),
                col(Replica.state),
                col(Storage.name),
                col(Storage.kind),
            )
            .join(Replica, col(Replica.item_oid) == col(Item.oid))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
        ).all()
        per_item: dict[Any, int] = {}
        live_pairs: set[tuple[Any, str]] = set()
        used: dict[str, int] = {}
        for oid, _istate, checksum, size, path, rstate, sname, kind in rows:
            if rstate == ReplicaState.READY:
                if kind == StorageKind.S3:
                    assert objects.get(path) == checksum, f"S3 copy of {path} missing or wrong"
                else:
                    data = (root / sname / path).read_bytes()
                    assert hashlib.md5(data).hexdigest() == checksum, f"posix copy of {path} wrong"
                per_item[oid] = per_item.get(oid, 0) + 1
                used[sname] = used.get(sname, 0) + int(size)
            if rstate not in (ReplicaState.DELETED, ReplicaState.LOST):
                assert (oid, sname) not in live_pairs, "two live copies of one item on one storage"
                live_pairs.add((oid, sname))
        for oid, istate in s.execute(select(col(Item.oid), col(Item.state))).all():
            if istate in (ItemState.READY,):
                assert per_item.get(oid, 0) >= 1, f"live item {oid} has no intact copy"
        for st in s.scalars(select(Storage)):
            assert st.used_bytes == used.get(st.name, 0), f"used_bytes of {st.name} drifted"
        # S3 holds nothing the catalogue does not know (no orphans of killed runs)
        known = {
            path for *_, path, rstate, sname, kind in rows if kind == StorageKind.S3 and rstate == "READY"
        }
        assert set(objects) - {".dlm-storage"} == known  # and the storage's marker
