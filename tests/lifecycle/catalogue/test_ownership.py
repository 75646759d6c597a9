"""One owner per byte: no two storages share a root, no two live copies share a path, and no
upload, list, copy or checkout writes over bytes that another item (or nobody DLM knows) owns.

Every test reads the bytes on the storages (files on disk, objects in the bucket), on SQLite
and on PostgreSQL where the catalogue is involved.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from lifecycle.catalogue.catalog import get_item, table_counts
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.ingest import IngestOptions, ingest, plan_ingest
from lifecycle.catalogue.models import Item, Replica, Storage, Transfer
from lifecycle.catalogue.storages import add_storage, get_storage
from lifecycle.errors import ConflictError
from lifecycle.states import ReplicaState, TransferState
from lifecycle.transfer.operations import copy_files
from tests.cli import conftest as cli_conftest

dlm = cli_conftest.dlm  # the in-process CLI fixture


def _counts(url: str) -> dict[str, int]:
    with session_scope(url) as s:
        return dict(table_counts(session=s))


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _item_checksum(name: str) -> str:
    with session_scope() as s:
        item = get_item(name, session=s)
        return str(item.checksum)


def _one_line_error(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("dlm: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _dlm_process(*args: str) -> cli_conftest.Result:
    """`dlm ARGS` in a child process: checkout loads Prefect, whose log handlers would keep
    the in-process fixture's captured stream for the rest of the test session."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3]), "COLUMNS": "250"}
    proc = subprocess.run(
        [sys.executable, "-m", "dlm.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )
    return cli_conftest.Result(proc.returncode, proc.stdout, proc.stderr)


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.startswith(".dlm-tmp-")]


@pytest.fixture
def disks(dlm, db_url: str, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """posix storages disk-a ($R/a) and disk-b ($R/b) at two locations; $R is returned."""
    for name, sub, loc in (("disk-a", "a", "site-a"), ("disk-b", "b", "site-b")):
        (tmp_path / sub).mkdir()
        r = dlm("storage", "add", name, "--kind", "posix", "--root", str(tmp_path / sub), "--location", loc)
        assert r.code == 0, r.err
    return tmp_path


# --------------------------------------------------------------------------- 1. uploads


def test_upload_refuses_a_path_another_item_owns(dlm, disks: Path, db_url: str) -> None:
    """Issue 8, reproduction 1: the upload used to replace foo.dat, corrupting `bar`."""
    (disks / "a" / "foo.dat").write_bytes(b"ORIG\n")
    assert dlm("ingest", "-s", "disk-a", str(disks / "a" / "foo.dat"), "--name", "bar").code == 0
    (disks / "x").write_bytes(b"NEW!\n")
    before = _counts(db_url)
    r = dlm("ingest", "-s", "disk-a", "--upload", str(disks / "x"), "--name", "foo.dat")
    assert r.code != 0
    line = _one_line_error(r.err)
    assert "'foo.dat'" in line and "disk-a" in line and "bar v1" in line
    assert (disks / "a" / "foo.dat").read_bytes() == b"ORIG\n"
    assert _item_checksum("bar") == _md5(b"ORIG\n")
    assert _counts(db_url) == before
    assert not _tmp_files(disks / "a")
    with session_scope() as s:
        states = {str(st) for st in s.execute(select(col(Replica.state))).scalars()}
    assert states == {"READY"}


def test_upload_never_writes_over_a_file_the_catalogue_does_not_know(dlm, disks: Path, db_url: str) -> None:
    """An untracked file at the upload path stays; the upload is refused and leaves no temp file."""
    (disks / "a" / "foo.dat").write_bytes(b"SOMEONE ELSE'S\n")
    (disks / "x").write_bytes(b"NEW!\n")
    before = _counts(db_url)
    r = dlm("ingest", "-s", "disk-a", "--upload", str(disks / "x"), "--name", "foo.dat")
    assert r.code == 1
    assert "already exists on storage 'disk-a'" in _one_line_error(r.err)
    assert (disks / "a" / "foo.dat").read_bytes() == b"SOMEONE ELSE'S\n"
    assert _counts(db_url) == before
    assert not _tmp_files(disks / "a")


def test_version_path_of_an_upload_cannot_take_an_explicit_name(dlm, disks: Path, db_url: str) -> None:
    """`--name 'x~v2'`, then `--name x` twice: version 2 of x would land on x~v2's file."""
    for i, name in enumerate(("x~v2", "x")):
        f = disks / f"in{i}"
        f.write_bytes(f"payload {name}\n".encode())
        assert dlm("ingest", "-s", "disk-a", "--upload", str(f), "--name", name).code == 0
    f = disks / "in2"
    f.write_bytes(b"second version of x\n")
    before = _counts(db_url)
    r = dlm("ingest", "-s", "disk-a", "--upload", str(f), "--name", "x")
    assert r.code == 1
    line = _one_line_error(r.err)
    assert "x v2" in line and "'x~v2'" in line and "x~v2 v1" in line and "give another name" in line
    assert (disks / "a" / "x~v2").read_bytes() == b"payload x~v2\n"
    assert _item_checksum("x~v2") == _md5(b"payload x~v2\n")
    assert _counts(db_url) == before


def test_posix_put_is_no_clobber_and_names_its_temp_file(tmp_path: Path) -> None:
    from lifecycle.storage.posix import PosixStorage, temp_prefix

    st = PosixStorage("p", tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.bin").write_bytes(b"first")
    with pytest.raises(ConflictError, match="already exists on storage 'p'"):
        st.put("d/f.bin", io.BytesIO(b"second"))
    assert (tmp_path / "d" / "f.bin").read_bytes() == b"first"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f.bin"]
    prefix = temp_prefix()
    host, pid = prefix.removeprefix(".dlm-tmp-").rstrip("-").rsplit("-", 1)
    assert int(pid) == os.getpid() and host


@pytest.mark.s3
def test_s3_put_is_a_conditional_write(s3_bucket: str, s3_env: Any, tmp_path: Path) -> None:
    """SeaweedFS honours If-None-Match: the existing object keeps its bytes, single and multipart."""
    from lifecycle.storage import s3 as s3_mod

    st = s3_mod.S3Storage("obj", s3_bucket, endpoint=s3_env.endpoint, credentials_env="DLM_TEST_S3")
    client = s3_env.client()
    client.put_object(Bucket=s3_bucket, Key="k.bin", Body=b"theirs")
    with pytest.raises(ConflictError, match="already exists on storage 'obj'"):
        st.put("k.bin", io.BytesIO(b"mine"))
    # Past the HEAD (an object written in between): the conditional write itself refuses.
    st._refuse_existing = lambda path: None  # type: ignore[method-assign]
    with pytest.raises(ConflictError, match="already exists"):
        st.put("k.bin", io.BytesIO(b"mine"))
    old = s3_mod.MULTIPART_THRESHOLD, s3_mod.PART_SIZE
    s3_mod.MULTIPART_THRESHOLD, s3_mod.PART_SIZE = 5 * 1024**2, 5 * 1024**2
    try:
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(11 * 1024**2))
        with pytest.raises(ConflictError, match="already exists"):
            st.put("k.bin", big)
        info = st.put("new.bin", big)
        assert info.size == big.stat().st_size and info.checksum == _md5(big.read_bytes())
    finally:
        s3_mod.MULTIPART_THRESHOLD, s3_mod.PART_SIZE = old
    assert client.get_object(Bucket=s3_bucket, Key="k.bin")["Body"].read() == b"theirs"
    assert not client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")


@pytest.mark.s3
def test_s3_upload_refuses_an_object_another_item_owns(
    dlm, db_url: str, s3_bucket: str, s3_env: Any, tmp_path: Path
) -> None:
    """Issue 8, reproduction 1 on S3; and a non-ASCII name uploads (metadata percent-encoded)."""
    r = dlm(
        "storage", "add", "obj", "--kind", "s3", "--root", s3_bucket,
        "--endpoint", s3_env.endpoint, "--credentials-env", "DLM_TEST_S3",
    )  # fmt: skip
    assert r.code == 0, r.err
    client = s3_env.client()
    client.put_object(Bucket=s3_bucket, Key="foo.dat", Body=b"ORIG\n")
    assert dlm("ingest", "-s", "obj", "s3://" + s3_bucket + "/foo.dat", "--name", "bar").code == 0
    x = tmp_path / "x"
    x.write_bytes(b"NEW!\n")
    before = _counts(db_url)
    r = dlm("ingest", "-s", "obj", "--upload", str(x), "--name", "foo.dat")
    assert r.code == 1 and "bar v1" in _one_line_error(r.err)
    assert client.get_object(Bucket=s3_bucket, Key="foo.dat")["Body"].read() == b"ORIG\n"
    assert _counts(db_url) == before

    name = "données/été.dat"
    r = dlm("ingest", "-s", "obj", "--upload", str(x), "--name", name)
    assert r.code == 0, r.err
    head = client.head_object(Bucket=s3_bucket, Key=name)
    assert all(v.isascii() for v in head["Metadata"].values())
    from lifecycle.storage.backends import backend_for

    with session_scope() as s:
        st = backend_for(get_storage("obj", session=s))
    assert st.stat(name).metadata["dlm-name"] == name
    assert client.get_object(Bucket=s3_bucket, Key=name)["Body"].read() == b"NEW!\n"


def test_a_source_rewritten_during_upload_is_refused_and_removed(
    dlm, disks: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rewritten with the same size (and its mtime put back) while it was uploaded: the
    stored bytes are not the ones hashed, so nothing is registered and the upload is gone."""
    from lifecycle.storage.posix import PosixStorage

    src = disks / "payload.bin"
    src.write_bytes(b"A" * 4096)
    real_put = PosixStorage.put

    def put_while_rewriting(self: PosixStorage, path: str, source: Any, **kw: Any) -> Any:
        st = os.stat(src)
        src.write_bytes(b"B" * 4096)
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
        return real_put(self, path, source, **kw)

    monkeypatch.setattr(PosixStorage, "put", put_while_rewriting)
    before = _counts(db_url)
    r = dlm("ingest", "-s", "disk-a", "--upload", str(src), "--name", "p.bin")
    assert r.code == 2
    assert "changed while it was uploaded" in _one_line_error(r.err)
    assert not (disks / "a" / "p.bin").exists()
    assert not _tmp_files(disks / "a")
    assert _counts(db_url) == before


# --------------------------------------------------------------------------- 2. --from-list


def test_from_list_refuses_a_path_already_registered(dlm, disks: Path, db_url: str) -> None:
    """Issue 8, reproduction 2: two items on one file, and expiring one deletes the other's bytes."""
    (disks / "a" / "f.dat").write_bytes(b"ONLY COPY\n")
    assert dlm("ingest", "-s", "disk-a", str(disks / "a" / "f.dat"), "--name", "first").code == 0
    lst = disks / "list.jsonl"
    rows = [
        {"name": "g", "path": "g.dat", "size": 1},
        {"name": "second", "path": "f.dat", "size": 10, "checksum": _md5(b"ONLY COPY\n")},
    ]
    lst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = _counts(db_url)
    r = dlm("ingest", "-s", "disk-a", "--from-list", str(lst))
    assert r.code == 1
    line = _one_line_error(r.err)
    assert "line 2" in line and "'f.dat'" in line and "first v1" in line
    assert _counts(db_url) == before
    assert (disks / "a" / "f.dat").read_bytes() == b"ONLY COPY\n"


def test_from_list_refuses_the_same_path_on_two_rows(dlm, disks: Path, db_url: str) -> None:
    lst = disks / "list.csv"
    lst.write_text("name,path,size\none,shared.dat,3\nother,x.dat,3\ntwo,shared.dat,3\n")
    before = _counts(db_url)
    r = dlm("ingest", "-s", "disk-a", "--from-list", str(lst))
    assert r.code == 2
    line = _one_line_error(r.err)
    assert "line 4" in line and "'shared.dat'" in line and "line 2" in line
    assert _counts(db_url) == before


def test_from_list_across_batches_sees_earlier_batches(disks: Path, db_url: str) -> None:
    from lifecycle.catalogue import bulk

    source = io.StringIO(
        "".join(json.dumps({"name": f"n{i}", "path": "same.dat", "size": 1}) + "\n" for i in range(3))
    )
    with pytest.raises(ConflictError, match=r"line 2: path 'same\.dat'"), session_scope() as s:
        bulk.register_from_list(s, storage=get_storage("disk-a", session=s), source=source, batch_size=1)
    assert _counts(db_url)["item"] == 0


# --------------------------------------------------------------------------- the index


def test_the_database_holds_one_live_copy_per_path(disks: Path, db_url: str) -> None:
    with session_scope() as s:
        sid = get_storage("disk-a", session=s).id
        a, b = Item(name="a", size=1), Item(name="b", size=1)
        s.add_all([a, b])
        s.flush()
        s.add(Replica(item_oid=a.oid, storage_id=sid, path="p", state=ReplicaState.READY))
    with pytest.raises(IntegrityError), session_scope() as s:
        s.add(Replica(item_oid=b.oid, storage_id=sid, path="p", state=ReplicaState.COPYING))
    with session_scope() as s:  # DELETED and LOST rows do not hold the path
        s.add(Replica(item_oid=b.oid, storage_id=sid, path="p", state=ReplicaState.DELETED))
        s.add(Replica(item_oid=b.oid, storage_id=sid, path="p", state=ReplicaState.LOST))
    with session_scope() as s:
        assert s.execute(select(sa.func.count()).select_from(Replica)).one()[0] == 3


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migration_0002_refuses_a_catalogue_with_shared_paths(backend: str, tmp_path: Path) -> None:
    """An old catalogue that holds two live copies at one path is named and left as it was."""
    from contextlib import ExitStack

    from alembic import command

    from devrig.postgres import fresh_postgres_database
    from lifecycle.catalogue.db import alembic_config, get_engine, init_db

    with ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'old.db'}"
        else:
            try:
                url = stack.enter_context(fresh_postgres_database("dlm_mig"))
            except RuntimeError as exc:
                pytest.skip(f"PostgreSQL unavailable: {exc}")
        engine = get_engine(url)
        command.upgrade(alembic_config(engine), "0001")
        sid, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        with engine.begin() as conn:  # rows as a catalogue before 0002 could hold them
            conn.execute(
                sa.insert(Storage.__table__),  # type: ignore[attr-defined]
                [{"id": sid, "name": "old-disk", "kind": "posix", "root": "/srv/old"}],
            )
            conn.execute(
                sa.insert(Item.__table__),  # type: ignore[attr-defined]
                [{"oid": oid, "name": name, "state": "READY"} for oid, name in ((a, "a"), (b, "b"))],
            )
            conn.execute(
                sa.insert(Replica.__table__),  # type: ignore[attr-defined]
                [
                    {
                        "uid": uuid.uuid4(),
                        "item_oid": oid,
                        "storage_id": sid,
                        "path": "shared.dat",
                        "state": "READY",
                    }
                    for oid in (a, b)
                ],
            )
        with pytest.raises(ConflictError, match=r"'shared\.dat' on 'old-disk' \(2 copies\)"):
            init_db(url)
        names = {ix["name"] for ix in sa.inspect(engine).get_indexes("replica")}
        assert "uq_replica_storage_path_live" not in names
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0001"
            conn.execute(
                sa.update(Replica.__table__)  # type: ignore[attr-defined]
                .where(Replica.__table__.c.item_oid == b)  # type: ignore[attr-defined]
                .values(state="DELETED")
            )
        assert init_db(url) == "0004"
        names = {ix["name"] for ix in sa.inspect(engine).get_indexes("replica")}
        assert "uq_replica_storage_path_live" in names
        engine.dispose()


# --------------------------------------------------------------------------- 4. storage roots


def test_overlapping_posix_roots_are_refused(dlm, disks: Path, db_url: str) -> None:
    """Issue 8, reproduction 4: the same root twice, nested, containing, and `/`."""
    (disks / "a" / "inner").mkdir()
    link = disks / "alias-of-a"
    link.symlink_to(disks / "a")
    before = _counts(db_url)
    for root, how in (
        (disks / "a", "is the same as"),
        (link, "is the same as"),
        (disks / "a" / "inner", "lies inside"),
        (disks, "contains"),
    ):
        r = dlm("storage", "add", "disk-c", "--kind", "posix", "--root", str(root))
        assert r.code == 2, (root, r.err)
        line = _one_line_error(r.err)
        assert (how in line and "'disk-a'" in line) or "'disk-b'" in line, line
    r = dlm("storage", "add", "disk-c", "--kind", "posix", "--root", "/")
    assert r.code == 2 and "whole file system" in _one_line_error(r.err)
    assert _counts(db_url) == before
    (disks / "ab").mkdir()  # a sibling whose name starts like another root is fine
    assert dlm("storage", "add", "disk-c", "--kind", "posix", "--root", str(disks / "ab")).code == 0


def test_a_retired_storage_root_may_be_reused(dlm, disks: Path) -> None:
    assert dlm("storage", "retire", "disk-b").code == 0
    r = dlm("storage", "add", "disk-c", "--kind", "posix", "--root", str(disks / "b"))
    assert r.code == 0, r.err
    r = dlm("storage", "online", "disk-b")  # its root is disk-c's now
    assert r.code == 2 and "'disk-c'" in _one_line_error(r.err)


def test_rclone_local_remote_compared_as_posix(
    dlm, disks: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A remote of type local (or an alias of a local path) names files on this machine."""
    monkeypatch.setenv("RCLONE_CONFIG_LOC_TYPE", "local")
    monkeypatch.setenv("RCLONE_CONFIG_AL_TYPE", "alias")
    monkeypatch.setenv("RCLONE_CONFIG_AL_REMOTE", str(disks))
    before = _counts(db_url)
    for root in (f"loc:{disks / 'a' / 'sub'}", "al:b"):
        (disks / "a" / "sub").mkdir(exist_ok=True)
        r = dlm("storage", "add", "rc", "--kind", "rclone", "--root", root, "--no-check")
        assert r.code == 2, (root, r.err)
        assert "disk-" in _one_line_error(r.err)
    assert _counts(db_url) == before


def test_s3_roots_overlap_by_endpoint_bucket_and_prefix_segments(db_url: str) -> None:
    from lifecycle.catalogue.models import Storage
    from lifecycle.catalogue.storages import check_overlap
    from lifecycle.errors import InvalidValueError
    from lifecycle.states import StorageKind

    with session_scope() as s:
        s.add(Storage(name="s-a", kind=StorageKind.S3, root="bkt/a/b", endpoint="http://Host:8333/"))
        s.flush()
        for root, endpoint in (
            ("bkt/a", "http://host:8333"),
            ("bkt/a/b/c", "http://HOST:8333"),
            ("bkt", "http://host:8333"),
        ):
            with pytest.raises(InvalidValueError, match="'s-a'"):
                check_overlap(s, "new", StorageKind.S3, root, endpoint)
        for root, endpoint in (
            ("bkt/a/bc", "http://host:8333"),
            ("bkt/a/b", "http://other:8333"),
            ("bkt/a/b", None),
            ("other/a/b", "http://host:8333"),
        ):
            check_overlap(s, "new", StorageKind.S3, root, endpoint)


# --------------------------------------------------------------------------- 5. checkout


def test_checkout_refuses_a_storage_root(dlm, disks: Path, db_url: str) -> None:
    """Issue 8, reproduction 5: `dlm checkout p $R/b` where $R/b/p is another item's copy."""
    (disks / "a" / "p").write_bytes(b"item p\n")
    (disks / "b" / "p").write_bytes(b"item q's only copy\n")
    assert dlm("ingest", "-s", "disk-a", str(disks / "a" / "p")).code == 0
    assert dlm("ingest", "-s", "disk-b", str(disks / "b" / "p"), "--name", "q").code == 0
    before = _counts(db_url)
    for dest in (disks / "b", disks / "b" / "sub", disks):
        r = _dlm_process("checkout", "p", str(dest))
        assert r.code == 2, r.err
        line = _one_line_error(r.err)
        assert "storage 'disk-" in line and "outside every storage" in line
    assert (disks / "b" / "p").read_bytes() == b"item q's only copy\n"
    assert not (disks / "b" / "sub").exists()
    assert _counts(db_url) == before
    r = _dlm_process("checkout", "p", str(disks / "out"))
    assert r.code == 0, r.err
    assert (disks / "out" / "p").read_bytes() == b"item p\n"


# --------------------------------------------------------------------------- replicate


@pytest.mark.rclone
def test_copy_files_keeps_different_bytes_and_accepts_identical(tmp_path: Path, rclone_path: str) -> None:
    from lifecycle.transfer.target import RcloneTarget

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for name, src, dst in (("same", b"same", b"same"), ("diff", b"new", b"theirs"), ("fresh", b"f", None)):
        (a / name).write_bytes(src)
        if dst is not None:
            (b / name).write_bytes(dst)
    report = copy_files(RcloneTarget(str(a)), RcloneTarget(str(b)), ["same", "diff", "fresh"])
    assert report.ok == {"same", "fresh"}
    assert report.failed == {"diff": "a different file already exists at the destination (left as it is)"}
    assert (b / "diff").read_bytes() == b"theirs" and (b / "fresh").read_bytes() == b"f"


@pytest.mark.prefect
@pytest.mark.rclone
def test_replicate_leaves_a_stray_file_at_the_destination(
    tmp_path: Path, db_url: str, flows_env: None
) -> None:
    """Bytes at the destination path that no catalogue row tracks are not copied over: the
    transfer FAILS with a clear error and the bytes stay. (Set up through the core, not the
    in-process CLI: Prefect's log handlers would keep the CLI fixture's captured stream.)"""
    from lifecycle.catalogue.models import StorageCreate
    from lifecycle.states import Phase, StorageKind

    disks = tmp_path
    (disks / "a" / "l.dat").parent.mkdir()
    (disks / "b").mkdir()
    (disks / "a" / "l.dat").write_bytes(b"liquid item\n")
    with session_scope() as s:
        for name, sub, loc in (("disk-a", "a", "site-a"), ("disk-b", "b", "site-b")):
            add_storage(
                StorageCreate(name=name, kind=StorageKind.POSIX, root=str(disks / sub), location=loc),
                session=s,
            )
        a = get_storage("disk-a", session=s)
        sources = plan_ingest(storage=a, paths=["l.dat"], upload=False, session=s)
        ingest(storage=a, sources=sources, options=IngestOptions(phase=Phase.LIQUID), session=s)
    (disks / "b" / "l.dat").write_bytes(b"nobody's, but not DLM's to replace\n")
    from flows.pipelines import replicate

    report = replicate()
    with session_scope() as s:
        errors = [
            t.error for t in s.scalars(select(Transfer).where(col(Transfer.state) == TransferState.FAILED))
        ]
        live_b = s.execute(
            select(sa.func.count())
            .select_from(Replica)
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(col(Storage.name) == "disk-b", col(Replica.state).in_(["READY", "COPYING"]))
        ).one()[0]
    assert errors == ["a different file already exists at the destination (left as it is)"], report
    assert live_b == 0
    assert (disks / "b" / "l.dat").read_bytes() == b"nobody's, but not DLM's to replace\n"
    assert (disks / "a" / "l.dat").read_bytes() == b"liquid item\n"


@pytest.mark.rclone
def test_a_copy_claim_on_a_path_another_item_holds_is_skipped(
    disks: Path, db_url: str, rclone_path: str
) -> None:
    """The claim insert meets the index: the copy is skipped and reported, nothing is written."""
    from lifecycle.apply.copy import apply_copy_batch
    from lifecycle.planning.actions import Copy
    from lifecycle.planning.plan import CopyBatch

    (disks / "a" / "m.dat").write_bytes(b"item m\n")
    (disks / "b" / "m.dat").write_bytes(b"item n on b\n")
    with session_scope() as s:
        a, b = get_storage("disk-a", session=s), get_storage("disk-b", session=s)
        for st, name in ((a, "m.dat"), (b, "n")):
            path = "m.dat"
            srcs = plan_ingest(storage=st, paths=[path], upload=False, name=name, session=s)
            ingest(storage=st, sources=srcs, options=IngestOptions(), session=s)
        m = get_item("m.dat", session=s)
        batch = CopyBatch(a.id, b.id, (Copy(m.oid, a.id, "m.dat", b.id, "m.dat", m.size, "test"),))
    result = apply_copy_batch(batch)
    assert (result.skipped, result.done, result.failed) == (1, 0, 0)
    assert (disks / "b" / "m.dat").read_bytes() == b"item n on b\n"
    with session_scope() as s:
        assert s.execute(select(sa.func.count()).select_from(Transfer)).one()[0] == 0


def test_a_lost_copy_does_not_come_back_over_another_items_path(dlm, disks: Path, db_url: str) -> None:
    """A LOST row frees its path; once another item holds it, the LOST copy is not brought
    back (verify's "found intact again"), which would put two live owners on one file."""
    from lifecycle.apply.settle import Check, ReplicaChange, apply_replica_changes
    from lifecycle.catalogue.models import utcnow

    (disks / "a" / "p.dat").write_bytes(b"A's bytes\n")
    assert dlm("ingest", "-s", "disk-a", str(disks / "a" / "p.dat"), "--name", "item-a").code == 0
    (disks / "a" / "p.dat").unlink()
    with session_scope() as s:
        s.execute(sa.update(Replica).values(state=ReplicaState.LOST.value))
    (disks / "new").write_bytes(b"B's bytes\n")
    r = dlm("ingest", "-s", "disk-a", "--upload", str(disks / "new"), "--name", "p.dat")
    assert r.code == 0, r.err
    with session_scope() as s:
        a = get_item("item-a", session=s)
        lost = s.scalars(select(Replica).where(col(Replica.item_oid) == a.oid)).one()
        check = Check(
            lost.uid, a.oid, lost.storage_id, "p.dat", a.size, str(a.checksum), "md5", ReplicaState.LOST
        )
        change = ReplicaChange(check, ReplicaState.READY, "replica.recovered", {})
        done = apply_replica_changes(s, [change], storage_id=lost.storage_id, actor="test", now=utcnow())
    assert done == []
    with session_scope() as s:
        assert s.scalars(select(Replica.state).where(col(Replica.item_oid) == a.oid)).one() == "LOST"
    assert (disks / "a" / "p.dat").read_bytes() == b"B's bytes\n"


@pytest.mark.s3
@pytest.mark.rclone
def test_adopt_decodes_percent_encoded_s3_metadata(
    db_url: str, s3_bucket: str, s3_env: Any, rclone_path: str
) -> None:
    """Metadata that is not ASCII travels percent-encoded and comes back as it was given."""
    from lifecycle.catalogue.models import StorageCreate
    from lifecycle.integrity.reconcile import reconcile_storage
    from lifecycle.states import StorageKind
    from lifecycle.storage.backends import backend_for

    with session_scope() as s:
        st = add_storage(
            StorageCreate(
                name="obj",
                kind=StorageKind.S3,
                root=s3_bucket,
                endpoint=s3_env.endpoint,
                credentials_env="DLM_TEST_S3",
            ),
            session=s,
        )
        backend = backend_for(st)
    backend.put("obs/été.dat", io.BytesIO(b"summer"), metadata={"instrument": "télescope 100%"})
    head = s3_env.client().head_object(Bucket=s3_bucket, Key="obs/été.dat")
    assert head["Metadata"]["instrument"] == "t%C3%A9lescope 100%25"
    result = reconcile_storage("obj", adopt=True)
    assert result.adopted == 1
    with session_scope() as s:
        item = get_item("obs/été.dat", session=s)
        assert item.meta["instrument"] == "télescope 100%"
        assert item.checksum == _md5(b"summer")


@pytest.mark.rclone
def test_rclone_storage_put_refuses_an_existing_object(
    rclone_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lifecycle.storage.rclone import RcloneStorage

    monkeypatch.setenv("RCLONE_CONFIG_LABDISK_TYPE", "local")
    root = tmp_path / "labdisk"
    root.mkdir()
    (root / "f.bin").write_bytes(b"theirs")
    st = RcloneStorage("lab", f"labdisk:{root}")
    src = tmp_path / "mine.bin"
    src.write_bytes(b"mine!!")
    for source in (src, io.BytesIO(b"mine!!")):
        with pytest.raises(ConflictError, match="already exists on storage 'lab'"):
            st.put("f.bin", source)
    assert (root / "f.bin").read_bytes() == b"theirs"
    assert st.put("g.bin", src).size == 6


def test_posix_put_without_hard_links_is_still_no_clobber(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a file system without hard links the final name is claimed with O_EXCL first."""
    import errno

    from lifecycle.storage.posix import PosixStorage

    def no_links(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    st = PosixStorage("p", tmp_path)
    assert st.put("new.bin", io.BytesIO(b"fresh")).size == 5
    assert (tmp_path / "new.bin").read_bytes() == b"fresh"
    with pytest.raises(ConflictError, match="already exists"):
        st.put("new.bin", io.BytesIO(b"other"))
    assert (tmp_path / "new.bin").read_bytes() == b"fresh"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.bin"]
