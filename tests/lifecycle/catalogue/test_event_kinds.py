"""Event kinds: one EventKind enum, enforced by the database (ck_event_kind, migration 0003) on
SQLite and PostgreSQL, an upgrade that keeps every event of an existing catalogue, and no code
that spells a kind as a bare string."""

from __future__ import annotations

import ast
import json
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy.exc import IntegrityError

from devrig.postgres import fresh_postgres_database, in_ci
from lifecycle import settings as settings_mod
from lifecycle.catalogue import audit
from lifecycle.catalogue.db import alembic_config, dispose_engines, get_engine, session_scope
from lifecycle.catalogue.models import Event, utcnow
from lifecycle.states import STORAGE_STATE_EVENTS, EventKind, StorageState


def head_revision() -> str:
    """The newest migration's revision: what `dlm init` upgrades to."""
    head = ScriptDirectory.from_config(alembic_config(get_engine("sqlite://"))).get_current_head()
    assert head is not None
    return head


ROOT = Path(__file__).resolve().parents[3]
EVENT = Event.__table__  # type: ignore[attr-defined]


def _events(url: str) -> list[dict[str, Any]]:
    with get_engine(url).connect() as conn:
        rows = conn.execute(sa.select(EVENT).order_by(EVENT.c.id)).mappings().all()
    return [dict(r) for r in rows]


def _insert_raw(url: str, kind: str, details: Any = None, item_oid: uuid.UUID | None = None) -> None:
    """An event row as any writer could insert it, past DLM's own helpers."""
    with get_engine(url).begin() as conn:
        conn.execute(
            sa.insert(EVENT),
            [
                {
                    "ts": utcnow(),
                    "kind": kind,
                    "actor": "someone",
                    "details": details or {},
                    "item_oid": item_oid,
                }
            ],
        )


# --------------------------------------------------------------------------- the upgrade


@pytest.fixture(params=["sqlite", "postgres"])
def old_catalogue(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """An empty catalogue at revision 0002 (before ck_event_kind); DLM_DATABASE_URL points at it."""
    with ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / 'old.db'}"
        else:
            try:
                url = stack.enter_context(fresh_postgres_database("dlm_kinds"))
            except RuntimeError as exc:
                if in_ci():
                    pytest.fail(f"PostgreSQL is required in CI but unavailable: {exc}", pytrace=False)
                pytest.skip(f"PostgreSQL unavailable: {exc}")
        command.upgrade(alembic_config(get_engine(url)), "0002")
        monkeypatch.setenv("DLM_DATABASE_URL", url)
        settings_mod.reset_settings()
        yield url
        dispose_engines()


def _partial_storage_index(url: str) -> str:
    with get_engine(url).connect() as conn:
        if conn.dialect.name == "sqlite":
            sql = "SELECT sql FROM sqlite_master WHERE name = 'ix_event_storage'"
        else:
            sql = "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_event_storage'"
        return str(conn.execute(sa.text(sql)).scalar_one())


def test_a_catalogue_of_revision_0002_upgrades_and_keeps_its_events(
    dlm,  # type: ignore[no-untyped-def]
    old_catalogue: str,
    tmp_path: Path,
) -> None:
    url = old_catalogue
    # an older DLM at work: storages, an upload, a phase and expiry change, a dataset, a drain
    for name in ("disk-a", "disk-b"):
        (tmp_path / name).mkdir()
        r = dlm("storage", "add", name, "--kind", "posix", "--root", str(tmp_path / name))
        assert r.code == 0, r.err
    src = tmp_path / "a.dat"
    src.write_bytes(b"a" * 1000)
    assert dlm("ingest", "-s", "disk-a", "--upload", str(src), "--name", "obs/a.dat").code == 0
    assert dlm("items", "set-phase", "obs/a.dat", "solid").code == 0
    assert dlm("items", "set-expiry", "obs/a.dat", "--at", "2030-01-01").code == 0
    assert dlm("datasets", "create", "obs", "--where", "size > 10").code == 0
    assert dlm("storage", "drain", "disk-b").code == 0
    oid = uuid.UUID(json.loads(dlm("items", "show", "obs/a.dat", "--json").out)["oid"])
    # rows of kinds no DLM ever wrote (a hand-made row, a development build): before 0003
    # nothing refused them
    _insert_raw(url, "item.archived", {"tape": "T1"}, item_oid=oid)
    _insert_raw(url, "custom", ["not", "an", "object"])
    before = _events(url)
    shown_before = json.loads(dlm("items", "show", "obs/a.dat", "--json").out)["events"]
    assert [e["kind"] for e in shown_before] == [
        "replica.created",
        "item.ready",
        "item.phase_changed",
        "item.expiry_changed",
        "item.archived",
    ]

    r = dlm("init")

    assert r.code == 0, r.err
    assert f"(schema {head_revision()})" in r.out
    after = _events(url)
    assert [e["id"] for e in after] == [e["id"] for e in before]  # every event is still there
    known = {k.value for k in EventKind}
    for old, new in zip(before, after, strict=True):
        if old["kind"] in known:
            assert new == old  # written by DLM: untouched
        else:
            assert new["kind"] == "legacy.unknown"
            assert {k: new[k] for k in ("ts", "actor", "item_oid")} == {
                k: old[k] for k in ("ts", "actor", "item_oid")
            }
    legacy = {e["details"]["legacy_kind"]: e["details"] for e in after if e["kind"] == "legacy.unknown"}
    assert legacy == {
        "item.archived": {"tape": "T1", "legacy_kind": "item.archived"},
        "custom": {"legacy_kind": "custom", "details": ["not", "an", "object"]},
    }
    assert [e["kind"] for e in before if e["kind"] in known][:4] == [
        "storage.added",
        "storage.added",
        "replica.created",
        "item.ready",
    ]
    # the user sees the same events, under the same kind strings, in JSON and in the table
    shown = json.loads(dlm("items", "show", "obs/a.dat", "--json").out)["events"]
    assert [(e["kind"], e["ts"], e["details"]) for e in shown[:4]] == [
        (e["kind"], e["ts"], e["details"]) for e in shown_before[:4]
    ]
    assert shown[4]["kind"] == "legacy.unknown" and shown[4]["details"]["tape"] == "T1"
    table = dlm("items", "show", "obs/a.dat").out
    for kind in ("replica.created", "item.ready", "item.phase_changed", "item.expiry_changed"):
        assert kind in table
    # the database now refuses what it took before, and the upgrade kept the partial index
    with pytest.raises(IntegrityError):
        _insert_raw(url, "item.archived")
    assert len(_events(url)) == len(after)
    assert "item_oid IS NULL" in _partial_storage_index(url)
    # and DLM keeps writing the same kind strings
    assert dlm("storage", "online", "disk-b").code == 0
    assert _events(url)[-1]["kind"] == "storage.online"


# --------------------------------------------------------------------------- the constraint


def test_the_database_refuses_an_event_of_unknown_kind(db_url: str) -> None:
    for kind in ("item.bogus", "ITEM.READY", "item.ready ", "storage.", ""):
        with pytest.raises(IntegrityError, match="ck_event_kind"):
            _insert_raw(db_url, kind)
    # DLM's own helper refuses it before the database is asked
    with pytest.raises(ValueError, match=r"item\.bogus"), session_scope() as s:
        audit.record_many(s, [{"kind": "item.bogus"}])  # type: ignore[typeddict-item]
    assert _events(db_url) == []


def test_the_database_accepts_every_event_kind(db_url: str) -> None:
    seen: list[dict[str, Any]] = []
    audit.add_publisher(seen.extend)
    try:
        with session_scope() as s:
            audit.record_many(s, [{"kind": k, "details": {"n": i}} for i, k in enumerate(EventKind)])
    finally:
        audit.remove_publisher(seen.extend)
    stored = _events(db_url)
    assert [e["kind"] for e in stored] == [k.value for k in EventKind]
    assert all(type(e["kind"]) is str for e in stored)
    # publishers (Prefect events `dlm.<kind>`) get the published kinds as plain strings
    assert [e["kind"] for e in seen] == [k.value for k in EventKind if k in audit.PUBLISHED_KINDS]
    assert all(type(e["kind"]) is str for e in seen)


def test_every_storage_state_has_its_event() -> None:
    assert set(STORAGE_STATE_EVENTS) == set(StorageState)
    # the strings an older DLM wrote as f"storage.{state}"
    assert {s.value: k.value for s, k in STORAGE_STATE_EVENTS.items()} == {
        s.value: f"storage.{s.value}" for s in StorageState
    }


def test_the_migration_and_the_model_admit_the_same_kinds() -> None:
    """A kind added to EventKind without a migration that widens ck_event_kind would be refused
    by every upgraded catalogue."""
    # the newest migration that lists the kinds (0003 first froze them; 0005 widened them)
    path = ROOT / "lifecycle/catalogue/migrations/versions/0005_api_changes.py"
    tree = ast.parse(path.read_text())
    [kinds] = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["KINDS"]
    ]
    assert ast.literal_eval(kinds) == tuple(k.value for k in EventKind)
    [check] = [c for c in EVENT.constraints if c.name == "ck_event_kind"]
    assert str(check.sqltext) == "kind IN ({})".format(", ".join(f"'{k.value}'" for k in EventKind))


# --------------------------------------------------------------------------- no bare strings

KIND_VALUES = {k.value for k in EventKind}
KIND_PREFIXES = {k.value.split(".")[0] + "." for k in EventKind}
SCANNED = ("lifecycle", "tasks", "flows", "dlm", "deployments")
# where the kinds are defined, and the migration that freezes them
EXEMPT = ("lifecycle/states.py", "lifecycle/catalogue/migrations/")
# calls that take an event kind: name -> position of the kind argument
KIND_ARGUMENT = {"record": 1, "ReplicaChange": 2, "_event": 0}


def _is_string(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def bare_event_kinds(source: str) -> list[str]:
    """Where `source` spells an event kind as a string instead of an EventKind member."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and node.value in KIND_VALUES:
            found.append(f"line {line}: {node.value!r}")
        elif isinstance(node, ast.JoinedStr):
            head = node.values[0] if node.values else None
            if isinstance(head, ast.Constant) and head.value in KIND_PREFIXES:
                found.append(f"line {line}: f-string {head.value!r}...")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                is_kind = isinstance(key, ast.Constant) and key.value == "kind"
                if is_kind and _is_string(value) and "." in str(getattr(value, "value", ".")):
                    found.append(f"line {line}: event dict with a string kind")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name not in KIND_ARGUMENT:
                continue
            pos = KIND_ARGUMENT[name]
            args = [a for a in node.args[pos : pos + 1]] + [k.value for k in node.keywords if k.arg == "kind"]
            if any(_is_string(a) for a in args):
                found.append(f"line {line}: {name}() with a string kind")
    return found


def test_the_scanner_finds_bare_kinds() -> None:
    """The check below can fail: each way of spelling a kind as a string is found."""
    bad = [
        'audit.record(session, "item.ready", item_oid=oid)',
        'audit.record(session, kind=f"storage.{state.value}")',
        'audit.record(session, some_prefix + "x")',  # not a string literal: mypy's job
        'audit.record_many(s, [{"kind": "item.made_up", "item_oid": oid}])',
        'ReplicaChange(c, ReplicaState.LOST, "replica.gone", details)',
        'events.append(_event("replica.restored", r, sid, actor, {}))',
        'state, kind = "READY", "item.ready"',
        'name = f"replica.{what}"',
    ]
    assert [bool(bare_event_kinds(src)) for src in bad] == [True, True, False, True, True, True, True, True]
    good = [
        "audit.record(session, EventKind.ITEM_READY, item_oid=oid)",
        'audit.record(session, STORAGE_STATE_EVENTS[state], details={"to": "draining"})',
        'json.dumps({"instrument": "cam1", "kind": "raw"})',
        '{"kind": TransferKind.COPY.value, "state": "RUNNING"}',
        'emit_event(event=f"dlm.{e[\'kind\']}", resource={"prefect.resource.id": "dlm.catalogue"})',
        'col(Event.kind).startswith("storage.")',
        '"""Repaired copies get `replica.repaired` events."""',
    ]
    assert [bare_event_kinds(src) for src in good] == [[]] * len(good)


def test_no_code_spells_an_event_kind_as_a_string() -> None:
    found = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(EXEMPT):
                continue
            found += [f"{rel} {where}" for where in bare_event_kinds(path.read_text())]
    assert found == [], "use lifecycle.states.EventKind:\n" + "\n".join(found)
