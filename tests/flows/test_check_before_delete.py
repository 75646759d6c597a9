"""Check before delete (issue 8, reproduction 6): a deletion that relies on other copies first
confirms them on their storages, as a user runs it (`dlm` in-process) on real posix dirs, the
real SeaweedFS, rclone, SQLite and PostgreSQL; every test reads the bytes left on the storages."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlmodel import col

from lifecycle.apply.delete import apply_delete_batch
from lifecycle.apply.result import BatchResult
from lifecycle.catalogue.catalog import get_item
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Event, Replica, Storage, utcnow
from lifecycle.catalogue.storages import get_storage
from lifecycle.planning.plan import DeleteBatch
from tests.cli.conftest import Result

pytestmark = [pytest.mark.prefect, pytest.mark.rclone]

PAYLOAD = hashlib.sha256(b"l.dat").digest() * 1000  # 32 kB


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def ok(r: Result) -> Result:
    assert r.code == 0, r.err
    return r


@pytest.fixture(autouse=True)
def _prefect_console_on_real_stderr() -> Iterator[None]:
    """Prefect's console log handlers keep the stream they were made with; one made while a
    test's stdout/stderr was captured (the in-process CLI) would write to a closed file in the
    next test. Point them at the process's stderr (which pytest captures at the fd level)."""
    yield
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.stream = sys.__stderr__  # not setStream: it flushes the closed one
                handler.console.file = sys.__stderr__


@pytest.fixture
def disks(dlm: Any, db_url: str, tmp_path: Path, flows_env: None) -> Path:
    """R: disk-a on R/a (site-a) and disk-b on R/b (site-b), as in the issue."""
    for name, sub, loc in (("disk-a", "a", "site-a"), ("disk-b", "b", "site-b")):
        (tmp_path / sub).mkdir()
        ok(dlm("storage", "add", name, "--kind", "posix", "--root", str(tmp_path / sub), "--location", loc))
    return tmp_path


def liquid_on_a_and_b(dlm: Any, R: Path, name: str = "l.dat") -> str:
    """A LIQUID item ingested in place on disk-a and replicated to disk-b; returns its checksum."""
    (R / "a" / name).write_bytes(PAYLOAD)
    ok(dlm("ingest", "-s", "disk-a", str(R / "a" / name), "--phase", "LIQUID"))
    run("replicate")
    assert (R / "b" / name).read_bytes() == PAYLOAD
    assert copies(name) == [("disk-a", "READY"), ("disk-b", "READY")]
    with session_scope() as s:
        checksum = get_item(name, session=s).checksum
    assert checksum == md5(PAYLOAD)
    return checksum


def run(pipeline: str) -> dict[str, Any]:
    """`dlm run PIPELINE`'s flow, called directly (Prefect's log handlers outlive one test's
    captured stdout, so the in-process CLI runs every command but this one)."""
    from flows.registry import FLOWS

    report: dict[str, Any] = FLOWS[pipeline]().as_json()
    assert report["failed"] == 0
    return report


def copies(name: str) -> list[tuple[str, str]]:
    """(storage, state) of every replica row of NAME but the DELETED ones, sorted."""
    with session_scope() as s:
        item = get_item(name, session=s)
        rows = s.execute(
            select(col(Storage.name), col(Replica.state))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(col(Replica.item_oid) == item.oid, col(Replica.state) != "DELETED")
        ).all()
    return sorted((str(n), str(st)) for n, st in rows)


def events(kind: str) -> list[dict[str, Any]]:
    with session_scope() as s:
        rows = s.scalars(select(Event).where(col(Event.kind) == kind).order_by(col(Event.id))).all()
        return [dict(e.details or {}) for e in rows]


def item_state(name: str) -> str:
    with session_scope() as s:
        return str(get_item(name, session=s).state)


def test_migrate_does_not_delete_the_last_bytes_when_the_other_copy_is_gone(dlm: Any, disks: Path) -> None:
    """Reproduction 6: rm R/b/l.dat; set-phase GAS; run migrate used to delete R/a/l.dat too."""
    R = disks
    checksum = liquid_on_a_and_b(dlm, R)
    os.remove(R / "b" / "l.dat")
    ok(dlm("items", "set-phase", "l.dat", "GAS"))
    r = run("migrate")
    assert r["deleted"] == 0
    assert md5((R / "a" / "l.dat").read_bytes()) == checksum  # the bytes are still there
    assert copies("l.dat") == [("disk-a", "READY"), ("disk-b", "LOST")]
    assert item_state("l.dat") == "READY"
    [lost] = events("replica.lost")
    assert lost["found_by"] == "pre-delete check" and lost["storage"] == "disk-b"
    [refused] = [e for e in events("policy.refused") if e.get("found_by") == "pre-delete check"]
    assert "last intact copy" in refused["reason"] and "disk-b is LOST" in refused["reason"]
    # the next run sees one copy and plans no deletion
    again = run("migrate")
    assert again["plan"]["deletes"] == 0
    assert md5((R / "a" / "l.dat").read_bytes()) == checksum
    # the LOST copy is not counted: asking for two copies again restores the bytes on disk-b
    ok(dlm("items", "set-phase", "l.dat", "LIQUID"))
    run("replicate")
    assert md5((R / "b" / "l.dat").read_bytes()) == checksum
    assert md5((R / "a" / "l.dat").read_bytes()) == checksum
    assert copies("l.dat") == [("disk-a", "READY"), ("disk-b", "LOST"), ("disk-b", "READY")]


def test_a_confirmed_survivor_lets_the_deletion_go(dlm: Any, disks: Path) -> None:
    """The check costs nothing when the copies are there: the surplus copy is deleted."""
    R = disks
    checksum = liquid_on_a_and_b(dlm, R)
    ok(dlm("items", "set-phase", "l.dat", "GAS"))
    r = run("migrate")
    assert r["deleted"] == 1
    assert not (R / "a" / "l.dat").exists()
    assert md5((R / "b" / "l.dat").read_bytes()) == checksum
    assert copies("l.dat") == [("disk-b", "READY")]
    assert events("replica.lost") == [] and events("replica.corrupted") == []
    # posix keeps no hash: the survivor on disk-b was re-read once to confirm its bytes
    [batch] = r["batches"]
    assert batch["bytes read to confirm"] == len(PAYLOAD) == r["bytes_read_to_confirm"]


def test_a_survivor_of_another_size_is_corrupted_and_blocks_the_deletion(dlm: Any, disks: Path) -> None:
    R = disks
    checksum = liquid_on_a_and_b(dlm, R)
    (R / "b" / "l.dat").write_bytes(b"truncated")
    ok(dlm("items", "set-phase", "l.dat", "GAS"))
    run("migrate")
    assert md5((R / "a" / "l.dat").read_bytes()) == checksum
    assert copies("l.dat") == [("disk-a", "READY"), ("disk-b", "CORRUPTED")]
    [bad] = events("replica.corrupted")
    assert bad["found_by"] == "pre-delete check"
    assert (bad["expected_size"], bad["found_size"]) == (len(PAYLOAD), len(b"truncated"))


def test_drain_and_rebalance_keep_the_copy_whose_twin_is_gone(dlm: Any, disks: Path) -> None:
    """A GAS item on a and b, disk-a draining, R/b/l.dat removed: rebalance used to delete a's
    copy at once (b 'holds' it). Now b is LOST, a stays; the next runs move the copy to b
    (copy, then delete) and a drains."""
    R = disks
    checksum = liquid_on_a_and_b(dlm, R)
    ok(dlm("items", "set-phase", "l.dat", "GAS"))
    ok(dlm("storage", "drain", "disk-a"))
    os.remove(R / "b" / "l.dat")
    run("rebalance")
    assert md5((R / "a" / "l.dat").read_bytes()) == checksum
    assert copies("l.dat") == [("disk-a", "READY"), ("disk-b", "LOST")]
    assert [e["found_by"] for e in events("replica.lost")] == ["pre-delete check"]
    # repair: the planner does not count the LOST copy, so the next run copies a -> b ...
    run("rebalance")
    assert md5((R / "b" / "l.dat").read_bytes()) == checksum
    assert md5((R / "a" / "l.dat").read_bytes()) == checksum
    # ... and the one after deletes a's copy, now that b's is confirmed
    r = run("rebalance")
    assert r["deleted"] == 1
    assert not (R / "a" / "l.dat").exists()
    assert md5((R / "b" / "l.dat").read_bytes()) == checksum
    assert copies("l.dat") == [("disk-b", "LOST"), ("disk-b", "READY")]  # the LOST row stays as history


def test_replica_expiry_waits_for_a_confirmed_copy(dlm: Any, disks: Path) -> None:
    """A GAS item on a and b whose copy on a expires: with R/b/l.dat gone the expiry is
    refused and b is LOST; once replicate has restored b, the expiry goes through."""
    R = disks
    checksum = liquid_on_a_and_b(dlm, R)
    ok(dlm("items", "set-phase", "l.dat", "GAS"))
    with session_scope() as s:
        a = get_storage("disk-a", session=s)
        past = utcnow() - timedelta(hours=1)
        s.execute(update(Replica).where(col(Replica.storage_id) == a.id).values(expires_at=past))
    os.remove(R / "b" / "l.dat")
    r = run("expire")
    assert r["deleted"] == 0
    assert md5((R / "a" / "l.dat").read_bytes()) == checksum
    assert copies("l.dat") == [("disk-a", "READY"), ("disk-b", "LOST")]
    ok(dlm("items", "set-phase", "l.dat", "LIQUID"))
    run("replicate")  # the item is below LIQUID: b gets a copy again
    assert md5((R / "b" / "l.dat").read_bytes()) == checksum
    ok(dlm("items", "set-phase", "l.dat", "GAS"))
    r = run("expire")
    assert r["deleted"] == 1
    assert not (R / "a" / "l.dat").exists()
    assert md5((R / "b" / "l.dat").read_bytes()) == checksum
    assert copies("l.dat") == [("disk-b", "LOST"), ("disk-b", "READY")]


def test_an_unmounted_survivor_storage_blocks_the_deletion_without_marking_lost(
    dlm: Any, disks: Path
) -> None:
    """rclone lists a missing local root as empty: that is an unreachable storage, not lost copies."""
    R = disks
    checksum = liquid_on_a_and_b(dlm, R)
    os.rename(R / "b", R / "b-unmounted")
    ok(dlm("items", "set-phase", "l.dat", "GAS"))
    run("migrate")
    assert md5((R / "a" / "l.dat").read_bytes()) == checksum
    assert copies("l.dat") == [("disk-a", "READY"), ("disk-b", "READY")]
    assert events("replica.lost") == []
    [refused] = [e for e in events("policy.refused") if e.get("found_by") == "pre-delete check"]
    assert "disk-b could not be listed" in refused["reason"]
    os.rename(R / "b-unmounted", R / "b")  # mounted again: the deletion goes through
    r = run("migrate")
    assert r["deleted"] == 1
    assert not (R / "a" / "l.dat").exists()
    assert md5((R / "b" / "l.dat").read_bytes()) == checksum


def test_an_explicit_delete_relies_on_no_survivor(dlm: Any, disks: Path) -> None:
    R = disks
    liquid_on_a_and_b(dlm, R)
    os.remove(R / "b" / "l.dat")
    ok(dlm("items", "delete", "l.dat", "--yes"))
    assert not (R / "a" / "l.dat").exists()
    assert copies("l.dat") == []
    assert item_state("l.dat") == "DELETED"
    assert events("replica.lost") == []


def test_two_concurrent_deletions_each_relying_on_the_other_copy_keep_the_bytes(
    dlm: Any, disks: Path
) -> None:
    """Two stale plans, one deleting each copy of a GAS item whose copy on disk-b is gone,
    applied at once: whichever claims first, the copy on disk-a and its bytes stay."""
    import threading

    from lifecycle.planning.actions import DeleteReplica
    from lifecycle.planning.pipelines import policy_from

    R = disks
    checksum = liquid_on_a_and_b(dlm, R)
    ok(dlm("items", "set-phase", "l.dat", "GAS"))
    os.remove(R / "b" / "l.dat")
    with session_scope() as s:
        oid = get_item("l.dat", session=s).oid
        reps = s.scalars(select(Replica).where(col(Replica.item_oid) == oid)).all()
        batches = [
            DeleteBatch(r.storage_id, (DeleteReplica(r.uid, oid, r.storage_id, r.path, 1, "test"),))
            for r in reps
        ]
    policy = policy_from()
    barrier = threading.Barrier(2)
    results: list[BatchResult] = []

    def delete(batch: DeleteBatch) -> None:
        barrier.wait()
        results.append(apply_delete_batch(batch, policy=policy))

    threads = [threading.Thread(target=delete, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and sum(r.failed for r in results) == 0
    assert md5((R / "a" / "l.dat").read_bytes()) == checksum
    assert ("disk-a", "READY") in copies("l.dat")
    assert ("disk-b", "READY") not in copies("l.dat")
    assert item_state("l.dat") == "READY"


def test_enough_confirmed_copies_let_a_deletion_go_while_another_storage_is_unreachable(
    dlm: Any, disks: Path
) -> None:
    """Copies on a, b and c, GAS wanted, disk-c unmounted: deleting a's copy relies on b and c;
    b is confirmed and enough for GAS, so a's copy goes; c's copy is not marked anything."""
    from lifecycle.planning.actions import DeleteReplica
    from lifecycle.planning.pipelines import policy_from

    R = disks
    checksum = liquid_on_a_and_b(dlm, R)
    (R / "c").mkdir()
    ok(dlm("storage", "add", "disk-c", "--kind", "posix", "--root", str(R / "c"), "--location", "site-c"))
    ok(dlm("items", "set-phase", "l.dat", "SOLID"))
    run("replicate")
    assert md5((R / "c" / "l.dat").read_bytes()) == checksum
    ok(dlm("items", "set-phase", "l.dat", "GAS"))
    os.rename(R / "c", R / "c-unmounted")
    with session_scope() as s:
        oid = get_item("l.dat", session=s).oid
        a = get_storage("disk-a", session=s)
        rep = s.scalars(
            select(Replica).where(col(Replica.item_oid) == oid, col(Replica.storage_id) == a.id)
        ).one()
        batch = DeleteBatch(a.id, (DeleteReplica(rep.uid, oid, a.id, rep.path, 1, "test"),))
    result = apply_delete_batch(batch, policy=policy_from())
    assert (result.done, result.skipped, result.failed) == (1, 0, 0)
    assert not (R / "a" / "l.dat").exists()
    assert md5((R / "b" / "l.dat").read_bytes()) == checksum
    assert copies("l.dat") == [("disk-b", "READY"), ("disk-c", "READY")]
    assert events("replica.lost") == [] and events("replica.corrupted") == []


# ------------------------------------------------------ survivors re-hashed, and one file seen twice


def test_a_same_size_corrupted_survivor_blocks_the_deletion(dlm: Any, disks: Path) -> None:
    """Finding 1: the copy on disk-b is rewritten with other bytes of the same size; set-phase
    GAS + migrate used to delete R/a/c.dat, the only intact copy (posix keeps no hash, and
    the sizes matched). The survivor is now re-hashed from its bytes: it is CORRUPTED, a's
    copy stays."""
    R = disks
    (R / "a" / "c.dat").write_bytes(b"CCCC\n")
    ok(dlm("ingest", "-s", "disk-a", str(R / "a" / "c.dat"), "--phase", "LIQUID"))
    run("replicate")
    assert (R / "b" / "c.dat").read_bytes() == b"CCCC\n"
    (R / "b" / "c.dat").write_bytes(b"XCCC\n")
    ok(dlm("items", "set-phase", "c.dat", "GAS"))
    r = run("migrate")
    assert r["deleted"] == 0
    assert (R / "a" / "c.dat").read_bytes() == b"CCCC\n"  # the intact bytes are still there
    assert copies("c.dat") == [("disk-a", "READY"), ("disk-b", "CORRUPTED")]
    assert item_state("c.dat") == "READY"
    [bad] = events("replica.corrupted")
    assert bad["found_by"] == "pre-delete check" and bad["storage"] == "disk-b"
    assert (bad["expected"], bad["found"]) == (md5(b"CCCC\n"), md5(b"XCCC\n"))
    [refused] = [e for e in events("policy.refused") if e.get("found_by") == "pre-delete check"]
    assert "last intact copy" in refused["reason"] and "disk-b is CORRUPTED" in refused["reason"]
    assert r["bytes_read_to_confirm"] == 5
    assert run("migrate")["plan"]["deletes"] == 0  # the CORRUPTED copy is not counted
    assert (R / "a" / "c.dat").read_bytes() == b"CCCC\n"


def test_drain_and_rebalance_keep_the_copy_whose_twin_has_other_bytes(dlm: Any, disks: Path) -> None:
    """The drain variant of finding 1: a GAS item on a and b, disk-a draining, b's bytes
    rewritten at the same size: rebalance used to delete a's copy. Now b is CORRUPTED and a
    stays; verify repairs b from a, and then the drain deletes a's copy."""
    R = disks
    checksum = liquid_on_a_and_b(dlm, R)
    ok(dlm("items", "set-phase", "l.dat", "GAS"))
    ok(dlm("storage", "drain", "disk-a"))
    other = bytes([PAYLOAD[0] ^ 1]) + PAYLOAD[1:]
    (R / "b" / "l.dat").write_bytes(other)
    r = run("rebalance")
    assert r["deleted"] == 0
    assert md5((R / "a" / "l.dat").read_bytes()) == checksum
    assert (R / "b" / "l.dat").read_bytes() == other
    assert copies("l.dat") == [("disk-a", "READY"), ("disk-b", "CORRUPTED")]
    assert [e["found_by"] for e in events("replica.corrupted")] == ["pre-delete check"]
    # verify repairs b's copy from a's intact bytes; the next rebalance drains a
    from flows.integrity import verify

    verify()
    assert md5((R / "b" / "l.dat").read_bytes()) == checksum
    r = run("rebalance")
    assert r["deleted"] == 1
    assert not (R / "a" / "l.dat").exists()
    assert md5((R / "b" / "l.dat").read_bytes()) == checksum
    assert copies("l.dat") == [("disk-b", "READY")]


def register_copy(name: str, storage: str, path: str) -> None:
    """A READY copy of NAME on STORAGE at PATH in the catalogue, as replicate recorded one
    when it found identical bytes already at the destination (finding 5)."""
    from lifecycle.states import ReplicaState

    with session_scope() as s:
        item = get_item(name, session=s)
        st = get_storage(storage, session=s)
        s.add(Replica(item_oid=item.oid, storage_id=st.id, path=path, state=ReplicaState.READY))
        s.execute(
            update(Storage)
            .where(col(Storage.id) == st.id)
            .values(used_bytes=col(Storage.used_bytes) + item.size)
        )


def assert_kept_as_one_file(r: dict[str, Any], name: str, data: bytes, R: Path, path: str) -> None:
    """migrate deleted nothing, the bytes are on disk, nothing is marked LOST or CORRUPTED,
    and the refusal says why."""
    assert r["deleted"] == 0
    assert (R / "a" / path).read_bytes() == data
    assert (R / "b" / path).read_bytes() == data
    assert copies(name) == [("disk-a", "READY"), ("disk-b", "READY")]
    assert events("replica.lost") == [] and events("replica.corrupted") == []
    [refused] = [e for e in events("policy.refused") if e.get("found_by") == "pre-delete check"]
    assert "last intact copy" in refused["reason"]
    assert (
        "its copy on disk-b is the same file (hard link or bind mount) as the one to delete"
        in (refused["reason"])
    )
    assert r["bytes_read_to_confirm"] == 0  # the same file is not read as a survivor


def test_a_hard_link_in_another_root_is_not_a_second_copy(dlm: Any, disks: Path) -> None:
    """Finding 5 (deletion side): ln R/a/h.dat R/b/h.dat registered as b's copy is one inode,
    not two copies: set-phase GAS + migrate used to delete a's copy, i.e. the file."""
    R = disks
    data = PAYLOAD + b"h"
    (R / "a" / "h.dat").write_bytes(data)
    ok(dlm("ingest", "-s", "disk-a", str(R / "a" / "h.dat"), "--phase", "LIQUID"))
    os.link(R / "a" / "h.dat", R / "b" / "h.dat")
    register_copy("h.dat", "disk-b", "h.dat")
    ok(dlm("items", "set-phase", "h.dat", "GAS"))
    r = run("migrate")
    assert_kept_as_one_file(r, "h.dat", data, R, "h.dat")
    assert os.stat(R / "a" / "h.dat").st_nlink == 2


def test_one_directory_under_two_roots_by_a_bind_mount_is_not_a_second_copy(dlm: Any, disks: Path) -> None:
    """Finding 3 (deletion side): R/a/sub bind-mounted on R/b/sub puts one file under both
    roots; counting b's "copy" made migrate delete the only file."""
    import shutil
    import subprocess

    R = disks
    if not shutil.which("mount"):
        pytest.skip("no mount command")
    (R / "a" / "sub").mkdir()
    (R / "b" / "sub").mkdir()
    data = PAYLOAD + b"bind"
    (R / "a" / "sub" / "x.dat").write_bytes(data)
    ok(dlm("ingest", "-s", "disk-a", str(R / "a" / "sub" / "x.dat"), "--phase", "LIQUID"))
    bind = subprocess.run(
        ["mount", "--bind", str(R / "a" / "sub"), str(R / "b" / "sub")], capture_output=True, text=True
    )
    if bind.returncode != 0:
        pytest.skip(f"mount --bind is not permitted here: {bind.stderr.strip()}")
    try:
        assert (R / "b" / "sub" / "x.dat").read_bytes() == data
        register_copy("sub/x.dat", "disk-b", "sub/x.dat")
        ok(dlm("items", "set-phase", "sub/x.dat", "GAS"))
        r = run("migrate")
        assert_kept_as_one_file(r, "sub/x.dat", data, R, "sub/x.dat")
    finally:
        subprocess.run(["umount", str(R / "b" / "sub")], check=True)
    assert (R / "a" / "sub" / "x.dat").read_bytes() == data
    assert not (R / "b" / "sub" / "x.dat").exists()  # unmounted: b never held bytes of its own


# --------------------------------------------------------------------------- an S3 survivor


@pytest.fixture
def disk_and_bucket(
    dlm: Any, db_url: str, tmp_path: Path, s3_bucket: str, s3_env: Any, flows_env: None
) -> dict[str, Any]:
    """disk-a (posix, site-a) and vault (S3 on SeaweedFS, site-b); 'vault' sorts after
    'disk-a', so a surplus copy is dropped from disk-a first."""
    (tmp_path / "a").mkdir()
    a = str(tmp_path / "a")
    ok(dlm("storage", "add", "disk-a", "--kind", "posix", "--root", a, "--location", "site-a"))
    ok(
        dlm(
            "storage",
            "add",
            "vault",
            "--kind",
            "s3",
            "--root",
            s3_bucket,
            "--endpoint",
            s3_env.endpoint,
            "--credentials-env",
            "DLM_TEST_S3",
            "--location",
            "site-b",
        )
    )
    return {"R": tmp_path, "bucket": s3_bucket, "client": s3_env.client(), "s3": s3_env}


def on_a_and_vault(dlm: Any, R: Path, client: Any, bucket: str, names: list[str]) -> None:
    for n in names:
        (R / "a" / n).write_bytes(PAYLOAD + n.encode())
    ok(dlm("ingest", "-s", "disk-a", *[str(R / "a" / n) for n in names], "--phase", "LIQUID"))
    run("replicate")
    for n in names:
        assert client.get_object(Bucket=bucket, Key=n)["Body"].read() == PAYLOAD + n.encode()
        assert copies(n) == [("disk-a", "READY"), ("vault", "READY")]


@pytest.mark.s3
def test_an_s3_survivor_deleted_or_rewritten_behind_dlms_back_blocks_the_delete(
    dlm: Any, disk_and_bucket: dict[str, Any]
) -> None:
    R, client, bucket = disk_and_bucket["R"], disk_and_bucket["client"], disk_and_bucket["bucket"]
    on_a_and_vault(dlm, R, client, bucket, ["gone.dat", "other.dat", "fine.dat"])
    client.delete_object(Bucket=bucket, Key="gone.dat")
    other = PAYLOAD + b"OTHER.dat"  # same size, other bytes: the stored MD5 (ETag) differs
    assert len(other) == len(PAYLOAD + b"other.dat")
    client.put_object(Bucket=bucket, Key="other.dat", Body=other)
    for n in ("gone.dat", "other.dat", "fine.dat"):
        ok(dlm("items", "set-phase", n, "GAS"))
    r = run("migrate")
    assert r["deleted"] == 1  # fine.dat only
    for n in ("gone.dat", "other.dat"):
        assert (R / "a" / n).read_bytes() == PAYLOAD + n.encode()
    assert not (R / "a" / "fine.dat").exists()
    assert client.get_object(Bucket=bucket, Key="fine.dat")["Body"].read() == PAYLOAD + b"fine.dat"
    assert copies("gone.dat") == [("disk-a", "READY"), ("vault", "LOST")]
    assert copies("other.dat") == [("disk-a", "READY"), ("vault", "CORRUPTED")]
    assert copies("fine.dat") == [("vault", "READY")]
    [bad] = events("replica.corrupted")
    assert bad["found_by"] == "pre-delete check" and bad["expected"] == md5(PAYLOAD + b"other.dat")
    assert bad["found"] == md5(other)


@pytest.mark.s3
def test_an_unreachable_s3_survivor_blocks_the_delete_and_marks_nothing(
    dlm: Any, disk_and_bucket: dict[str, Any]
) -> None:
    """The S3 server is unreachable (the storage's endpoint points at a closed port): its copy
    is not confirmed, so the posix copy stays; the S3 copy is not LOST. Back online, it goes."""
    R, client, bucket = disk_and_bucket["R"], disk_and_bucket["client"], disk_and_bucket["bucket"]
    on_a_and_vault(dlm, R, client, bucket, ["l.dat"])
    ok(dlm("items", "set-phase", "l.dat", "GAS"))
    with session_scope() as s:
        endpoint = s.scalars(select(Storage).where(col(Storage.name) == "vault")).one().endpoint
        s.execute(update(Storage).where(col(Storage.name) == "vault").values(endpoint="http://127.0.0.1:9"))
    r = run("migrate")
    assert r["deleted"] == 0
    assert (R / "a" / "l.dat").read_bytes() == PAYLOAD + b"l.dat"
    assert copies("l.dat") == [("disk-a", "READY"), ("vault", "READY")]
    assert events("replica.lost") == [] and events("replica.corrupted") == []
    [refused] = [e for e in events("policy.refused") if e.get("found_by") == "pre-delete check"]
    assert "vault could not be listed" in refused["reason"]
    with session_scope() as s:
        s.execute(update(Storage).where(col(Storage.name) == "vault").values(endpoint=endpoint))
    r = run("migrate")
    assert r["deleted"] == 1
    assert not (R / "a" / "l.dat").exists()
    assert client.get_object(Bucket=bucket, Key="l.dat")["Body"].read() == PAYLOAD + b"l.dat"
