"""Bulk registration from a list file (`dlm ingest --from-list`), on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from lifecycle.catalogue.bulk import register_from_list
from lifecycle.catalogue.db import get_engine, session_scope
from lifecycle.catalogue.models import Event, Item, Replica, Storage
from lifecycle.errors import (
    ConflictError,
    InvalidMetadataError,
    InvalidNameError,
    InvalidValueError,
    SourceNotFoundError,
    UserInputError,
)

N = 2500


@pytest.fixture(autouse=True)
def _close_connections(db_url: str) -> Iterator[None]:
    """Close pooled connections before db_url's teardown drops the engine cache: dropping a
    PostgreSQL engine with open connections raises ResourceWarning (an error here)."""
    yield
    get_engine(db_url).dispose()


def md5(i: int) -> str:
    return hashlib.md5(str(i).encode()).hexdigest()


def make_storage(session: Session, name: str = "disk") -> Storage:
    storage = Storage(name=name, kind="posix", root="/tmp/x")
    session.add(storage)
    session.flush()
    return storage


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(n: int = N) -> list[dict[str, object]]:
    return [
        {
            "name": f"run{i % 7}/obs{i:07d}.fits",
            "path": f"raw/run{i % 7}/obs{i:07d}.fits",
            "size": i * 10,
            "checksum": md5(i),
            "metadata": {"run": i % 7, "band": "r"},
        }
        for i in range(n)
    ]


def counts(url: str) -> tuple[int, int, int, int]:
    with session_scope(url) as s:
        used = s.execute(select(func.coalesce(func.sum(Storage.used_bytes), 0))).scalar_one()
        return (
            s.execute(select(func.count()).select_from(Item)).scalar_one(),
            s.execute(select(func.count()).select_from(Replica)).scalar_one(),
            s.execute(select(func.count()).select_from(Event)).scalar_one(),
            used,
        )


def register(url: str, source: Path | io.StringIO, **kwargs: object) -> object:
    with session_scope(url) as s:
        storage = s.exec(select(Storage).where(Storage.name == "disk")).first()  # type: ignore[call-overload]
        storage = storage[0] if storage is not None else make_storage(s)
        return register_from_list(s, storage=storage, source=source, **kwargs)  # type: ignore[arg-type]


def test_jsonl_rows_read_back_through_the_orm(db_url: str, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "list.jsonl", rows())
    seen: list[int] = []
    result = register(db_url, src, batch_size=1000, progress=seen.append, owner="alice", actor="tester")
    assert (result.count, result.ready, result.pending, result.new_versions) == (N, N, 0, 0)  # type: ignore[attr-defined]
    assert result.bytes == sum(i * 10 for i in range(N))  # type: ignore[attr-defined]
    assert seen == [1000, 2000, N]
    with session_scope(db_url) as s:
        items = {i.name: i for i in s.exec(select(Item)).scalars()}  # type: ignore[call-overload]
        assert len(items) == N
        item = items["run3/obs0000010.fits"]
        assert (item.version, item.size, item.checksum, item.checksum_algo) == (1, 100, md5(10), "md5")
        assert item.meta == {"run": 3, "band": "r"}
        assert item.state == "READY" and item.owner == "alice" and item.target_phase == "GAS"
        assert item.created_at.tzinfo is not None and item.parents == []
        storage = s.exec(select(Storage)).scalars().one()  # type: ignore[call-overload]
        assert storage.used_bytes == result.bytes  # type: ignore[attr-defined]
        replica = s.exec(select(Replica).where(Replica.item_oid == item.oid)).scalars().one()  # type: ignore[call-overload]
        assert replica.path == "raw/run3/obs0000010.fits"
        assert replica.storage_id == storage.id and replica.state == "READY"
        events = s.exec(select(Event).where(Event.item_oid == item.oid)).scalars().all()  # type: ignore[call-overload]
        assert [(e.kind, e.actor, e.details, e.replica_uid) for e in events] == [
            ("item.ready", "tester", {"bulk": True}, replica.uid)
        ]
    assert counts(db_url)[:3] == (N, N, N)


def test_csv_rows_and_versions(db_url: str, tmp_path: Path) -> None:
    src = tmp_path / "list.csv"
    lines = ["name,path,size,checksum,checksum_algo,metadata"]
    for i in range(N):
        meta = json.dumps({"i": i}).replace('"', '""')
        lines.append(f'a/f{i}.dat,,{i},{md5(i)},md5,"{meta}"')
    src.write_text("\n".join(lines) + "\n")
    first = register(db_url, src)
    assert first.count == N and first.new_versions == 0  # type: ignore[attr-defined]
    # The same names again, as new files (one path holds one item: the same paths are refused).
    renamed = [f"{name},v2/{name}{rest}" for name, rest in (ln.split(",", 1) for ln in lines[1:])]
    src.write_text("\n".join([lines[0], *renamed]) + "\n")
    again = register(db_url, src, batch_size=700)
    assert again.count == N and again.new_versions == N  # type: ignore[attr-defined]
    with session_scope(db_url) as s:
        got = s.exec(
            select(Item.name, Item.version, Item.meta, Item.size).where(Item.name == "a/f42.dat")
        ).all()  # type: ignore[call-overload]
        assert sorted((v, m, z) for _, v, m, z in got) == [(1, {"i": 42}, 42), (2, {"i": 42}, 42)]
        paths = s.exec(select(Replica.path).distinct().where(Replica.path == "a/f42.dat")).all()  # type: ignore[call-overload]
        assert len(paths) == 1
    assert counts(db_url)[:3] == (2 * N, 2 * N, 2 * N)


def test_duplicates_in_one_list_get_consecutive_versions(db_url: str, tmp_path: Path) -> None:
    same = {"name": "x/y.fits", "size": 1, "checksum": md5(1)}
    rows = [
        same,
        {"name": "other", "size": 2},
        {**same, "path": "x/y.fits.2"},
        {**same, "path": "x/y.fits.3"},
    ]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    result = register(db_url, src, batch_size=2)  # the duplicates straddle batches
    assert result.new_versions == 2  # type: ignore[attr-defined]
    with session_scope(db_url) as s:
        versions = s.exec(select(Item.version).where(Item.name == "x/y.fits").order_by(Item.version)).all()  # type: ignore[call-overload]
        assert [v[0] for v in versions] == [1, 2, 3]


def test_item_without_checksum_is_initialised_with_pending_replica(db_url: str) -> None:
    src = io.StringIO('{"name": "a/b", "size": 5, "meta": {"k": "v"}, "phase": "liquid"}\n')
    result = register(db_url, src, meta={"k": "base", "project": "p"})
    assert (result.ready, result.pending) == (0, 1)  # type: ignore[attr-defined]
    with session_scope(db_url) as s:
        item = s.exec(select(Item)).scalars().one()  # type: ignore[call-overload]
        assert item.state == "INITIALISED" and item.checksum is None and item.target_phase == "LIQUID"
        assert item.meta == {"k": "v", "project": "p"}
        assert s.exec(select(Replica.state)).one()[0] == "PENDING"  # type: ignore[call-overload]
        assert s.exec(select(Event.kind)).one()[0] == "item.registered"  # type: ignore[call-overload]


def test_empty_file_registers_nothing(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n\n  \n")
    assert register(db_url, tmp_path / "empty.jsonl").count == 0  # type: ignore[attr-defined]
    assert register(db_url, tmp_path / "blank.txt").count == 0  # type: ignore[attr-defined]
    assert counts(db_url) == (0, 0, 0, 0)


GOOD = '{"name": "ok/1", "size": 1}\n'
BAD_JSONL = [
    ('{"name": "ok/2", "size": 1', InvalidValueError, "invalid JSON"),
    ('{"name": "a", "size": 1, "metadata": [1]}', InvalidMetadataError, "must be a JSON object"),
    ('{"name": "a", "size": 1, "meta": "x"}', InvalidMetadataError, "must be a JSON object"),
    ('{"name": "../x", "size": 1}', InvalidNameError, "invalid item name '../x'"),
    ('{"name": "a/../x", "size": 1}', InvalidNameError, "'..'"),
    ('{"name": "/etc/passwd", "size": 1}', InvalidNameError, "absolute"),
    ('{"name": "a", "path": "/abs/a", "size": 1}', InvalidNameError, "invalid path"),
    ('{"name": "a\\u0000b", "size": 1}', InvalidNameError, "control"),
    ('{"name": "a", "size": -1}', InvalidValueError, "invalid size -1"),
    ('{"name": "a", "size": "12"}', InvalidValueError, "invalid size"),
    ('{"name": "a"}', InvalidValueError, "'size' is required"),
    ('{"name": "a", "size": 1, "checksum": "xyz"}', InvalidValueError, "invalid md5 checksum"),
    ('{"name": "a", "size": 1, "checksum": "' + "a" * 40 + '"}', InvalidValueError, "32 hex digits"),
    ('{"name": "a", "size": 1, "checksum_algo": "crc"}', InvalidValueError, "unknown checksum algorithm"),
    ('{"name": "a", "size": 1, "phase": "PLASMAX"}', InvalidValueError, "invalid phase"),
    ('{"name": "a", "size": 1, "expires_at": "soon"}', InvalidValueError, "invalid date"),
    ('{"name": "a", "size": 1, "colour": "red"}', InvalidValueError, "unknown field 'colour'"),
    ('{"name": "a", "size": 1, "meta": {"k": "\\u0000"}}', InvalidMetadataError, "NUL"),
    ("[1, 2]", InvalidValueError, "JSON object"),
    ('{"name": "a", "size": 9223372036854775807}', InvalidValueError, "add up to more than"),
]


@pytest.mark.parametrize(("bad", "error", "text"), BAD_JSONL, ids=[b[2] for b in BAD_JSONL])
def test_bad_jsonl_row_names_its_line_and_changes_nothing(
    db_url: str, tmp_path: Path, bad: str, error: type[UserInputError], text: str
) -> None:
    src = tmp_path / "list.jsonl"
    good = [GOOD.replace("ok/1", f"ok/{i}") for i in range(1, 5)]  # one path, one item
    src.write_text("".join(good[:3]) + "\n" + bad + "\n" + good[3])  # the bad row is on line 5
    before = counts(db_url)
    with pytest.raises(error) as info:
        register(db_url, src, batch_size=2)  # two batches were already written when it fails
    message = str(info.value)
    assert message.startswith(f"{src} line 5: ") and text in message and "\n" not in message
    assert counts(db_url) == before


BAD_CSV = [
    ("a,1,nothex", InvalidValueError, "invalid md5 checksum"),
    ("../a,1,", InvalidNameError, "invalid item name"),
    ("a,-3,", InvalidValueError, "invalid size '-3'"),
    ("a,,", InvalidValueError, "'size' is required"),
    ("a,1", InvalidValueError, "expected 3 columns"),
]


@pytest.mark.parametrize(("bad", "error", "text"), BAD_CSV, ids=[b[2] for b in BAD_CSV])
def test_bad_csv_row_names_its_line_and_changes_nothing(
    db_url: str, tmp_path: Path, bad: str, error: type[UserInputError], text: str
) -> None:
    src = tmp_path / "list.csv"
    src.write_text("name,size,checksum\nok/1,1,\nok/2,2,\n" + bad + "\nok/3,3,\n")
    with pytest.raises(error, match=rf"^{src} line 4: .*{text}"):
        register(db_url, src, batch_size=1)
    assert counts(db_url) == (0, 0, 0, 0)


def test_bad_csv_header_and_missing_file(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "h.csv").write_text("name,bytes\na,1\n")
    with pytest.raises(InvalidValueError, match="line 1: invalid CSV header"):
        register(db_url, tmp_path / "h.csv")
    with pytest.raises(SourceNotFoundError, match="does not exist"):
        register(db_url, tmp_path / "missing.jsonl")
    assert counts(db_url) == (0, 0, 0, 0)


def test_auto_format_sniffs_content(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("\n" + GOOD)
    (tmp_path / "list2.txt").write_text("name,size\nb/c,3\n")
    assert register(db_url, tmp_path / "list.txt").count == 1  # type: ignore[attr-defined]
    assert register(db_url, tmp_path / "list2.txt").count == 1  # type: ignore[attr-defined]


def test_list_defaults_merge_into_each_rows_nested_metadata(db_url: str) -> None:
    """`--from-list rows.jsonl --meta obs.site=A` gives every item meta.obs.site = 'A': a row
    whose metadata holds its own "obs" object keeps the default's keys beside its own (a row's
    value wins where both set the same key, and a row's non-object replaces the default's)."""
    src = io.StringIO(
        json.dumps({"name": "a/1", "size": 5, "checksum": md5(1), "metadata": {"obs": {"night": 3}}})
        + "\n"
        + json.dumps({"name": "a/2", "size": 5, "metadata": {"obs": {"site": "B", "night": 4}}})
        + "\n"
        + json.dumps({"name": "a/3", "size": 5, "metadata": {"obs": 7}})
        + "\n"
    )
    register(db_url, src, meta={"obs": {"site": "A"}, "kind": "raw"})
    with session_scope(db_url) as s:
        found = {i.name: i.meta for i in s.exec(select(Item)).scalars()}  # type: ignore[call-overload]
    assert found == {
        "a/1": {"obs": {"site": "A", "night": 3}, "kind": "raw"},
        "a/2": {"obs": {"site": "B", "night": 4}, "kind": "raw"},
        "a/3": {"obs": 7, "kind": "raw"},
    }


def test_every_column_reads_back_as_a_row_gave_it(db_url: str) -> None:
    """The binary COPY (PostgreSQL) and raw inserts (SQLite) write each column as the ORM reads
    it: a row's own owner, phase, expiry (with its zone), algorithm, non-ASCII names and metadata,
    beside the list's defaults (owner, lifetime, metadata)."""
    from datetime import UTC, datetime, timedelta

    rows = [
        {
            "name": "ré/été 1.fits",
            "path": "raw/ré/x y.fits",
            "size": 2**40,
            "checksum": hashlib.sha256(b"x").hexdigest().upper(),
            "checksum_algo": "sha256",
            "metadata": {"band": "ř", "n": [1, 2.5, None], "obs": {"night": 3}},
            "phase": "liquid",
            "expires_at": "2030-01-02T03:04:05.123456+02:00",
            "owner": "bob",
        },
        {"name": "plain", "size": 0},
        {"name": "q\"uote's 😀", "size": 2**63 - 1 - 2**40, "metadata": {"k": 'a "b" \\ \t'}},
    ]
    src = io.StringIO("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    before = datetime.now(UTC)
    result = register(
        db_url, src, owner="alice", actor="tester", lifetime=timedelta(days=2), meta={"obs": {"site": "A"}}
    )
    assert (result.count, result.ready, result.pending) == (3, 1, 2)  # type: ignore[attr-defined]
    with session_scope(db_url) as s:
        items = {i.name: i for i in s.exec(select(Item)).scalars()}  # type: ignore[call-overload]
        first, plain = items["ré/été 1.fits"], items["plain"]
        assert (first.size, first.checksum, first.checksum_algo) == (
            2**40,
            hashlib.sha256(b"x").hexdigest(),
            "sha256",
        )
        assert (first.state, first.target_phase, first.owner) == ("READY", "LIQUID", "bob")
        assert first.expires_at == datetime(2030, 1, 2, 1, 4, 5, 123456, tzinfo=UTC)
        assert first.meta == {"band": "ř", "n": [1, 2.5, None], "obs": {"site": "A", "night": 3}}
        assert (plain.state, plain.target_phase, plain.owner, plain.checksum) == (
            "INITIALISED",
            "GAS",
            "alice",
            None,
        )
        assert plain.meta == {"obs": {"site": "A"}} and plain.parents == [] and plain.item_type == "file"
        assert plain.expires_at is not None and plain.created_at is not None
        assert timedelta(days=2) <= plain.expires_at - before < timedelta(days=2, minutes=5)
        assert plain.created_at == first.created_at == first.updated_at
        odd = items["q\"uote's 😀"]
        assert (odd.size, odd.meta) == (2**63 - 1 - 2**40, {"obs": {"site": "A"}, "k": 'a "b" \\ \t'})
        replicas = {r.item_oid: r for r in s.exec(select(Replica)).scalars()}  # type: ignore[call-overload]
        assert replicas[odd.oid].path == "q\"uote's 😀"
        del replicas[odd.oid]
        assert replicas[first.oid].path == "raw/ré/x y.fits" and replicas[plain.oid].path == "plain"
        assert (replicas[first.oid].state, replicas[plain.oid].state) == ("READY", "PENDING")
        for r in replicas.values():
            assert r.expires_at is None and r.verified_at is None and r.claimed_by is None
            assert r.created_at == first.created_at
        events = s.exec(select(Event).order_by(Event.id)).scalars().all()[:2]  # type: ignore[call-overload]
        assert [(e.kind, e.item_oid, e.replica_uid, e.actor, e.details, e.ts) for e in events] == [
            ("item.ready", first.oid, replicas[first.oid].uid, "tester", {"bulk": True}, first.created_at),
            (
                "item.registered",
                plain.oid,
                replicas[plain.oid].uid,
                "tester",
                {"bulk": True},
                first.created_at,
            ),
        ]


def test_a_refusal_in_an_earlier_batch_is_named_before_a_later_bad_row(db_url: str, tmp_path: Path) -> None:
    """On PostgreSQL a batch is checked and written while the next one is read: a path already
    registered in batch 2 is still the error named (not the bad row of batch 3 read meanwhile),
    and nothing of the list is left in the catalogue."""
    import sys

    register(db_url, io.StringIO('{"name": "old", "path": "taken.dat", "size": 1}\n'))
    before = counts(db_url)
    interval = sys.getswitchinterval()
    lines = [json.dumps({"name": f"n{i}", "size": 1}) for i in range(1, 4)]
    lines.append(json.dumps({"name": "n4", "path": "taken.dat", "size": 1}))  # line 4: batch 2
    lines += [json.dumps({"name": f"n{i}", "size": 1}) for i in range(5, 9)]
    lines.append('{"name": "bad", "size": -1}')  # line 9: batch 5
    src = write_jsonl(tmp_path / "l.jsonl", [])
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        ConflictError,
        match=rf"^{src} line 4: path 'taken.dat' on storage 'disk' is already registered as old v1",
    ):
        register(db_url, src, batch_size=2)
    assert counts(db_url) == before
    # A bad row alone, with batches written before it, is named; nothing is left either.
    src.write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    with pytest.raises(InvalidValueError, match=rf"^{src} line 8: invalid size -1"):
        register(db_url, src, batch_size=2)
    assert counts(db_url) == before
    assert sys.getswitchinterval() == interval


def test_two_registrations_at_once_in_one_process(db_url: str, tmp_path: Path) -> None:
    """Two lists registered at the same time from two threads (as two reconcile tasks may):
    each is written whole, a path both lists hold goes to one item only (the later one is refused
    and leaves nothing), and the process's GIL switch interval is its own again afterwards."""
    import sys
    import threading

    interval = sys.getswitchinterval()
    register(db_url, io.StringIO(""))  # the storage
    lists = []
    for k in range(2):
        rows = [{"name": f"t{k}/f{i}", "size": 1} for i in range(3000)]
        lists.append(write_jsonl(tmp_path / f"l{k}.jsonl", rows))
    both = write_jsonl(tmp_path / "both.jsonl", [{"name": "x", "path": "shared.dat", "size": 1}])
    shared = write_jsonl(tmp_path / "shared.jsonl", [{"name": "y", "path": "shared.dat", "size": 1}])
    errors: list[BaseException] = []

    def run(src: Path) -> None:
        try:
            register(db_url, src, batch_size=500)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(src,)) for src in (*lists, both, shared)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the later one's check sees the path taken, or (PostgreSQL) its COPY meets the other's
    assert len(errors) == 1 and isinstance(errors[0], ConflictError)
    assert "'shared.dat'" in str(errors[0]) or "took some of the same paths at the same time" in str(
        errors[0]
    )
    assert counts(db_url)[:3] == (6001, 6001, 6001)
    with session_scope(db_url) as s:
        holders = s.exec(select(Item.name).join(Replica).where(Replica.path == "shared.dat")).all()  # type: ignore[call-overload]
        assert len(holders) == 1
    assert sys.getswitchinterval() == interval
