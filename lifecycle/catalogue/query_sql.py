"""Compile a parsed filter (lifecycle.catalogue.query) to a SQLAlchemy condition on SQLite or
PostgreSQL: literals are bound parameters, never spliced into the SQL.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator
from sqlmodel import col

from lifecycle.catalogue.models import Item, Replica, Storage
from lifecycle.catalogue.query import (
    FIELD_SPECS,
    And,
    Compare,
    CompareOp,
    Day,
    Expr,
    Not,
    Op,
    Or,
    RelativeTime,
)
from lifecycle.catalogue.query_parse import parse
from lifecycle.states import Phase, ReplicaState


def compile_filter(text: str, *, now: datetime | None = None) -> ColumnElement[bool]:
    """A condition on Item for `select(Item).where(...)`; raises InvalidFilterError.

    Ages such as -30d count from `now` (default: the current time).
    """
    return to_sql(parse(text), now=now)


def to_sql(expr: Expr, *, now: datetime | None = None) -> ColumnElement[bool]:
    """The SQL condition of a parsed filter (ages count from `now`, default the current time)."""
    return _Compiler(now or datetime.now(UTC)).compile(expr)


# --------------------------------------------------------------------------- SQL constructs


class _GlobPattern(TypeDecorator[str]):
    """A glob bound as a GLOB pattern on SQLite and a LIKE pattern on PostgreSQL."""

    impl = sa.String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        out: list[str] = []
        i = 0
        while i < len(value):
            c = value[i]
            if c == "\\" and i + 1 < len(value):
                i += 1
                out.append(_glob_literal(value[i], dialect.name))
            elif c == "*":
                out.append("%" if dialect.name == "postgresql" else "*")
            elif c == "?":
                out.append("_" if dialect.name == "postgresql" else "?")
            else:
                out.append(_glob_literal(c, dialect.name))
            i += 1
        return "".join(out)


def _glob_literal(c: str, dialect: str) -> str:
    if dialect == "postgresql":
        return "\\" + c if c in "%_\\" else c
    return f"[{c}]" if c in "*?[" else c


class _Glob(FunctionElement[bool]):
    """`subject` matches a glob, case-sensitively on both backends."""

    name = "dlm_glob"
    type = sa.Boolean()
    inherit_cache = True


class _Bytewise(FunctionElement[str]):
    """Text that compares by code point on both backends (PostgreSQL: COLLATE "C")."""

    name = "dlm_bytewise"
    type = sa.String()
    inherit_cache = True


class _MetaKind(FunctionElement[str]):
    """The JSON kind of a meta value: string, number, true, false, null, object, array or missing."""

    name = "dlm_meta_kind"
    type = sa.String()
    inherit_cache = True


class _MetaText(FunctionElement[str]):
    """A meta value that is a JSON string, as text; NULL otherwise."""

    name = "dlm_meta_text"
    type = sa.String()
    inherit_cache = True


class _MetaNumber(FunctionElement[float]):
    """A meta value that is a JSON number; NULL otherwise (never a failed cast)."""

    name = "dlm_meta_number"
    type = sa.Float()
    inherit_cache = True


class _MetaContains(FunctionElement[bool]):
    """PostgreSQL: `meta @> DOC`, which the GIN index ix_item_meta answers; elsewhere true.

    Only ever ANDed to a comparison that implies it (`meta.a.b = 'x'` implies meta contains
    {"a": {"b": "x"}}), so the result is the same: it only lets PostgreSQL find the rows
    through the index instead of reading every item."""

    name = "dlm_meta_contains"
    type = sa.Boolean()
    inherit_cache = True


def _args(element: FunctionElement[Any], compiler: SQLCompiler, **kw: Any) -> list[str]:
    return [compiler.process(clause, **kw) for clause in element.clauses]


@compiles(_Glob)  # SQLite, and str() of a statement
def _glob_sqlite(element: _Glob, compiler: SQLCompiler, **kw: Any) -> str:
    subject, pattern = _args(element, compiler, **kw)
    return f"({subject} GLOB {pattern})"


@compiles(_Glob, "postgresql")
def _glob_postgresql(element: _Glob, compiler: SQLCompiler, **kw: Any) -> str:
    subject, pattern = _args(element, compiler, **kw)
    return f"({subject} LIKE {pattern})"  # backslash is LIKE's default escape


@compiles(_Bytewise)  # SQLite, and str() of a statement
def _bytewise_sqlite(element: _Bytewise, compiler: SQLCompiler, **kw: Any) -> str:
    return _args(element, compiler, **kw)[0]  # SQLite's default collation is BINARY


@compiles(_Bytewise, "postgresql")
def _bytewise_postgresql(element: _Bytewise, compiler: SQLCompiler, **kw: Any) -> str:
    return f'({_args(element, compiler, **kw)[0]} COLLATE "C")'


def _document(node: Compare) -> str | None:
    """The JSON document `meta` contains wherever `node` (a meta comparison) holds: for an
    equality with text, a whole number or a boolean (a float is left out: JSON and SQL may
    round it differently); None for any other comparison."""
    value = node.value
    if not node.field.startswith("meta.") or node.op != "=":
        return None
    if not (_jsonb_safe(value) or isinstance(value, bool) or type(value) is int):
        return None
    doc: Any = value
    for key in reversed(node.field.split(".")[1:]):
        doc = {key: doc}
    return json.dumps(doc)


def _containment(node: Compare) -> ColumnElement[bool] | None:
    doc = _document(node)
    return None if doc is None else _MetaContains(col(Item.meta), sa.literal(doc, sa.Text()))


def index_documents(text: str) -> list[str]:
    """The JSON documents every item a filter selects has its metadata contain (its meta
    equalities that are not under an `or` or a `not`): what PostgreSQL's GIN index
    ix_item_meta answers (`meta @> DOC`). Raises InvalidFilterError."""
    found: list[str] = []
    todo: list[Expr] = [parse(text)]
    while todo:
        expr = todo.pop()
        if isinstance(expr, And):
            todo.extend(expr.operands)
        elif isinstance(expr, Compare):
            doc = _document(expr)
            if doc is not None:
                found.append(doc)
    return found


def _jsonb_safe(value: object) -> bool:
    """Text PostgreSQL's jsonb takes as it is (no NUL, no lone surrogate; metadata never holds
    those, so such a comparison needs no index)."""
    if not isinstance(value, str) or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@compiles(_MetaContains)  # SQLite, and str() of a statement
def _contains_sqlite(element: _MetaContains, compiler: SQLCompiler, **kw: Any) -> str:
    return "1"


@compiles(_MetaContains, "postgresql")
def _contains_postgresql(element: _MetaContains, compiler: SQLCompiler, **kw: Any) -> str:
    meta, doc = _args(element, compiler, **kw)
    return f"({meta} @> CAST({doc} AS JSONB))"


# Meta constructs take (meta column, SQLite JSON path, key, key, ...): SQLite uses the path,
# PostgreSQL a chain of -> on text keys, which like SQLite's quoted path never indexes arrays.


def _sqlite_meta(element: FunctionElement[Any], compiler: SQLCompiler, **kw: Any) -> tuple[str, str]:
    args = _args(element, compiler, **kw)
    return args[0], args[1]


def _pg_meta(element: FunctionElement[Any], compiler: SQLCompiler, **kw: Any) -> str:
    args = _args(element, compiler, **kw)
    return "(" + " -> ".join([args[0], *args[2:]]) + ")"


@compiles(_MetaKind)  # SQLite, and str() of a statement
def _kind_sqlite(element: _MetaKind, compiler: SQLCompiler, **kw: Any) -> str:
    meta, path = _sqlite_meta(element, compiler, **kw)
    t = f"json_type({meta}, {path})"
    return (
        f"COALESCE(CASE {t} WHEN 'integer' THEN 'number' WHEN 'real' THEN 'number' "
        f"WHEN 'text' THEN 'string' ELSE {t} END, 'missing')"
    )


@compiles(_MetaKind, "postgresql")
def _kind_postgresql(element: _MetaKind, compiler: SQLCompiler, **kw: Any) -> str:
    x = _pg_meta(element, compiler, **kw)
    return (
        f"COALESCE(CASE jsonb_typeof({x}) WHEN 'boolean' THEN {x} #>> '{{}}' "
        f"ELSE jsonb_typeof({x}) END, 'missing')"
    )


@compiles(_MetaText)  # SQLite, and str() of a statement
def _text_sqlite(element: _MetaText, compiler: SQLCompiler, **kw: Any) -> str:
    meta, path = _sqlite_meta(element, compiler, **kw)
    return f"CASE WHEN json_type({meta}, {path}) = 'text' THEN json_extract({meta}, {path}) END"


@compiles(_MetaText, "postgresql")
def _text_postgresql(element: _MetaText, compiler: SQLCompiler, **kw: Any) -> str:
    x = _pg_meta(element, compiler, **kw)
    return f"CASE WHEN jsonb_typeof({x}) = 'string' THEN {x} #>> '{{}}' END"


@compiles(_MetaNumber)  # SQLite, and str() of a statement
def _number_sqlite(element: _MetaNumber, compiler: SQLCompiler, **kw: Any) -> str:
    meta, path = _sqlite_meta(element, compiler, **kw)
    return f"CASE WHEN json_type({meta}, {path}) IN ('integer', 'real') THEN json_extract({meta}, {path}) END"


@compiles(_MetaNumber, "postgresql")
def _number_postgresql(element: _MetaNumber, compiler: SQLCompiler, **kw: Any) -> str:
    x = _pg_meta(element, compiler, **kw)
    return f"CASE WHEN jsonb_typeof({x}) = 'number' THEN ({x} #>> '{{}}')::numeric END"


def _meta_args(keys: list[str]) -> list[Any]:
    path = "$" + "".join(f'."{key}"' for key in keys)  # keys are [A-Za-z0-9_-]+, see metadata.META_KEY
    return [
        col(Item.meta),
        sa.literal(path, sa.String()),
        *(sa.cast(sa.literal(key, sa.Text()), sa.Text()) for key in keys),
    ]


# --------------------------------------------------------------------------- compiler


_DEAD_REPLICAS: Final = (ReplicaState.DELETED.value, ReplicaState.LOST.value)


def _columns() -> dict[str, Any]:
    return {
        "name": col(Item.name),
        "version": col(Item.version),
        "size": col(Item.size),
        "state": col(Item.state),
        "phase": col(Item.target_phase),
        "type": col(Item.item_type),
        "owner": col(Item.owner),
        "checksum": col(Item.checksum),
        "oid": col(Item.oid),
        "created": col(Item.created_at),
        "updated": col(Item.updated_at),
        "expires": col(Item.expires_at),
    }


def _ordered(left: Any, op: Op, right: Any) -> ColumnElement[bool]:
    if op == "=":
        return left == right  # type: ignore[no-any-return]
    if op == "!=":
        return left != right  # type: ignore[no-any-return]
    if op == "<":
        return left < right  # type: ignore[no-any-return]
    if op == "<=":
        return left <= right  # type: ignore[no-any-return]
    if op == ">":
        return left > right  # type: ignore[no-any-return]
    return left >= right  # type: ignore[no-any-return]


class _Compiler:
    def __init__(self, now: datetime) -> None:
        self.now = now if now.tzinfo else now.replace(tzinfo=UTC)
        self.columns = _columns()

    def compile(self, expr: Expr) -> ColumnElement[bool]:
        if isinstance(expr, Not):
            return sa.not_(self.compile(expr.operand))
        if isinstance(expr, And):
            return sa.and_(*(self.compile(e) for e in expr.operands))
        if isinstance(expr, Or):
            return sa.or_(*(self.compile(e) for e in expr.operands))
        if expr.op == "!=":
            # Two-valued: != is exactly "not =", so a missing value counts as different.
            return sa.not_(self.compare(Compare(expr.field, "=", expr.value, expr.pos)))
        return self.compare(expr)

    def compare(self, node: Compare) -> ColumnElement[bool]:
        if node.field.startswith("meta."):
            return self.meta(node)
        if node.field == "storage":
            return self.storage(node)
        spec = FIELD_SPECS[node.field]
        column = self.columns[node.field]
        if node.value is None:
            return column.is_(None)  # type: ignore[no-any-return]
        op = node.op
        cond: ColumnElement[bool]
        if op == "~":
            cond = _Glob(column, sa.literal(node.value, _GlobPattern()))
        elif node.field == "phase" and op != "=":
            ranked = Phase(str(node.value))
            phases = [p.value for p in Phase if _ordered(p.rank, op, ranked.rank)]
            return column.in_(phases) if phases else sa.false()
        elif isinstance(node.value, Day):
            cond = self.day(column, op, node.value)
        elif isinstance(node.value, RelativeTime):
            cond = _ordered(column, op, self.now + node.value.delta)
        elif spec.kind == "text" and op != "=":
            cond = _ordered(_Bytewise(column), op, node.value)
        else:
            cond = _ordered(column, op, node.value)
        return sa.and_(column.is_not(None), cond) if spec.nullable else cond

    def day(self, column: Any, op: Op, value: Day) -> ColumnElement[bool]:
        start = datetime(value.day.year, value.day.month, value.day.day, tzinfo=UTC)
        end = start + timedelta(days=1) if value.day < date.max else None
        after_end: ColumnElement[bool] = column >= end if end is not None else sa.false()
        before_end: ColumnElement[bool] = column < end if end is not None else sa.true()
        if op == "=":
            return sa.and_(column >= start, before_end)
        if op == "<":
            return _ordered(column, "<", start)
        if op == "<=":
            return before_end
        if op == ">":
            return after_end
        return _ordered(column, ">=", start)

    def meta(self, node: Compare) -> ColumnElement[bool]:
        cond = self._meta(node, node.field.split(".")[1:])
        contains = _containment(node)
        return cond if contains is None else sa.and_(contains, cond)

    def _meta(self, node: Compare, keys: list[str]) -> ColumnElement[bool]:
        args = _meta_args(keys)
        value = node.value
        if value is None:
            return _MetaKind(*args).in_(["null", "missing"])
        if isinstance(value, bool):
            return _MetaKind(*args) == ("true" if value else "false")
        if isinstance(value, int | float):
            bound = sa.literal(value, sa.BigInteger() if isinstance(value, int) else sa.Float())
            return _two_valued(_ordered(_MetaNumber(*args), _op(node.op), bound))
        assert isinstance(value, str), value
        text = _MetaText(*args)
        if node.op == "~":
            return _two_valued(_Glob(text, sa.literal(value, _GlobPattern())))
        return _two_valued(_ordered(_Bytewise(text), _op(node.op), value))

    def storage(self, node: Compare) -> ColumnElement[bool]:
        live = (
            sa.select(col(Replica.uid))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(col(Replica.item_oid) == col(Item.oid), col(Replica.state).not_in(_DEAD_REPLICAS))
        )
        if node.value is None:
            return sa.not_(live.exists())
        name = col(Storage.name)
        if node.op == "~":
            return live.where(_Glob(name, sa.literal(node.value, _GlobPattern()))).exists()
        return live.where(name == node.value).exists()


def _two_valued(cond: ColumnElement[bool]) -> ColumnElement[bool]:
    """False where `cond` is NULL (a meta value of another kind, or none)."""
    return sa.func.coalesce(cond, sa.false(), type_=sa.Boolean())


def _op(op: CompareOp) -> Op:
    if op == "~":
        raise ValueError("'~' is not an ordering operator")
    return op
