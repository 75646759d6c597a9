"""Storage identity (issue 8, findings 2-5 and 7 of the attack on main): one root is one storage
in the physical world too. Endpoint aliases, bind mounts, a root swapped for a symbolic link,
hard links and --from-list links are refused, on real posix dirs, the real SeaweedFS, rclone,
SQLite and PostgreSQL; every test reads the bytes left on the storages."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlmodel import col

from lifecycle.catalogue import storages
from lifecycle.catalogue.catalog import get_item
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Event, Item, Replica, Storage, Transfer, utcnow
from lifecycle.storage import identity
from lifecycle.storage.backends import backend_for
from tests.cli.conftest import Result

PAYLOAD = hashlib.sha256(b"identity").digest() * 1000  # 32 kB
OTHER = hashlib.sha256(b"someone else's").digest() * 500


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def ok(r: Result) -> Result:
    assert r.code == 0, r.err
    return r


def refused(r: Result, *words: str) -> str:
    """A one-line `dlm: error:` with exit 2 naming every word."""
    assert r.code == 2, (r.code, r.out, r.err)
    line = r.err.strip()
    assert line.startswith("dlm: error:") and "\n" not in line and "Traceback" not in r.err, r.err
    for w in words:
        assert w in line, (w, line)
    return line


@pytest.fixture(autouse=True)
def _prefect_console_on_real_stderr() -> Iterator[None]:
    """As in tests/flows: Prefect's console handlers must not keep a captured stream."""
    yield
    if "prefect" not in sys.modules:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler):
                handler.stream = sys.__stderr__
                handler.console.file = sys.__stderr__


def run(pipeline: str) -> dict[str, Any]:
    """The pipeline's flow, called directly (not through the in-process CLI)."""
    from flows.registry import FLOWS

    report: dict[str, Any] = FLOWS[pipeline]().as_json()
    return report


def old_catalogue_storage(name: str, kind: str, root: str, *, endpoint: str | None = None) -> None:
    """A storage row as a catalogue from before this fix holds it: accepted without any of the
    checks (the attack added these through aliases the old `storage add` let through)."""
    with session_scope() as s:
        s.add(Storage(name=name, kind=kind, root=root, endpoint=endpoint, tier="hot"))


def copies(name: str) -> list[tuple[str, str]]:
    with session_scope() as s:
        item = get_item(name, session=s)
        rows = s.execute(
            select(col(Storage.name), col(Replica.state))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(col(Replica.item_oid) == item.oid, col(Replica.state) != "DELETED")
        ).all()
    return sorted((str(n), str(st)) for n, st in rows)


def failed_transfers() -> list[str]:
    with session_scope() as s:
        return [str(e) for e in s.scalars(select(col(Transfer.error)).where(col(Transfer.state) == "FAILED"))]


def marker_of(root: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((root / identity.MARKER).read_bytes())
    return data


@pytest.fixture
def disks(dlm: Any, db_url: str, tmp_path: Path) -> Path:
    """R: disk-a on R/a (site-a) and disk-b on R/b (site-b), added as a user does."""
    for name, sub, loc in (("disk-a", "a", "site-a"), ("disk-b", "b", "site-b")):
        (tmp_path / sub).mkdir()
        ok(dlm("storage", "add", name, "--kind", "posix", "--root", str(tmp_path / sub), "--location", loc))
    return tmp_path


# --------------------------------------------------------------------------- markers


def test_storage_add_writes_a_marker_that_dlm_never_shows(dlm: Any, disks: Path) -> None:
    R = disks
    with session_scope() as s:
        a = storages.get_storage("disk-a", session=s)
        a_id = str(a.id)
        backend = backend_for(a)
    assert marker_of(R / "a") == {"kind": "dlm-storage-marker", "name": "disk-a", "storage_id": a_id}
    (R / "a" / "x.dat").write_bytes(PAYLOAD)
    assert [o.path for o in backend.list()] == ["x.dat"]  # the marker is not an object
    # an item or path named like the marker (or any .dlm-* name) is refused, nothing registered
    refused(dlm("ingest", "-s", "disk-a", str(R / "a" / identity.MARKER)), ".dlm-", "reserved")
    refused(dlm("ingest", "-s", "disk-a", str(R / "a" / "x.dat"), "--name", "d/.dlm-storage"), "reserved")
    lst = R / "list.jsonl"
    lst.write_text(json.dumps({"name": "m", "path": ".dlm-storage", "size": 10}) + "\n")
    refused(dlm("ingest", "-s", "disk-a", "--from-list", str(lst)), "line 1", "reserved")
    with session_scope() as s:
        assert s.scalars(select(col(Item.name))).all() == []
    assert marker_of(R / "a")["storage_id"] == a_id


@pytest.mark.prefect
@pytest.mark.rclone
def test_reconcile_neither_reports_nor_adopts_the_marker(dlm: Any, disks: Path, flows_env: None) -> None:
    R = disks
    (R / "a" / "x.dat").write_bytes(PAYLOAD)
    from flows.integrity import reconcile

    report = reconcile(storage="disk-a", adopt=True, dry_run=False).as_json()
    assert report["unknown"] == 1, report
    with session_scope() as s:
        assert s.scalars(select(col(Item.name))).all() == ["x.dat"]
    assert (R / "a" / identity.MARKER).exists() and (R / "a" / "x.dat").read_bytes() == PAYLOAD


def test_a_missing_marker_is_written_at_first_use(db_url: str, tmp_path: Path) -> None:
    """A catalogue from before markers: the first batch's check writes the marker of a root
    that holds files (an empty one could be an unmounted volume's mount point: see
    tests/lifecycle/integrity/test_unmounted_root.py); a marker naming another storage fails
    the check."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "held.dat").write_bytes(PAYLOAD)
    old_catalogue_storage("old", "posix", str(tmp_path / "old"))
    with session_scope() as s:
        st = storages.get_storage("old", session=s)
        s.expunge(st)
    assert identity.refusal(st) is None
    assert marker_of(tmp_path / "old")["storage_id"] == str(st.id)
    (tmp_path / "old" / identity.MARKER).unlink()
    (tmp_path / "old" / identity.MARKER).write_bytes(identity.marker_bytes(uuid.uuid4(), "elsewhere"))
    why = identity.refusal(st)
    assert why is not None and "'elsewhere'" in why and "refusing to write or delete" in why


def test_storage_add_refuses_a_root_marked_by_another_storage(dlm: Any, disks: Path) -> None:
    """What a marker tells that paths cannot: a root (or a directory above it) that holds
    another live storage's marker, e.g. the same volume mounted elsewhere."""
    R = disks
    (R / "x" / "deep").mkdir(parents=True)
    (R / "x" / identity.MARKER).write_bytes((R / "a" / identity.MARKER).read_bytes())
    (R / "x" / "deep" / "keep.dat").write_bytes(PAYLOAD)
    for root in (R / "x", R / "x" / "deep"):
        refused(dlm("storage", "add", "disk-x", "--kind", "posix", "--root", str(root)), "marker", "'disk-a'")
    assert (R / "x" / "deep" / "keep.dat").read_bytes() == PAYLOAD
    assert marker_of(R / "x")["name"] == "disk-a"  # nothing rewritten
    ok(dlm("storage", "retire", "disk-a"))  # a retired storage's root may be taken over
    ok(dlm("storage", "add", "disk-x", "--kind", "posix", "--root", str(R / "x")))
    assert marker_of(R / "x")["name"] == "disk-x"


# --------------------------------------------------------------------------- finding 2: S3 aliases


def _aliases(endpoint: str) -> list[str]:
    port = endpoint.rsplit(":", 1)[1]
    return [f"http://localhost:{port}", f"http://127.1:{port}", f"http://[::ffff:127.0.0.1]:{port}"]


@pytest.mark.s3
def test_an_s3_endpoint_alias_of_a_storage_is_refused(
    dlm: Any,
    db_url: str,
    s3_env: Any,
    s3_bucket: str,
) -> None:
    def add(name: str, root: str, endpoint: str, *more: str) -> Result:
        return dlm("storage", "add", name, "--kind", "s3", "--root", root, "--endpoint", endpoint, *more)

    ok(add("s3-a", s3_bucket, s3_env.endpoint))
    for i, alias in enumerate(_aliases(s3_env.endpoint)):
        # through the marker (the check reads it) and through the endpoint's addresses (--no-check)
        for check in ("--check", "--no-check"):
            refused(add(f"s3-b{i}", s3_bucket, alias, check), "s3-a")
        refused(add(f"s3-c{i}", f"{s3_bucket}/sub", alias), "s3-a")
    with session_scope() as s:
        assert sorted(s.scalars(select(col(Storage.name)))) == ["s3-a"]
    body = s3_env.client().get_object(Bucket=s3_bucket, Key=identity.MARKER)["Body"].read()
    assert json.loads(body)["name"] == "s3-a"


@pytest.mark.prefect
@pytest.mark.rclone
@pytest.mark.s3
def test_an_old_alias_storage_gets_no_copy_and_migrate_keeps_the_only_object(
    dlm: Any,
    db_url: str,
    s3_env: Any,
    s3_bucket: str,
    flows_env: None,
    tmp_path: Path,
) -> None:
    """Finding 2 in a catalogue that accepted the alias: replicate used to 'copy' the object onto
    itself and migrate then deleted the only object."""
    ok(dlm("storage", "add", "s3-a", "--kind", "s3", "--root", s3_bucket, "--endpoint", s3_env.endpoint))
    port = s3_env.endpoint.rsplit(":", 1)[1]
    old_catalogue_storage("s3-b", "s3", s3_bucket, endpoint=f"http://localhost:{port}")
    src = tmp_path / "c.dat"
    src.write_bytes(PAYLOAD)
    ok(dlm("ingest", "-s", "s3-a", "--upload", str(src), "--phase", "LIQUID"))
    report = run("replicate")
    assert report["failed"] == 1
    [why] = failed_transfers()
    assert "marker of another storage ('s3-a'" in why
    assert copies("c.dat") == [("s3-a", "READY")]
    ok(dlm("items", "set-phase", "c.dat", "GAS"))
    run("migrate")
    body = s3_env.client().get_object(Bucket=s3_bucket, Key="c.dat")["Body"].read()
    assert body == PAYLOAD  # the only object is still there
    assert copies("c.dat") == [("s3-a", "READY")]


def test_endpoint_aliases_compare_equal() -> None:
    same = storages.same_endpoint
    assert same("http://127.0.0.1:8333", "http://localhost:8333")
    assert same("http://127.0.0.1:8333", "http://127.1:8333")
    assert same("http://127.0.0.1:8333", "http://[::ffff:127.0.0.1]:8333")
    assert same("http://127.0.0.1", "http://127.0.0.1:80")
    assert not same("http://127.0.0.1:8333", "http://127.0.0.1:8334")
    assert not same("http://127.0.0.1:8333", "http://192.0.2.1:8333")


# --------------------------------------------------------------------------- finding 3: bind mounts


@pytest.fixture
def bind_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """R/a bind-mounted on R/a2 (unmounted afterwards, whatever happens)."""
    a, a2 = tmp_path / "a", tmp_path / "a2"
    a.mkdir(exist_ok=True)
    a2.mkdir()
    proc = subprocess.run(["mount", "--bind", str(a), str(a2)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount --bind is not permitted here: {proc.stderr.strip()}")
    try:
        yield a, a2
    finally:
        subprocess.run(["umount", str(a2)], check=False)


def test_a_bind_mount_of_a_root_is_refused(dlm: Any, db_url: str, bind_mount: tuple[Path, Path]) -> None:
    a, a2 = bind_mount
    ok(dlm("storage", "add", "disk-a", "--kind", "posix", "--root", str(a)))
    (a / "keep.dat").write_bytes(PAYLOAD)
    refused(dlm("storage", "add", "disk-a2", "--kind", "posix", "--root", str(a2)), "disk-a")
    (a / identity.MARKER).unlink()  # no marker to tell: the (device, inode) comparison does
    refused(
        dlm("storage", "add", "disk-a2", "--kind", "posix", "--root", str(a2), "--no-check"),
        "disk-a",
        "bind mount",
    )
    (a / "sub").mkdir()
    refused(
        dlm("storage", "add", "disk-s", "--kind", "posix", "--root", str(a2 / "sub"), "--no-check"), "disk-a"
    )
    assert (a / "keep.dat").read_bytes() == PAYLOAD


@pytest.mark.prefect
@pytest.mark.rclone
def test_an_old_bind_mounted_storage_gets_no_copy_and_migrate_keeps_the_file(
    dlm: Any,
    db_url: str,
    bind_mount: tuple[Path, Path],
    flows_env: None,
) -> None:
    """Finding 3 in a catalogue that accepted the bind mount: after replicate, set-phase GAS and
    migrate both directories used to be empty."""
    a, a2 = bind_mount
    ok(dlm("storage", "add", "disk-a", "--kind", "posix", "--root", str(a), "--location", "site-a"))
    old_catalogue_storage("disk-a2", "posix", str(a2))
    (a / "c.dat").write_bytes(PAYLOAD)
    ok(dlm("ingest", "-s", "disk-a", str(a / "c.dat"), "--phase", "LIQUID"))
    report = run("replicate")
    assert report["failed"] == 1
    assert "marker of another storage ('disk-a'" in failed_transfers()[0]
    ok(dlm("items", "set-phase", "c.dat", "GAS"))
    run("migrate")
    assert (a / "c.dat").read_bytes() == PAYLOAD
    assert copies("c.dat") == [("disk-a", "READY")]


# --------------------------------------------------------------------------- finding 4: a root swapped


@pytest.mark.prefect
@pytest.mark.rclone
def test_a_root_swapped_for_a_link_is_neither_written_nor_deleted(
    dlm: Any,
    disks: Path,
    flows_env: None,
) -> None:
    """rmdir R/c; ln -s R/a R/c: replicate wrote into R/a through disk-c, and expiring disk-c's
    copy deleted another item's only file on disk-a."""
    R = disks
    (R / "c").mkdir()
    ok(dlm("storage", "add", "disk-c", "--kind", "posix", "--root", str(R / "c"), "--location", "site-c"))
    (R / "c" / "p.dat").write_bytes(OTHER)
    ok(dlm("ingest", "-s", "disk-c", str(R / "c" / "p.dat"), "--name", "c-item"))
    (R / "a" / "p.dat").write_bytes(PAYLOAD)
    ok(dlm("ingest", "-s", "disk-a", str(R / "a" / "p.dat"), "--name", "a-item"))
    (R / "a" / "q.dat").write_bytes(PAYLOAD)
    ok(dlm("ingest", "-s", "disk-a", str(R / "a" / "q.dat"), "--phase", "SOLID"))
    os.rename(R / "c", R / "c-old")
    os.symlink(R / "a", R / "c")
    with session_scope() as s:
        s.execute(
            update(Item).where(col(Item.name) == "c-item").values(expires_at=utcnow() - timedelta(hours=1))
        )
    run("replicate")
    assert any("disk-c's root" in e and "symbolic link" in e for e in failed_transfers()), failed_transfers()
    assert copies("q.dat") == [("disk-a", "READY"), ("disk-b", "READY")]  # not on disk-c
    run("expire")
    assert (R / "a" / "p.dat").read_bytes() == PAYLOAD  # a-item's only file is still there
    assert (R / "c-old" / "p.dat").read_bytes() == OTHER
    with session_scope() as s:
        failed = s.scalars(select(Event).where(col(Event.kind) == "replica.delete_failed")).all()
    assert failed and "symbolic link" in str(failed[0].details)


@pytest.mark.prefect
@pytest.mark.rclone
def test_a_no_check_root_later_created_as_a_link_gets_nothing(
    dlm: Any,
    disks: Path,
    flows_env: None,
) -> None:
    R = disks
    ok(
        dlm(
            "storage",
            "add",
            "disk-d",
            "--kind",
            "posix",
            "--root",
            str(R / "d"),
            "--no-check",
            "--location",
            "site-d",
        )
    )
    os.symlink(R / "a", R / "d")
    (R / "a" / "s.dat").write_bytes(PAYLOAD)
    ok(dlm("ingest", "-s", "disk-a", str(R / "a" / "s.dat"), "--phase", "SOLID"))
    run("replicate")
    assert copies("s.dat") == [("disk-a", "READY"), ("disk-b", "READY")]
    assert any("disk-d's root" in e for e in failed_transfers())
    assert sorted(os.listdir(R / "a")) == [identity.MARKER, "s.dat"]  # disk-a's marker only: no disk-d one


# --------------------------------------------------------------------------- finding 5: hard links


@pytest.mark.prefect
@pytest.mark.rclone
def test_a_hard_link_at_the_destination_is_not_a_second_copy(dlm: Any, disks: Path, flows_env: None) -> None:
    R = disks
    (R / "a" / "h.dat").write_bytes(PAYLOAD)
    ok(dlm("ingest", "-s", "disk-a", str(R / "a" / "h.dat"), "--phase", "LIQUID"))
    os.link(R / "a" / "h.dat", R / "b" / "h.dat")
    report = run("replicate")
    assert report["failed"] == 1
    [why] = failed_transfers()
    assert "hard link shared with another file" in why
    assert copies("h.dat") == [("disk-a", "READY")]
    ok(dlm("items", "set-phase", "h.dat", "GAS"))
    run("migrate")
    assert (R / "a" / "h.dat").read_bytes() == PAYLOAD
    assert (R / "b" / "h.dat").read_bytes() == PAYLOAD  # the other name is left in place


def test_in_place_ingest_of_a_hard_linked_file_is_refused(dlm: Any, disks: Path) -> None:
    R = disks
    (R / "a" / "h.dat").write_bytes(PAYLOAD)
    os.link(R / "a" / "h.dat", R / "b" / "h.dat")
    refused(dlm("ingest", "-s", "disk-b", str(R / "b" / "h.dat")), "hard link")
    lst = R / "list.jsonl"
    lst.write_text(json.dumps({"name": "h", "path": "h.dat", "size": len(PAYLOAD)}) + "\n")
    refused(dlm("ingest", "-s", "disk-a", "--from-list", str(lst)), "line 1", "hard link")
    with session_scope() as s:
        assert s.scalars(select(col(Item.name))).all() == []
    assert (R / "a" / "h.dat").read_bytes() == PAYLOAD == (R / "b" / "h.dat").read_bytes()


# --------------------------------------------------------------------------- finding 7: --from-list links


def test_from_list_refuses_links_and_paths_through_them(dlm: Any, disks: Path) -> None:
    R = disks
    (R / "a" / "real").mkdir()
    (R / "a" / "real" / "f.dat").write_bytes(PAYLOAD)
    (R / "b" / "secret.dat").write_bytes(OTHER)
    os.symlink(R / "b" / "secret.dat", R / "a" / "link.dat")
    os.symlink(R / "a" / "real", R / "a" / "linkdir")
    rows = [
        {"name": "ok", "path": "real/f.dat", "size": len(PAYLOAD)},
        {"name": "l", "path": "link.dat", "size": len(OTHER)},
    ]
    lst = R / "list.jsonl"
    lst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(dlm("ingest", "-s", "disk-a", "--from-list", str(lst)), "line 2", "link.dat", "symbolic link")
    rows[1] = {"name": "d", "path": "linkdir/f.dat", "size": len(PAYLOAD)}
    lst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(dlm("ingest", "-s", "disk-a", "--from-list", str(lst)), "line 2", "goes through a symbolic link")
    with session_scope() as s:
        assert s.scalars(select(col(Item.name))).all() == []
        assert s.scalars(select(col(Replica.path))).all() == []
    assert (R / "b" / "secret.dat").read_bytes() == OTHER
    assert (R / "a" / "real" / "f.dat").read_bytes() == PAYLOAD
    lst.write_text(json.dumps(rows[0]) + "\n")  # a list without links goes in
    ok(dlm("ingest", "-s", "disk-a", "--from-list", str(lst)))
    with session_scope() as s:
        assert s.scalars(select(col(Replica.path))).all() == ["real/f.dat"]
