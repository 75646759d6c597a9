"""Crash recovery at the core (lifecycle.integrity.recovery): what a dead run left in flight is
settled against what the storages really hold, and a dead writer's temporary file is removed
while a live writer's is never touched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlmodel import col

from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Event, Replica, Storage, utcnow
from lifecycle.catalogue.storages import get_storage
from lifecycle.integrity.recovery import remove_dead_temp_files, settle_in_flight
from lifecycle.states import ReplicaState
from lifecycle.storage import s3 as s3_module
from lifecycle.storage.posix import TEMP_PREFIX
from tests.factories import (
    Estate,
    copy_on,
    event_kinds,
    on_hot_and,
    payload,
    rot_behind_stored_md5,
    states_of,
)

pytestmark = [pytest.mark.s3, pytest.mark.rclone]

HOUR = timedelta(hours=1)


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process of this host that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def temp_name(pid: int, host: str | None = None) -> str:
    return f"{TEMP_PREFIX}{host or socket.gethostname()}-{pid}-x1y2"


def test_a_dead_writers_temp_file_is_removed_and_a_live_ones_kept(estate: Estate, dead_pid: int) -> None:
    dead, live = f"run1/{temp_name(dead_pid)}", f"run1/{temp_name(os.getpid())}"
    remote, old_style = f"run1/{temp_name(dead_pid, 'otherhost')}", f"{TEMP_PREFIX}a1b2c3"
    for path in (dead, live, remote, old_style):
        estate.write("hot", path, b"partial upload")
    with session_scope() as s:
        report = remove_dead_temp_files(s, stale_after=HOUR)
    assert (report.temp_removed, report.temp_removed_bytes, report.temp_kept_live) == (1, 14, 3)
    assert estate.read("hot", dead) is None
    for kept in (live, remote, old_style):  # alive, or on another host / unnamed and not yet stale
        assert estate.read("hot", kept) == b"partial upload"
    with session_scope() as s:
        [event] = s.scalars(select(Event).where(col(Event.kind) == "storage.temp_removed")).all()
        assert event.details["paths"] == [dead]
    with session_scope() as s:  # once stale, another host's file and an old-style one go too
        later = remove_dead_temp_files(s, stale_after=timedelta(seconds=-60))
    assert later.temp_removed == 2 and estate.read("hot", live) == b"partial upload"


def put_in_flight(name: str, storage: str, state: ReplicaState, claimed_by: str) -> None:
    """The copy of NAME on STORAGE as a dead run left it: STATE, held by CLAIMED_BY (a copy
    in flight is not in the storage's used bytes yet, one being deleted still is)."""
    row = copy_on(name, storage)
    with session_scope() as s:
        held = update(Replica).where(col(Replica.uid) == row.uid)
        s.execute(held.values(state=state.value, claimed_by=claimed_by))
        if state == ReplicaState.COPYING:
            used = col(Storage.used_bytes)
            s.execute(update(Storage).where(col(Storage.id) == row.storage_id).values(used_bytes=used - 3000))


@pytest.mark.parametrize("storage", ["warm", "cold"])
def test_a_dead_runs_rows_are_settled_by_what_the_storage_holds(
    estate: Estate, tmp_path: Path, dead_pid: int, storage: str
) -> None:
    names = ("landed.dat", "partial.dat", "deleted.dat", "undeleted.dat", "live.dat")
    on_hot_and(storage, names, staging=tmp_path / "staging")
    dead = f"{socket.gethostname()}:{dead_pid}"
    put_in_flight("landed.dat", storage, ReplicaState.COPYING, dead)
    put_in_flight("partial.dat", storage, ReplicaState.COPYING, dead)
    estate.write(storage, "partial.dat", payload("partial.dat")[:1000])
    put_in_flight("deleted.dat", storage, ReplicaState.DELETING, dead)
    estate.remove(storage, "deleted.dat")
    put_in_flight("undeleted.dat", storage, ReplicaState.DELETING, dead)
    put_in_flight("live.dat", storage, ReplicaState.COPYING, f"{socket.gethostname()}:{os.getpid()}")
    with session_scope() as s:
        report = settle_in_flight(s, stale_after=HOUR)
    assert report.errors == {}
    assert (report.completed, report.rolled_back, report.deleted, report.restored) == (1, 1, 1, 1)
    assert report.skipped_live == 1
    assert states_of("landed.dat") == sorted([("hot", "READY"), (storage, "READY")])
    assert estate.read(storage, "landed.dat") == payload("landed.dat")
    assert states_of("partial.dat") == [("hot", "READY")]  # the claim is gone...
    assert estate.read(storage, "partial.dat") is None  # ...and so are the partial bytes
    assert event_kinds("partial.dat")[-1] == "transfer.failed"
    assert states_of("deleted.dat") == [("hot", "READY")]
    assert states_of("undeleted.dat") == sorted([("hot", "READY"), (storage, "READY")])
    assert estate.read(storage, "undeleted.dat") == payload("undeleted.dat")
    assert states_of("live.dat") == sorted([("hot", "READY"), (storage, "COPYING")])  # its run is alive
    with session_scope() as s:
        assert (
            get_storage(storage, session=s).used_bytes == 2 * 3000
        )  # landed and undeleted (live is in flight)


def test_a_bulk_listed_file_awaiting_its_checksum_is_never_judged_by_recovery(
    estate: Estate, tmp_path: Path
) -> None:
    """`ingest --from-list` without checksums registers the user's files INITIALISED with a
    PENDING copy that waits for its checksum. Recovery once took such a copy, an hour old, for
    a dead run's copy with the wrong bytes, and deleted the user's file."""
    from lifecycle.catalogue.bulk import register_from_list

    estate.write("hot", "listed/f.dat", payload("listed/f.dat"))
    listing = tmp_path / "list.jsonl"
    listing.write_text('{"name": "listed/f.dat", "size": 3000}\n')
    with session_scope() as s:
        register_from_list(s, storage=get_storage("hot", session=s), source=listing)
    with session_scope() as s:
        s.execute(update(Replica).values(updated_at=utcnow() - 2 * HOUR))
    with session_scope() as s:
        report = settle_in_flight(s, stale_after=HOUR)
    assert (report.completed, report.rolled_back) == (0, 0)
    assert estate.read("hot", "listed/f.dat") == payload("listed/f.dat")
    assert states_of("listed/f.dat") == [("hot", "PENDING")]


def test_a_dead_runs_copy_in_parts_on_s3_is_judged_by_its_bytes(
    estate: Estate, tmp_path: Path, dead_pid: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead run's copy that went up to S3 in parts (the cutoff lowered so 3000 bytes are
    one) and whose bytes rotted behind the MD5 stored with it: rclone would report the stored
    MD5, the catalogue's; recovery reads the bytes, so the copy is not taken as landed."""
    monkeypatch.setattr(s3_module, "RCLONE_UPLOAD_CUTOFF", 1000)
    on_hot_and("cold", ("rotten.dat", "whole.dat"), staging=tmp_path / "staging")
    dead = f"{socket.gethostname()}:{dead_pid}"
    for name in ("rotten.dat", "whole.dat"):
        put_in_flight(name, "cold", ReplicaState.COPYING, dead)
    rot_behind_stored_md5(estate, estate.bucket, "rotten.dat", payload("rotten.dat"))
    with session_scope() as s:
        report = settle_in_flight(s, stale_after=HOUR)
    assert report.errors == {}
    assert (report.completed, report.rolled_back) == (1, 1)
    assert states_of("rotten.dat") == [("hot", "READY")]
    assert estate.read("cold", "rotten.dat") is None  # the wrong bytes are gone
    assert estate.read("hot", "rotten.dat") == payload("rotten.dat")
    assert states_of("whole.dat") == sorted([("cold", "READY"), ("hot", "READY")])
    assert estate.read("cold", "whole.dat") == payload("whole.dat")
