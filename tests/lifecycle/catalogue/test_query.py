"""The --where filter language: every field and operator on SQLite and PostgreSQL, and its errors."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlmodel import col

from lifecycle.catalogue.db import get_engine, session_scope
from lifecycle.catalogue.models import Item, Replica, Storage
from lifecycle.catalogue.query import (
    FIELDS,
    And,
    Compare,
    Day,
    Expr,
    Not,
    Or,
    RelativeTime,
)
from lifecycle.catalogue.query_parse import parse
from lifecycle.catalogue.query_sql import compile_filter
from lifecycle.errors import InvalidFilterError
from lifecycle.states import ItemState, ItemType, Phase, ReplicaState, StorageKind

NOW = datetime(2026, 2, 15, tzinfo=UTC)

A = "raw/a_1.fits"
B = "raw/a%1.fits"
C = "raw/ab1.fits"
D = "Proc/b.h5"
E = "proc/c.h5"
F = 'odd\\it\'s "q"*.txt'
ALL = {A, B, C, D, E, F}

OIDS = {name: uuid.uuid5(uuid.NAMESPACE_URL, name) for name in ALL}


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# name -> item fields, and the (storage, replica state) of its copies
ITEMS: dict[str, dict[str, Any]] = {
    A: dict(
        size=100,
        state=ItemState.READY,
        target_phase=Phase.GAS,
        owner="alice",
        checksum="abc123",
        meta={"band": "L", "n": 5, "obs": {"band": "X", "night": 3}},
        created_at=ts("2026-01-10T10:00:00"),
        expires_at=ts("2026-03-01T00:00:00"),
    ),
    B: dict(
        size=2048,
        state=ItemState.READY,
        target_phase=Phase.LIQUID,
        owner="bob",
        meta={"band": "S", "n": 12.5, "flag": True},
        created_at=ts("2026-01-20T08:00:00"),
    ),
    C: dict(
        size=10 * 1024**2,
        state=ItemState.INITIALISED,
        target_phase=Phase.SOLID,
        owner=None,
        meta={"n": "5", "band": "l", "flag": False},
        created_at=ts("2025-12-31T23:59:59"),
    ),
    D: dict(
        version=2,
        size=1024**3,
        state=ItemState.DELETED,
        target_phase=Phase.PLASMA,
        owner="alice",
        meta={"n": None, "obs": {"band": "L"}},
        created_at=ts("2026-01-31T12:00:00"),
        expires_at=ts("2026-01-31T12:00:00"),
    ),
    E: dict(
        size=0,
        state=ItemState.CORRUPTED,
        target_phase=Phase.GAS,
        owner="carol",
        checksum="def456",
        item_type=ItemType.CONTAINER,
        meta={},
        created_at=ts("2026-02-01T00:00:00"),
    ),
    F: dict(
        size=1500,
        state=ItemState.EXPIRED,
        target_phase=Phase.LIQUID,
        owner="Alice",
        meta={"band": "*", "n": 1000, "list": [5], "x-y": "dash", "0": "zero"},
        created_at=ts("2026-03-01T00:00:00"),
    ),
}
REPLICAS: dict[str, list[tuple[str, ReplicaState]]] = {
    A: [("s3-east", ReplicaState.READY), ("posix-a", ReplicaState.READY)],
    B: [("posix-a", ReplicaState.DELETED), ("tape", ReplicaState.READY)],
    D: [("s3-east", ReplicaState.LOST), ("s3-west", ReplicaState.PENDING)],
}
STORAGES = {
    "s3-east": (StorageKind.S3, "bucket/east"),
    "s3-west": (StorageKind.S3, "bucket/west"),
    "posix-a": (StorageKind.POSIX, "/data/a"),
    "tape": (StorageKind.RCLONE, "tape:archive"),
}


def populate(url: str) -> None:
    with session_scope(url) as session:
        storages = {name: Storage(name=name, kind=kind, root=root) for name, (kind, root) in STORAGES.items()}
        session.add_all(storages.values())
        session.flush()
        for name, fields in ITEMS.items():
            session.add(Item(oid=OIDS[name], name=name, **fields))
        session.flush()
        for name, copies in REPLICAS.items():
            for storage, state in copies:
                session.add(
                    Replica(item_oid=OIDS[name], storage_id=storages[storage].id, path=name, state=state)
                )


@pytest.fixture
def catalogue(db_url: str) -> Iterator[str]:
    populate(db_url)
    yield db_url
    # conftest's SQLite teardown clears the engine cache without disposing the PostgreSQL
    # engine; close its pooled connections now so they are not left to the garbage collector.
    get_engine(db_url).dispose()


def names(url: str, where: str, now: datetime | None = NOW) -> set[str]:
    with session_scope(url) as session:
        rows = session.execute(sa.select(col(Item.name)).where(compile_filter(where, now=now)))
        return set(rows.scalars())


# --------------------------------------------------------------------------- results


CASES: list[tuple[str, set[str]]] = [
    # name: equality, bytewise ordering, quoting
    (f"name = '{A}'", {A}),
    (f'name = "{A}"', {A}),
    (f"name != '{A}'", ALL - {A}),
    ("name < 'a'", {D}),
    ("name < 'r'", {D, E, F}),
    ("name >= 'raw/ab'", {C}),
    ("name <= 'Proc/b.h5'", {D}),
    ("name > 'Z'", ALL - {D}),
    ("name = 'odd\\\\it\\'s \"q\"*.txt'", {F}),
    ('name = "odd\\\\it\'s \\"q\\"*.txt"', {F}),
    ("name in ('raw/ab1.fits', proc/c.h5)", {C, E}),
    ("name not in ('raw/ab1.fits', proc/c.h5)", ALL - {C, E}),
    # glob: case-sensitive, SQL wildcards and brackets are literal
    ("name ~ 'raw/*'", {A, B, C}),
    ("name ~ raw/*", {A, B, C}),
    ("name ~ 'raw/a_1*'", {A}),
    ("name ~ 'raw/a%1*'", {B}),
    ("name ~ 'raw/a?1.fits'", {A, B, C}),
    ("name ~ 'proc/*'", {E}),
    ("name ~ '*.H5'", set()),
    ("name ~ '*\\*.txt'", {F}),
    ("name ~ '*\\\\\\\\*'", {F}),  # a literal backslash: \\ in the text, \ in the glob
    ("name ~ 'raw/[a]*'", set()),
    ("name ~ '*'", ALL),
    # version, size
    ("version = 2", {D}),
    ("version > 1", {D}),
    ("version in (1, 3)", ALL - {D}),
    ("size = 2048", {B}),
    ("size = 2KiB", {B}),
    ("size > 1MiB", {C, D}),
    ("size >= 2KiB", {B, C, D}),
    ("size < 1.5KB", {A, E}),
    ("size <= 1.5KB", {A, E, F}),
    ("size <= '1.5 KB'", {A, E, F}),
    ("size > 1GB", {D}),
    ("size != 0", ALL - {E}),
    ("size in (0, 100)", {A, E}),
    # state, phase, type: case-insensitive values
    ("state = READY", {A, B}),
    ("state = 'ready'", {A, B}),
    ("state != ready", ALL - {A, B}),
    ("state in (deleted, Corrupted)", {D, E}),
    ("state ~ '*ED'", {C, D, E, F}),
    ("state ~ 're*'", {A, B}),
    ("phase = gas", {A, E}),
    ("phase >= LIQUID", {B, C, F}),
    ("phase > liquid", {C}),
    ("phase <= gas", {A, D, E}),
    ("phase < gas", {D}),
    ("phase < plasma", set()),
    ("phase != solid", ALL - {C}),
    ("type = container", {E}),
    ("type = FILE", ALL - {E}),
    # owner, checksum: nullable text
    ("owner = alice", {A, D}),
    ("owner = 'Alice'", {F}),
    ("owner != alice", {B, C, E, F}),
    ("owner = null", {C}),
    ("owner = NULL", {C}),
    ("owner != null", ALL - {C}),
    ("owner ~ 'a*'", {A, D}),
    ("not owner ~ 'a*'", {B, C, E, F}),
    ("owner < 'b'", {A, D, F}),
    ("owner in (bob, carol)", {B, E}),
    ("owner in (bob, null)", {B, C}),
    ("checksum = null", ALL - {A, E}),
    ("checksum ~ 'abc*'", {A}),
    ("checksum > 'b'", {E}),
    # dates: a bare date is the whole UTC day
    ("created < 2026-01-01", {C}),
    ("created = 2026-01-20", {B}),
    ("created = '2026-01-20'", {B}),
    ("created = 2025-12-31", {C}),
    ("created <= 2025-12-31", {C}),
    ("created > 2026-01-31", {E, F}),
    ("created >= 2026-01-31", {D, E, F}),
    ("created != 2026-01-31", ALL - {D}),
    ("created = '2026-01-31T12:00:00Z'", {D}),
    ("created = 2026-01-31T12:00:00Z", {D}),
    ("created = 2026-01-31T13:00:00+01:00", {D}),
    ("created = '2026-01-31 12:00'", {D}),
    ("created > 2026-01-31T12:00:00Z", {E, F}),
    ("created > -30d", {B, D, E, F}),
    ("created < -30d", {A, C}),
    ("created < -4w", {A, C}),
    ("created > now", {F}),
    ("created < +30d", ALL),
    ("expires = null", {B, C, E, F}),
    ("expires != null", {A, D}),
    ("expires < 2026-02-01", {D}),
    ("expires > 2026-02-01", {A}),
    ("not expires < 2026-02-01", ALL - {D}),
    ("expires < +30d", {A, D}),
    ("expires > now", {A}),
    # storage: a live copy (not DELETED or LOST) on a named storage
    ("storage = s3-east", {A}),
    ("storage = 'posix-a'", {A}),
    ("storage = tape", {B}),
    ("storage = s3-west", {D}),
    ("storage ~ 's3-*'", {A, D}),
    ("storage != s3-east", ALL - {A}),
    ("storage = null", {C, E, F}),
    ("storage != null", {A, B, D}),
    ("storage in (tape, s3-west)", {B, D}),
    ("storage not in (tape, s3-west)", {A, C, E, F}),
    ("storage = nowhere", set()),
    # meta: numbers match only numbers, text only strings
    ("meta.n = 5", {A}),
    ("meta.n = 5.0", {A}),
    ("meta.n = '5'", {C}),
    ('meta.n = "5"', {C}),
    ("meta.n > 6", {B, F}),
    ("meta.n >= 12.5", {B, F}),
    ("meta.n < 1e3", {A, B}),
    ("meta.n <= -1", set()),
    ("meta.n != 5", ALL - {A}),
    ("meta.n = null", {D, E}),
    ("meta.n != null", {A, B, C, F}),
    ("meta.n < 'a'", {C}),
    ("meta.n in (5, '5')", {A, C}),
    ("meta.band = L", {A}),
    ("meta.band = 'l'", {C}),
    ("meta.band < 'M'", {A, F}),
    ("meta.band ~ '*'", {A, B, C, F}),
    ("meta.band ~ '\\*'", {F}),
    ("meta.band in (L, S)", {A, B}),
    ("meta.obs.band = L", {D}),
    ("meta.obs.band ~ '?'", {A, D}),
    ("meta.obs.night >= 3", {A}),
    ("meta.obs = 'X'", set()),
    ("meta.obs != null", {A, D}),
    ("meta.flag = true", {B}),
    ("meta.flag = FALSE", {C}),
    ("meta.flag != true", ALL - {B}),
    ("meta.list.0 = 5", set()),
    ("meta.0 = zero", {F}),
    ("meta.x-y = dash", {F}),
    ("meta.nothing = null", ALL),
    ("meta.nothing.deeper = 1", set()),
    # logic: not > and > or, parentheses, case-insensitive keywords
    ("owner = alice or owner = bob and size > 1000", {A, B, D}),
    ("(owner = alice or owner = bob) and size > 1000", {B, D}),
    ("not owner = alice and size > 1000", {B, C, F}),
    ("not (owner = alice and size > 1000)", ALL - {D}),
    ("not not owner = alice", {A, D}),
    ("state = ready AND owner = bob OR name ~ 'proc*'", {B, E}),
    ("((size > 0)) and (not (storage = null) or meta.flag = false)", {A, B, C, D}),
    ("NOT size > 0 Or size > 1GB", {D, E}),
]


@pytest.mark.parametrize(("where", "expected"), CASES, ids=[c[0] for c in CASES])
def test_filter_selects(catalogue: str, where: str, expected: set[str]) -> None:
    assert names(catalogue, where) == expected


def test_oid_accepts_both_spellings(catalogue: str) -> None:
    a, b = OIDS[A], OIDS[B]
    assert names(catalogue, f"oid = '{a}'") == {A}
    assert names(catalogue, f"oid = {a.hex}") == {A}
    assert names(catalogue, f"oid in ({a}, {b})") == {A, B}
    assert names(catalogue, f"oid != {a}") == ALL - {A}


def test_ages_count_from_the_current_time_by_default(catalogue: str) -> None:
    assert names(catalogue, "updated > -1h", now=None) == ALL
    assert names(catalogue, "updated < -1h", now=None) == set()


def test_filter_composes_with_other_conditions(catalogue: str) -> None:
    with session_scope(catalogue) as session:
        query = (
            sa.select(sa.func.count())
            .select_from(Item)
            .where(compile_filter("storage ~ 's3*'"), col(Item.size) > 1000)
        )
        assert session.execute(query).scalar_one() == 1


def test_same_filter_twice_in_one_query_uses_its_own_parameters(catalogue: str) -> None:
    # Cached compiled statements must not leak one filter's values into another's.
    assert names(catalogue, "meta.band = L or meta.obs.band = X") == {A}
    assert names(catalogue, "meta.band = S or meta.obs.band = L") == {B, D}


# --------------------------------------------------------------------------- the AST


def test_parse_builds_a_typed_ast() -> None:
    assert parse("owner = alice or not size > 1KiB and created < -30d") == Or(
        (
            Compare("owner", "=", "alice", 0),
            And(
                (
                    Not(Compare("size", ">", 1024, 21)),
                    Compare("created", "<", RelativeTime(timedelta(days=-30)), 37),
                )
            ),
        )
    )
    assert parse("state in (ready, 'deleted')") == Or(
        (Compare("state", "=", "READY", 0), Compare("state", "=", "DELETED", 0))
    )
    assert parse("Name = x") == Compare("name", "=", "x", 0)
    assert parse("expires = 2026-01-31") == Compare("expires", "=", Day(ts("2026-01-31T00:00").date()), 0)
    assert parse("created >= 2026-01-31T12:00:00+01:00") == Compare(
        "created", ">=", ts("2026-01-31T11:00:00"), 0
    )
    assert parse("meta.Obs.Band = 1.5") == Compare("meta.Obs.Band", "=", 1.5, 0)
    assert parse("expires = null") == Compare("expires", "=", None, 0)


def test_fields_describe_every_field() -> None:
    assert set(FIELDS) == {
        "name",
        "version",
        "size",
        "state",
        "phase",
        "type",
        "owner",
        "checksum",
        "oid",
        "created",
        "updated",
        "expires",
        "storage",
        "meta.KEY",
    }


# --------------------------------------------------------------------------- errors


ERRORS: list[tuple[str, str]] = [
    ("nmae = 'x'", "at position 1: unknown field 'nmae' (did you mean 'name'? fields: name, version, size"),
    ("name = 'x' and sise > 1", "at position 16: unknown field 'sise' (did you mean 'size'?"),
    ("1 = 1", "at position 1: unknown field '1'"),
    ("meta = 1", "at position 1: bad metadata key '' in 'meta'"),
    ("meta.a..b = 1", "at position 1: bad metadata key 'a..b'"),
    ("meta.a$ = 1", "at position 7: unexpected character '$'"),
    ("size = 'big'", "at position 8: 'size' needs a whole number of bytes or a size such as 10GiB"),
    ("size > 1.5", "at position 8: 'size' needs a whole number of bytes"),
    ("size > 10XB", "at position 8: invalid size '10XB'"),
    ("size ~ '1*'", "at position 6: '~' (glob) works only on text fields (name, state, phase, type, owner"),
    ("created ~ '2026*'", "at position 9: '~' (glob) works only on text fields"),
    ("version = 1.5", "at position 11: 'version' needs a whole number, got '1.5'"),
    ("version = 99999999999", "at position 11: number '99999999999' is out of range"),
    ("size > 99999999999999999999", "at position 8: number '99999999999999999999' is out of range"),
    ("meta.n > 1e999", "at position 10: number '1e999' is out of range"),
    ("created = yesterday", "at position 11: 'created' needs a date (2026-01-31)"),
    ("created = 2026-02-30", "at position 11: invalid date '2026-02-30'"),
    ("created > 30d", "at position 11: 'created' needs a date"),
    ("created > -0d", "at position 11: invalid lifetime '0d'"),
    ("state = redy", "at position 9: unknown state 'redy' (states: INITIALISED, READY, EXPIRED"),
    ("phase = warm", "at position 9: unknown phase 'warm' (phases: PLASMA, GAS, LIQUID, SOLID)"),
    ("type = dir", "at position 8: unknown type 'dir' (types: file, container)"),
    ("state < READY", "at position 7: '<' does not apply to 'state': use =, !=, ~ or in"),
    ("storage > a", "at position 9: '>' does not apply to 'storage'"),
    ("oid = 12", "at position 7: 'oid' needs a UUID, got '12'"),
    ("oid >= 12", "at position 5: '>=' does not apply to 'oid': use =, != or in"),
    ("name <> 'x'", "at position 6: unknown operator '<>' (operators: = != < <= > >= ~ in)"),
    ("name !~ 'x'", "at position 6: unknown operator '!~'"),
    ("name like 'x'", "at position 6: expected an operator (= != < <= > >= ~ in) after 'name', found 'like'"),
    ("name", "at position 5: expected an operator (= != < <= > >= ~ in) after 'name', found the end"),
    ("name = ", "at position 8: expected a value after '=', found the end of the filter"),
    ("name = and", "at position 8: expected a value after '=', found 'and'"),
    ("name = null", "at position 8: 'name' is never null"),
    ("size > null", "at position 8: null works only with = and != (or in), not '>'"),
    ("owner ~ null", "at position 9: null works only with = and != (or in), not '~'"),
    ("owner = true", "at position 9: 'owner' takes no true/false; quote it for the text 'true'"),
    ("meta.f > true", "at position 10: true/false work only with = and != (or in), not '>'"),
    ("(name = 'x'", "at position 12: expected ')' to close '(' at position 1, found the end of the filter"),
    ("(name = 'x' or (size > 1)", "at position 26: expected ')' to close '(' at position 1"),
    ("name = 'x')", "at position 11: unbalanced ')': no '(' to close"),
    ("name = 'x' name = 'y'", "at position 12: unexpected 'name' after a complete condition"),
    (
        "name = 'x' and",
        "at position 15: expected a condition such as name = 'x', found the end of the filter",
    ),
    ("and name = 'x'", "at position 1: expected a condition such as name = 'x', found 'and'"),
    ("()", "at position 2: expected a condition such as name = 'x', found ')'"),
    ("", "at position 1: empty filter"),
    ("   ", "at position 1: empty filter"),
    ("name = 'x", "at position 8: unterminated text: no closing '"),
    ('name = "x\\"', 'at position 8: unterminated text: no closing "'),
    ("name in ()", "at position 10: empty list after 'in'"),
    ("name in x", "at position 9: expected '(' after 'in', found 'x'"),
    ("name in (a b)", "at position 12: expected ',' or ')' in the list opened at position 9, found 'b'"),
    ("name not = x", "at position 6: expected an operator"),
    ("name = 'x' && size > 1", "at position 12: unexpected character '&' (use 'and')"),
    ("name = 'x' || size > 1", "at position 12: unexpected character '|' (use 'or')"),
    ("name = 'x\x00'", "at position 10: invalid character '\\x00'"),
    ("name='x' or 1=1; drop table item", "at position 16: unexpected character ';' (a filter is one"),
    ("x" * 4097, "at position 4097: filter is longer than 4096 characters"),
    ("(" * 51 + "name = x" + ")" * 51, "at position 51: nested deeper than 50 levels"),
    ("not " * 51 + "name = x", "at position 201: nested deeper than 50 levels"),
]


@pytest.mark.parametrize(("where", "message"), ERRORS, ids=[e[0][:40] for e in ERRORS])
def test_bad_filter_says_what_and_where(where: str, message: str) -> None:
    with pytest.raises(InvalidFilterError) as info:
        compile_filter(where)
    text = str(info.value)
    assert text.startswith("invalid filter " + message), text
    assert "\n" not in text


def test_deep_but_allowed_nesting_parses() -> None:
    assert parse("(" * 50 + "name = x" + ")" * 50) == Compare("name", "=", "x", 50)
    assert parse("not " * 50 + "name = x") is not None


def test_injection_is_an_error_and_changes_nothing(catalogue: str) -> None:
    for attack in (
        "name='x' or 1=1; drop table item",
        "name = 'x'; drop table item",
        "name = 'x'' or ''1''=''1'",
        "name = x' or '1'='1",
    ):
        with pytest.raises(InvalidFilterError):
            compile_filter(attack)
    # Inside quotes it is only text: it matches nothing and runs nothing.
    assert names(catalogue, "name = 'x\\' or 1=1; drop table item; --'") == set()
    assert names(catalogue, 'name ~ "*\'; drop table item; --"') == set()
    with session_scope(catalogue) as session:
        assert session.execute(sa.select(sa.func.count()).select_from(Item)).scalar_one() == len(ALL)


# --------------------------------------------------------------------------- properties


FILTER_CHARS = "namesizteowrpdgvx.<>=!~()'\"\\*?%_,-:0123456789 GiBT;"


@given(st.text(alphabet=FILTER_CHARS, max_size=60))
@settings(max_examples=500, deadline=None)
def test_random_text_parses_or_fails_cleanly(text: str) -> None:
    try:
        compile_filter(text)
    except InvalidFilterError as exc:
        assert str(exc).startswith("invalid filter at position ")
        assert "\n" not in str(exc)


def _glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


_MISSING = object()


def _ordered(left: Any, op: str, right: Any) -> bool:
    return bool(
        {
            "=": left == right,
            "<": left < right,
            "<=": left <= right,
            ">": left > right,
            ">=": left >= right,
        }[op]
    )


def reference(expr: Expr, name: str) -> bool:
    """What a filter means, evaluated in Python on the test catalogue."""
    if isinstance(expr, Not):
        return not reference(expr.operand, name)
    if isinstance(expr, And):
        return all(reference(e, name) for e in expr.operands)
    if isinstance(expr, Or):
        return any(reference(e, name) for e in expr.operands)
    field, op, value = expr.field, expr.op, expr.value
    if op == "!=":
        return not reference(Compare(field, "=", value, expr.pos), name)
    row = ITEMS[name]
    if field == "storage":
        live = {s for s, state in REPLICAS.get(name, []) if state not in ("DELETED", "LOST")}
        if value is None:
            return not live
        if op == "~":
            return any(_glob_regex(str(value)).fullmatch(s) for s in live)
        return value in live
    if field.startswith("meta."):
        x: Any = row["meta"]
        for key in field.split(".")[1:]:
            x = x.get(key, _MISSING) if isinstance(x, dict) else _MISSING
        if value is None:
            return x is _MISSING or x is None
        if isinstance(value, bool):
            return x is value
        if isinstance(value, int | float):
            return isinstance(x, int | float) and not isinstance(x, bool) and _ordered(x, op, value)
        if not isinstance(x, str):
            return False
    else:
        column = {"phase": "target_phase", "type": "item_type"}.get(field, field)
        x = name if field == "name" else row.get(column, 1 if field == "version" else None)
        if value is None:
            return x is None
        if x is None:
            return False
    if op == "~":
        return _glob_regex(str(value)).fullmatch(x) is not None
    return _ordered(x, op, value)


def _leaf() -> st.SearchStrategy[str]:
    ordering = st.sampled_from(["=", "!=", "<", "<=", ">", ">="])
    texts = st.sampled_from(["'alice'", "'Alice'", "bob", "'raw/a_1.fits'", "'a'", "'s'", "''", "'L'"])
    globs = st.sampled_from(["'*'", "'raw/a_*'", "'*%*'", "'a*'", "'?'", "'*\\*.txt'", "'[a]*'", "'*.h5'"])
    equality = st.sampled_from(["=", "!="])
    return st.one_of(
        st.tuples(st.just("name"), ordering, texts),
        st.tuples(st.just("name"), st.just("~"), globs),
        st.tuples(st.just("owner"), st.sampled_from(["=", "!=", "<", ">=", "~"]), texts),
        st.tuples(st.just("owner"), equality, st.just("null")),
        st.tuples(st.just("size"), ordering, st.sampled_from(["0", "100", "1.5KB", "2KiB", "1GiB"])),
        st.tuples(st.just("version"), ordering, st.sampled_from(["1", "2"])),
        st.tuples(st.just("state"), equality, st.sampled_from(["ready", "DELETED"])),
        st.tuples(st.just("phase"), equality, st.sampled_from(["gas", "Solid"])),
        st.tuples(st.just("storage"), equality, st.sampled_from(["s3-east", "tape", "null", "posix-a"])),
        st.tuples(st.just("storage"), st.just("~"), globs),
        st.tuples(st.sampled_from(["meta.n", "meta.band", "meta.obs.band", "meta.flag"]), ordering, texts),
        st.tuples(
            st.sampled_from(["meta.n", "meta.obs.night"]), ordering, st.sampled_from(["5", "6", "12.5"])
        ),
        st.tuples(st.sampled_from(["meta.n", "meta.flag"]), equality, st.sampled_from(["null", "true"])),
        st.tuples(st.sampled_from(["meta.band", "meta.n"]), st.just("~"), globs),
    ).map(" ".join)


def _grow(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    joined = st.tuples(children, st.sampled_from([" and ", " or ", " AND ", " Or "]), children)
    return st.one_of(children.map("not {}".format), children.map("({})".format), joined.map("".join))


def _filters() -> st.SearchStrategy[str]:
    return st.recursive(_leaf(), _grow, max_leaves=8)


def test_sql_agrees_with_a_python_reference(catalogue: str) -> None:
    @given(_filters())
    @settings(max_examples=150, deadline=None)
    def check(where: str) -> None:
        expected = {name for name in ALL if reference(parse(where), name)}
        assert names(catalogue, where) == expected, where

    check()


# --------------------------------------------------------------------------- the metadata index


def test_a_whole_number_matches_a_stored_decimal_of_the_same_value(db_url: str) -> None:
    """`meta.KEY = 5` also asks PostgreSQL for `meta @> {"KEY": 5}` (for the index): JSON's
    5.0 must still match, as it does without the index."""
    with session_scope(db_url) as s:
        s.add(Item(name="dec", size=1, meta={"m": 5.0, "t": "é'\"x", "b": False, "o": {"k": 7}}))
        s.add(Item(name="int", size=1, meta={"m": 5, "o": {"k": [7]}}))
    assert names(db_url, "meta.m = 5") == {"dec", "int"}
    assert names(db_url, "meta.t = 'é\\'\"x'") == {"dec"}
    assert names(db_url, "meta.b = false") == {"dec"}
    assert names(db_url, "meta.o.k = 7") == {"dec"}
    assert names(db_url, "not meta.o.k = 7") == {"int"}


def test_a_metadata_equality_is_answered_by_the_index_on_postgresql(pg_db_url: str) -> None:
    with session_scope(pg_db_url) as s:
        s.add_all(Item(name=f"i{i:05d}", size=1, meta={"field": f"f{i % 500:03d}"}) for i in range(5000))
    engine = get_engine(pg_db_url)
    with engine.begin() as conn:
        conn.execute(sa.text("ANALYZE item"))
    stmt = sa.select(Item).where(compile_filter("meta.field = 'f042'")).order_by(col(Item.name)).limit(101)
    sql = str(stmt.compile(engine, compile_kwargs={"literal_binds": True}))
    with engine.connect() as conn:
        plan = "\n".join(conn.execute(sa.text("EXPLAIN " + sql)).scalars().all())
    assert "ix_item_meta" in plan, plan
    assert names(pg_db_url, "meta.field = 'f042'") == {f"i{i:05d}" for i in range(42, 5000, 500)}


@pytest.mark.parametrize(("probe_rows", "sample_from"), [(5, 10**9), (10_000, 10**9), (5, 0), (10_000, 0)])
def test_pages_of_a_metadata_filter_are_the_same_whichever_plan(
    pg_db_url: str, probe_rows: int, sample_from: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Few matches: the page comes from the GIN index; many (past the cap, or so estimated by
    the sample): in name order. Either way every matching item of the owner comes once, in
    (name, version) order."""
    from lifecycle.catalogue import access

    monkeypatch.setattr(access, "INDEX_ROWS", probe_rows)
    monkeypatch.setattr(access, "SAMPLE_FROM_ROWS", sample_from)
    with session_scope(pg_db_url) as s:
        s.add_all(
            Item(
                name=f"p/{i % 40:02d}",
                version=1 + i // 40,
                size=1,
                owner="alice" if i % 4 else "bob",
                meta={"k": "v" if i % 3 == 0 else "w", "n": i % 2},
            )
            for i in range(240)
        )
    with get_engine(pg_db_url).begin() as conn:
        conn.execute(sa.text("ANALYZE item"))  # the sample needs the table's row count
    seen: list[tuple[str, int]] = []
    after = None
    while True:
        with session_scope(pg_db_url) as s:
            page = access.items_page(
                session=s, owner="alice", where="meta.k = 'v' and meta.n = 0", after=after, limit=7
            )
        seen += [(i.name, i.version) for i in page.items]
        if page.last is None:
            break
        after = page.last
    expected = sorted(
        (f"p/{i % 40:02d}", 1 + i // 40) for i in range(240) if i % 4 and i % 3 == 0 and i % 2 == 0
    )
    assert seen == expected and len(seen) > 7
