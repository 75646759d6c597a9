"""Copy batches (lifecycle.apply.copy) on real posix dirs, SeaweedFS S3, rclone, SQLite and
PostgreSQL: a copy is READY only when the bytes at its destination are the item's."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import Session, col

from lifecycle.apply.copy import apply_copy_batch
from lifecycle.apply.result import BatchResult
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Storage, Transfer
from lifecycle.planning.plan import CopyBatch
from lifecycle.storage import s3 as s3_module
from tests.factories import (
    Estate,
    copy_batch,
    copy_on,
    event_kinds,
    events_of,
    ingest_payloads,
    payload,
    rot_behind_stored_md5,
    s3_storage,
    states_of,
)

pytestmark = [pytest.mark.s3, pytest.mark.rclone]

NAMES = ("run1/a.dat", "run1/b.dat", "c.dat")


def transfer_states() -> list[str]:
    with session_scope() as s:
        return sorted(str(t) for t in s.scalars(select(col(Transfer.state))))


def used_bytes(storage: str) -> int:
    with session_scope() as s:
        return int(s.scalars(select(col(Storage.used_bytes)).where(col(Storage.name) == storage)).one())


@pytest.mark.parametrize("dst", ["warm", "cold"])
def test_a_copy_batch_lands_the_items_bytes_and_marks_them_ready(
    estate: Estate, tmp_path: Path, dst: str
) -> None:
    ingest_payloads("hot", {n: payload(n) for n in NAMES}, staging=tmp_path / "staging")
    result = apply_copy_batch(copy_batch(NAMES, "hot", dst))
    assert (result.done, result.failed, result.bytes) == (3, 0, 3 * 3000), result.errors
    for name in NAMES:
        assert estate.read(dst, name) == payload(name)
        assert estate.read("hot", name) == payload(name)  # the source is only read
        assert states_of(name) == sorted([("hot", "READY"), (dst, "READY")])
        assert event_kinds(name)[-1] == "replica.created"
    assert transfer_states() == ["DONE"] * 3
    assert used_bytes(dst) == 3 * 3000


def test_the_same_batch_applied_twice_copies_nothing_twice(estate: Estate, tmp_path: Path) -> None:
    ingest_payloads("hot", {n: payload(n) for n in NAMES}, staging=tmp_path / "staging")
    batch = copy_batch(NAMES, "hot", "cold")
    assert apply_copy_batch(batch).done == 3
    again = apply_copy_batch(batch)
    assert (again.done, again.skipped) == (0, 3)
    for name in NAMES:
        assert states_of(name) == [("cold", "READY"), ("hot", "READY")]
    assert transfer_states() == ["DONE"] * 3
    assert used_bytes("cold") == 3 * 3000


@pytest.mark.parametrize("dst", ["warm", "cold"])
def test_a_source_that_no_longer_holds_the_items_bytes_leaves_no_copy(
    estate: Estate, tmp_path: Path, dst: str
) -> None:
    """Bit rot on the source (same size): what lands is not the item's, so it is removed again,
    the claim is gone and the transfer FAILED; the other files of the batch land."""
    ingest_payloads("hot", {n: payload(n) for n in NAMES}, staging=tmp_path / "staging")
    estate.flip_byte("hot", "c.dat")
    result = apply_copy_batch(copy_batch(NAMES, "hot", dst))
    assert (result.done, result.failed) == (2, 1)
    assert "checksum mismatch" in result.errors["c.dat"]
    assert estate.read(dst, "c.dat") is None
    assert states_of("c.dat") == [("hot", "READY")]
    assert event_kinds("c.dat")[-1] == "transfer.failed"
    for name in NAMES[:2]:
        assert estate.read(dst, name) == payload(name)
    assert transfer_states() == ["DONE", "DONE", "FAILED"]
    assert used_bytes(dst) == 2 * 3000


@pytest.mark.parametrize("dst", ["warm", "cold"])
def test_a_copy_over_other_bytes_at_the_destination_fails_and_leaves_them(
    estate: Estate, tmp_path: Path, dst: str
) -> None:
    """Someone else's file already at the destination path: never written over."""
    ingest_payloads("hot", {n: payload(n) for n in NAMES}, staging=tmp_path / "staging")
    theirs = b"someone else's file, same name, not DLM's" * 10
    estate.write(dst, "run1/a.dat", theirs)
    result = apply_copy_batch(copy_batch(NAMES, "hot", dst))
    assert (result.done, result.failed) == (2, 1)
    assert estate.read(dst, "run1/a.dat") == theirs
    assert states_of("run1/a.dat") == [("hot", "READY")]
    assert estate.read(dst, "run1/b.dat") == payload("run1/b.dat")


@pytest.mark.parametrize("dst", ["warm", "cold"])
def test_two_different_failures_in_one_batch_each_keep_their_own_reason(
    estate: Estate, tmp_path: Path, dst: str
) -> None:
    """A batch with a rotten source and someone else's file at a destination path: each failed
    transfer and transfer.failed event says why *that* file failed, and only those two items
    stay without a second copy (the failures are settled in bulk, not one row at a time)."""
    names = (*NAMES, "d.dat", "e.dat")
    ingest_payloads("hot", {n: payload(n) for n in names}, staging=tmp_path / "staging")
    estate.flip_byte("hot", "c.dat")
    theirs = b"not DLM's" * 400
    estate.write(dst, "run1/a.dat", theirs)
    result = apply_copy_batch(copy_batch(names, "hot", dst))
    assert (result.done, result.failed) == (3, 2)
    assert "checksum mismatch" in result.errors["c.dat"]
    assert "already exists" in result.errors["run1/a.dat"]
    with session_scope() as s:
        errors = dict(
            s.execute(
                select(col(Transfer.item_oid), col(Transfer.error)).where(col(Transfer.state) == "FAILED")
            ).all()
        )
    oid_of = {n: copy_on(n, "hot").item_oid for n in names}
    assert "checksum mismatch" in (errors[oid_of["c.dat"]] or "")
    assert "already exists" in (errors[oid_of["run1/a.dat"]] or "")
    assert set(errors) == {oid_of["c.dat"], oid_of["run1/a.dat"]}
    assert events_of("c.dat")[-1][0] == "transfer.failed"
    assert "checksum mismatch" in events_of("c.dat")[-1][1]["error"]
    assert "already exists" in events_of("run1/a.dat")[-1][1]["error"]
    assert estate.read(dst, "run1/a.dat") == theirs
    assert estate.read(dst, "c.dat") is None
    for name in ("run1/b.dat", "d.dat", "e.dat"):
        assert estate.read(dst, name) == payload(name)
        assert states_of(name) == sorted([("hot", "READY"), (dst, "READY")])
        kind, details = events_of(name)[-1]
        assert kind == "replica.created"
        assert (details["from"], details["to"], details["path"]) == ("hot", dst, name)
    assert sorted(transfer_states()) == ["DONE", "DONE", "DONE", "FAILED", "FAILED"]


# concurrent claims are PostgreSQL's (SQLite runs take the writer lock)
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_copy_another_run_is_claiming_is_left_to_it_without_waiting(
    estate: Estate, tmp_path: Path, db_url: str
) -> None:
    """PostgreSQL: while another run's claim of item a is not committed yet, this batch copies
    the others at once and skips a (no wait on the other's claim); the other run then copies a.
    Nothing is copied twice."""
    ingest_payloads("hot", {n: payload(n) for n in NAMES}, staging=tmp_path / "staging")
    claimed, release = threading.Event(), threading.Event()

    @contextmanager
    def held_open() -> Iterator[Session]:
        """The other run's sessions: its claim stays uncommitted until `release`."""
        with session_scope() as s:
            yield s
            claimed.set()
            release.wait(120)

    theirs: list[BatchResult] = []
    other = threading.Thread(
        target=lambda: theirs.append(
            apply_copy_batch(copy_batch(["run1/a.dat"], "hot", "warm"), sessions=held_open)
        ),
        daemon=True,
    )
    other.start()
    try:
        assert claimed.wait(120)
        ours: list[BatchResult] = []
        mine = threading.Thread(
            target=lambda: ours.append(apply_copy_batch(copy_batch(NAMES, "hot", "warm"))), daemon=True
        )
        mine.start()
        mine.join(120)
        assert ours, "the batch waited for the other run's claim"
        assert (ours[0].done, ours[0].skipped) == (2, 1)
    finally:
        release.set()
        other.join(120)
    assert theirs and theirs[0].done == 1
    for name in NAMES:
        assert states_of(name) == [("hot", "READY"), ("warm", "READY")]
        assert estate.read("warm", name) == payload(name)
    assert transfer_states() == ["DONE"] * 3


# Names rclone's JSON log must carry back intact: unicode, spaces, quotes, braces, names
# that look like the log's own JSON (a debug line, a hash "OK" line), a very long one.
ODD_NAMES = (
    "odd/é ü 名前 ☃.dat",
    "odd/with \"double\" and 'single' quotes.dat",
    "odd/{braces} [brackets] #hash%percent.dat",
    'odd/{"level":"debug","msg":"md5 = 0 OK","object":"x"}.dat',
    'odd/x OK",".dat',
    "odd/" + "long-" * 48 + ".dat",
    "odd/rotten ü.dat",
)


@pytest.mark.parametrize("dst", ["warm", "cold"])
def test_odd_names_in_one_batch_land_and_a_rotten_one_fails_alone(
    estate: Estate, tmp_path: Path, dst: str
) -> None:
    """A batch of files whose names are awkward in a JSON log: each lands with its bytes and a
    READY copy, except the one whose source rotted, which leaves nothing at the destination
    and fails with its own reason."""
    ingest_payloads("hot", {n: payload(n) for n in ODD_NAMES}, staging=tmp_path / "staging")
    estate.flip_byte("hot", "odd/rotten ü.dat")
    result = apply_copy_batch(copy_batch(ODD_NAMES, "hot", dst))
    assert (result.done, result.failed) == (len(ODD_NAMES) - 1, 1), result.errors
    assert set(result.errors) == {"odd/rotten ü.dat"}
    assert "checksum mismatch" in result.errors["odd/rotten ü.dat"]
    assert estate.read(dst, "odd/rotten ü.dat") is None
    assert states_of("odd/rotten ü.dat") == [("hot", "READY")]
    for name in ODD_NAMES[:-1]:
        assert estate.read(dst, name) == payload(name), name
        assert states_of(name) == sorted([("hot", "READY"), (dst, "READY")]), name
        assert events_of(name)[-1][1]["path"] == name
    assert used_bytes(dst) == (len(ODD_NAMES) - 1) * 3000


_APPLY_IN_ANOTHER_PROCESS = """
import sys
from lifecycle.apply.copy import apply_copy_batch
from tests.factories import copy_batch
names = sys.stdin.read().split("\\n")
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin = open("/dev/null")
r = apply_copy_batch(copy_batch(names, "hot", "warm"))
print(r.done, r.skipped, r.failed)
"""


# concurrent runs are PostgreSQL's (SQLite runs take the writer lock)
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_two_processes_applying_the_same_batch_copy_each_file_once(
    estate: Estate, tmp_path: Path, db_url: str
) -> None:
    """PostgreSQL: two runs (two processes) apply the same copy batch at the same moment:
    every file lands once, each item has one READY copy on the destination and one DONE
    transfer, none FAILED."""
    names = [f"many/f{i:03d}.dat" for i in range(150)]
    ingest_payloads("hot", {n: payload(n) for n in names}, staging=tmp_path / "staging")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _APPLY_IN_ANOTHER_PROCESS],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate("\n".join(names), timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    done = [int(o[1]) for o in outs]
    failed = [int(o[3]) for o in outs]
    assert sum(done) == len(names) and failed == [0, 0], outs
    with session_scope() as s:
        rows = s.execute(select(col(Transfer.item_oid), col(Transfer.state))).all()
    assert sorted(str(state) for _, state in rows) == ["DONE"] * len(names)
    assert len({oid for oid, _ in rows}) == len(names)
    for name in names:
        assert estate.read("warm", name) == payload(name)
    assert all(states_of(n) == [("hot", "READY"), ("warm", "READY")] for n in names)
    assert used_bytes("warm") == len(names) * 3000


def test_batches_between_the_same_storages_take_turns_at_rclone(
    estate: Estate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches hot -> warm and one hot -> cold, applied at the same moment from three
    threads (a run's batches in flight): the two rclone processes of hot -> warm never run at
    once (a second one only splits the same link), and every file of all three lands."""
    import lifecycle.apply.copy as copy_module

    firsts = [f"turns/a{i:02d}.dat" for i in range(40)]
    seconds = [f"turns/b{i:02d}.dat" for i in range(40)]
    others = [f"turns/c{i:02d}.dat" for i in range(10)]
    every = firsts + seconds + others
    ingest_payloads("hot", {n: payload(n) for n in every}, staging=tmp_path / "staging")
    batches = [
        copy_batch(firsts, "hot", "warm"),
        copy_batch(seconds, "hot", "warm"),
        copy_batch(others, "hot", "cold"),
    ]
    spans: list[tuple[tuple[object, object], float, float]] = []
    real_copy = copy_module.copy_files

    def timed_copy(src, dst, files, **kwargs):  # type: ignore[no-untyped-def]
        began = time.monotonic()
        try:
            return real_copy(src, dst, files, **kwargs)
        finally:
            spans.append(((src.spec, dst.spec), began, time.monotonic()))

    monkeypatch.setattr(copy_module, "copy_files", timed_copy)
    start = threading.Barrier(len(batches))
    results: list[BatchResult] = []

    def apply(batch: CopyBatch) -> None:
        start.wait()
        results.append(apply_copy_batch(batch))

    threads = [threading.Thread(target=apply, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted((r.dst, r.done, r.failed) for r in results) == [
        ("cold", 10, 0),
        ("warm", 40, 0),
        ("warm", 40, 0),
    ]
    by_pair: dict[tuple[object, object], list[tuple[float, float]]] = {}
    for pair, began, ended in spans:
        by_pair.setdefault(pair, []).append((began, ended))
    assert sorted(len(v) for v in by_pair.values()) == [1, 2], by_pair
    first, second = sorted(next(v for v in by_pair.values() if len(v) == 2))
    assert second[0] >= first[1], f"the two hot -> warm rclone processes overlapped: {first}, {second}"
    for name in every:
        assert estate.read("cold" if name in others else "warm", name) == payload(name)


@pytest.mark.parametrize("rotten", [False, True])
def test_an_s3_to_s3_copy_in_parts_is_read_back_before_it_is_ready(
    estate: Estate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rotten: bool
) -> None:
    """S3 to S3, a file rclone uploads in parts (the cutoff lowered to 5 MiB to keep the test
    small): rclone's digest for it is the source's stored MD5, not one of the bytes it read.
    A source object whose bytes rotted behind that digest must not give a READY copy: the
    copy is read back and compared with the catalogue."""
    monkeypatch.setattr(s3_module, "RCLONE_UPLOAD_CUTOFF", 5 * 1024**2)
    other = f"t-{uuid.uuid4().hex[:12]}"
    estate.s3.create_bucket(other)
    try:
        with session_scope() as s:
            s3_storage(s, "cold2", server=estate.s3, bucket=other)
        data = payload("big.dat", 6 * 1024**2)
        ingest_payloads("cold2", {"big.dat": data}, staging=tmp_path / "staging")
        if rotten:
            rot_behind_stored_md5(estate, other, "big.dat", data)
        result = apply_copy_batch(copy_batch(["big.dat"], "cold2", "cold"))
        if rotten:
            assert (result.done, result.failed) == (0, 1)
            assert "checksum mismatch" in result.errors["big.dat"]
            assert estate.read("cold", "big.dat") is None  # the wrong bytes were removed again
            assert states_of("big.dat") == [("cold2", "READY")]
        else:
            assert (result.done, result.failed) == (1, 0), result.errors
            assert estate.read("cold", "big.dat") == data
            assert states_of("big.dat") == [("cold", "READY"), ("cold2", "READY")]
    finally:
        with contextlib.suppress(Exception):
            estate.s3.delete_bucket(other)
