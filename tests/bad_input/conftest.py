"""The bad-input corpus's estate: one catalogue per backend (SQLite, PostgreSQL) for the module.

Building an estate through the CLI takes a second; every case leaves it unchanged (that is
what the corpus asserts), so the cases of a module share one per backend.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

import lifecycle.catalogue.tokens  # noqa: F401  (registers the token table for the snapshots)
from lifecycle import settings as settings_mod
from lifecycle.catalogue.db import dispose_engines, get_engine, init_db, session_scope
from lifecycle.catalogue.models import Item, Replica
from lifecycle.states import ItemState, ReplicaState

TABLES = ("location", "storage", "item", "replica", "transfer", "event", "dataset", "token")
S3_PREFIX = "CORPUS_S3"  # the estate's S3 storage reads CORPUS_S3_ACCESS_KEY_ID / _SECRET_ACCESS_KEY
WRONG_PREFIX = "CORPUS_WRONG"  # the right access key with a wrong secret


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Estate:
    """Where everything of one backend's estate lives (`paths` feeds the case templates)."""

    backend: str
    url: str
    base: Path
    paths: dict[str, str] = field(default_factory=dict)
    s3: Any = None  # the SeaweedServer, once an S3 storage is added
    bucket: str | None = None

    def roots(self) -> list[Path]:
        return [self.base / "disk-a", self.base / "disk-b", self.base / "src"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_env(mp: pytest.MonkeyPatch, estate: Estate) -> None:
    """The environment a case runs in: the estate's catalogue, a fixed owner, no rclone config."""
    mp.setenv("DLM_DATABASE_URL", estate.url)
    mp.setenv("DLM_OWNER", "tester")
    mp.setenv("COLUMNS", "250")
    mp.setenv("RCLONE_CONFIG", str(estate.base / "rclone.conf"))  # empty: no remotes
    if estate.s3 is not None:
        mp.setenv(f"{S3_PREFIX}_ACCESS_KEY_ID", estate.s3.access_key)
        mp.setenv(f"{S3_PREFIX}_SECRET_ACCESS_KEY", estate.s3.secret_key)
        mp.setenv(f"{WRONG_PREFIX}_ACCESS_KEY_ID", estate.s3.access_key)
        mp.setenv(f"{WRONG_PREFIX}_SECRET_ACCESS_KEY", "not-the-secret")
    for var in ("CORPUS_NOSUCH_ACCESS_KEY_ID", "CORPUS_NOSUCH_SECRET_ACCESS_KEY"):
        mp.delenv(var, raising=False)
    settings_mod.reset_settings()


def run_cli(*args: str) -> int:
    """`dlm ARGS...` in-process (output goes to the test's capture); the exit code."""
    from dlm.cli import main

    settings_mod.reset_settings()
    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _ok(*args: str) -> None:
    code = run_cli(*args)
    assert code == 0, f"building the estate: dlm {' '.join(args)} exited {code}"


def _write_inputs(base: Path) -> None:
    """Local files, metadata documents, lists, links and FIFOs the cases point at."""
    src = base / "src"
    (src / "other").mkdir(parents=True)
    for i in range(3):
        (src / f"f{i}.dat").write_bytes(bytes([65 + i]) * (1000 * (i + 1)))
    (src / "other" / "f0.dat").write_bytes(b"same name, other directory")
    (base / "empty").mkdir()
    (base / "afile").write_bytes(b"a file, not a directory")
    (base / "outside.dat").write_bytes(b"outside every storage root")
    (base / "secretdir").mkdir()
    (base / "secretdir" / "secret.dat").write_bytes(b"secret")
    (base / "rclone.conf").write_text("")
    os.mkfifo(base / "pipe")

    meta = base / "meta"
    meta.mkdir()
    docs: dict[str, str | bytes] = {
        "bad.json": "{not json",
        "array.json": "[1, 2]",
        "string.json": '"just text"',
        "number.json": "42",
        "null.json": "null",
        "huge.json": json.dumps({"blob": "x" * (1024 * 1024 + 10)}),
        "nan.json": '{"exposure": NaN}',
        "infinity.json": '{"exposure": Infinity}',
        "deep.json": '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "nul.json": '{"note": "a\\u0000b"}',
        "surrogate.json": '{"note": "\\ud800"}',
        "latin1.json": b'{"note": "caf\xe9"}',
        "duplicate.json": '{"a": 1, "a": 2}',
        "inf-1e400.json": '{"n": 1e400}',
        "neg-inf.json": '{"n": {"deep": [-1e400]}}',
        "key-escape.json": '{"a\\u001bb": 1}',
        "key-newline.json": '{"note\\n": 1}',
        "over-64kib.json": json.dumps({"blob": "x" * (64 * 1024)}),
        "nested-300.json": '{"a": ' * 300 + "1" + "}" * 300,
    }
    for name, text in docs.items():
        p = meta / name
        p.write_bytes(text if isinstance(text, bytes) else text.encode())

    lists = base / "lists"
    lists.mkdir()
    good = [{"name": f"bulk/{i}.dat", "path": f"bulk/{i}.dat", "size": 10} for i in range(3)]
    rows = [*good, {"name": "../escape", "path": "bulk/x.dat", "size": 10}, *good]
    (lists / "bad-name.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (lists / "bad-size.csv").write_text("name,path,size\nbulk/a.dat,bulk/a.dat,5\nbulk/b.dat,bulk/b.dat,-5\n")
    (lists / "bad-json.jsonl").write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1]) + "\n{oops\n")
    bad_rows = {
        "at-name.jsonl": {**good[1], "name": "n@v2", "path": "bulk/n.dat"},
        "blank-name.jsonl": {**good[1], "name": "bulk/ x.dat", "path": "bulk/x.dat"},
        "wide-segment.jsonl": {**good[1], "name": "\u00e9" * 200, "path": "bulk/x.dat"},
        "owner-escape.jsonl": {**good[1], "owner": "evil\x1b[2J"},
        "meta-key-control.jsonl": {**good[1], "metadata": {"bell\x07": 1}},
        "meta-over-64kib.jsonl": {**good[1], "metadata": {"blob": "x" * (64 * 1024)}},
    }
    deep: dict[str, object] = {"v": 1}
    for _ in range(400):
        deep = {"a": deep}
    bad_rows["meta-nested-400.jsonl"] = {**good[1], "metadata": deep}
    for fname, row in bad_rows.items():
        (lists / fname).write_text(json.dumps(good[0]) + "\n" + json.dumps(row) + "\n")
    (lists / "meta-infinity.jsonl").write_text(
        json.dumps(good[0]) + "\n" + json.dumps(good[1])[:-1] + ', "metadata": {"n": 1e400}}\n'
    )
    (lists / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    (lists / "bad-phase.jsonl").write_text(
        json.dumps(good[0]) + "\n" + json.dumps({**good[1], "phase": "VAPOUR"}) + "\n"
    )


def _build(estate: Estate) -> None:
    base = estate.base
    a, b = base / "disk-a", base / "disk-b"
    a.mkdir()
    b.mkdir()
    _write_inputs(base)
    src = base / "src"
    _ok(
        "storage",
        "add",
        "disk-a",
        "--kind",
        "posix",
        "--root",
        str(a),
        "--tier",
        "hot",
        "--location",
        "site-a",
        "--capacity",
        "1GiB",
    )
    _ok(
        "storage",
        "add",
        "disk-b",
        "--kind",
        "posix",
        "--root",
        str(b),
        "--tier",
        "cold",
        "--location",
        "site-b",
    )
    _ok(
        "ingest",
        "-s",
        "disk-a",
        "--upload",
        str(src / "f0.dat"),
        "--name",
        "run/f0.dat",
        "--meta",
        "kind=raw",
        "--lifetime",
        "30d",
    )
    _ok("ingest", "-s", "disk-a", "--upload", str(src / "f1.dat"), "--name", "gone.dat")
    (b / "obs").mkdir()
    (b / "obs" / "a.fits").write_bytes(b"F" * 4096)
    _ok("ingest", "-s", "disk-b", str(b / "obs" / "a.fits"), "--phase", "LIQUID")
    _ok("datasets", "create", "raw", "--where", "meta.kind = 'raw'")
    # A DELETED item, as expiry leaves it: tombstone item, DELETED replica, file gone.
    with session_scope(estate.url) as s:
        gone = s.execute(sa.select(Item).where(Item.name == "gone.dat")).scalar_one()
        s.execute(
            sa.update(Replica).where(Replica.item_oid == gone.oid).values(state=ReplicaState.DELETED.value)
        )
        gone.state = ItemState.DELETED
        s.add(gone)
    (a / "gone.dat").unlink()
    # Traps inside disk-a's root: links that lead outside it, and a FIFO.
    (a / "evil-link.dat").symlink_to(base / "outside.dat")
    (a / "evil-dir").symlink_to(base / "secretdir", target_is_directory=True)
    # ...and links that stay inside it (one more item on a registered file, if followed).
    (a / "inner-link.dat").symlink_to("run/f0.dat")
    (a / "run-alias").symlink_to(a / "run", target_is_directory=True)
    os.mkfifo(a / "pipe")
    estate.paths = {
        "base": str(base),
        "src": str(src),
        "a": str(a),
        "b": str(b),
        "meta": str(base / "meta"),
        "lists": str(base / "lists"),
        "closed": f"http://127.0.0.1:{_closed_port()}",
    }


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def estate(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Estate]:
    """Two posix storages, three items (one DELETED), a dataset, and the inputs of the cases."""
    base = tmp_path_factory.mktemp(f"corpus-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{base / 'catalogue.db'}"
        init_db(url)
    else:
        url = request.getfixturevalue("postgres_url")
        with get_engine(url).begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    est = Estate(request.param, url, base)
    with pytest.MonkeyPatch.context() as mp:
        for key in list(os.environ):
            if key.startswith("DLM_") and key != "DLM_TEST_POSTGRES_URL":
                mp.delenv(key)
        mp.setenv("DLM_HOME", str(base / "home"))
        set_env(mp, est)
        _build(est)
    settings_mod.reset_settings()
    yield est
    if request.param == "sqlite":
        get_engine(url).dispose()
        dispose_engines()


@pytest.fixture(scope="module")
def s3_estate(estate: Estate, request: pytest.FixtureRequest) -> Estate:
    """The estate plus an S3 storage `s3-a` (one item on it) on the session's SeaweedFS server."""
    if estate.s3 is None:
        server = request.getfixturevalue("s3_server")
        bucket = f"corpus-{uuid.uuid4().hex[:10]}"
        server.create_bucket(bucket)
        estate.s3, estate.bucket = server, bucket
        estate.paths.update(endpoint=server.endpoint, bucket=bucket, key=server.access_key)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DLM_HOME", str(estate.base / "home"))
            set_env(mp, estate)
            _ok(
                "storage",
                "add",
                "s3-a",
                "--kind",
                "s3",
                "--root",
                bucket,
                "--endpoint",
                server.endpoint,
                "--credentials-env",
                S3_PREFIX,
                "--tier",
                "warm",
            )
            _ok(
                "ingest", "-s", "s3-a", "--upload", str(estate.base / "src" / "f2.dat"), "--name", "s3/f2.dat"
            )
        settings_mod.reset_settings()
    return estate


@pytest.fixture(autouse=True)
def _estate_env(_isolated_env: None, estate: Estate, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every case runs on its module's estate (after the session's per-test isolation)."""
    set_env(monkeypatch, estate)


@pytest.fixture
def dlm(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Run `dlm ARGS...` in-process: exit code, stdout and stderr."""

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = run_cli(*args)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


# --------------------------------------------------------------------------- snapshots


def catalogue_digest(url: str) -> dict[str, str]:
    """Per table, the row count and a sha256 over every row (as text) ordered by primary key."""
    out: dict[str, str] = {}
    with get_engine(url).connect() as conn:
        for name in TABLES:
            table = SQLModel.metadata.tables[name]
            digest = hashlib.sha256()
            n = 0
            for row in conn.execute(sa.select(table).order_by(*table.primary_key.columns)):
                digest.update(repr(tuple(row)).encode() + b"\n")
                n += 1
            out[name] = f"{n} rows, sha256 {digest.hexdigest()}"
    return out


def files_digest(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under a directory (not following links): type, size and content hash."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in (*dirnames, *filenames):
            p = Path(dirpath, entry)
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if stat.S_ISREG(st.st_mode):
                out[rel] = ("file", st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            else:
                out[rel] = (stat.filemode(st.st_mode),)
    return out


def bucket_digest(estate: Estate) -> dict[str, tuple[int, str]] | None:
    if estate.s3 is None:
        return None
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=estate.s3.endpoint,
        region_name="us-east-1",
        aws_access_key_id=estate.s3.access_key,
        aws_secret_access_key=estate.s3.secret_key,
    )
    try:
        page = client.list_objects_v2(Bucket=estate.bucket)
        return {o["Key"]: (o["Size"], o["ETag"]) for o in page.get("Contents", [])}
    finally:
        client.close()


def snapshot(estate: Estate) -> dict[str, Any]:
    """The catalogue digest and every storage's (and the sources') files."""
    return {
        "catalogue": catalogue_digest(estate.url),
        "files": {str(r): files_digest(r) for r in estate.roots()},
        "bucket": bucket_digest(estate),
    }


class FifoGuard:
    """Keeps a test from hanging on a FIFO: feeds every reader a few bytes until stopped."""

    def __init__(self, fifo: Path) -> None:
        self.fifo = fifo
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._feed, daemon=True)

    def _feed(self) -> None:
        while not self.stop.is_set():
            with open(self.fifo, "wb") as f:  # blocks until a reader opens the FIFO
                if not self.stop.is_set():
                    f.write(b"fifo data")

    def __enter__(self) -> FifoGuard:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)  # releases a writer blocked in open()
        try:
            self.thread.join(timeout=5)
        finally:
            os.close(fd)
