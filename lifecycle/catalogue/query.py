r"""The safe filter language of `dlm items list --where` and datasets: text to an AST to a SQL condition.

Grammar (keywords are case-insensitive)::

    filter     := or
    or         := and ("or" and)*
    and        := unary ("and" unary)*
    unary      := "not" unary | "(" or ")" | comparison
    comparison := FIELD OP value | FIELD ["not"] "in" "(" value ("," value)* ")"
    OP         := "=" | "==" | "!=" | "<" | "<=" | ">" | ">=" | "~"
    value      := 'text' | "text" | WORD

FIELD is one of `FIELDS` or `meta.KEY` (KEY: letters, digits, `_`, `-`; dots for nesting).
Quoted text takes the escapes \\ \' \" \n \t; any other backslash is kept as written.
A WORD is a bare number, size (10GiB), date (2026-01-31), date-time
(2026-01-31T12:00:00Z), age relative to now (-30d, +1w), `now`, `null`, `true`, `false`,
or text. Values are checked against their field when parsed. `~` is a case-sensitive glob
(`*` any run, `?` one character, backslash makes the next character literal).

Every condition is two-valued: a missing value (null owner, absent meta key) makes `=`,
`<`, `~`... false and `!=` true, so `not` always means "the others". A bare date stands
for the whole day (UTC). A meta condition with text matches only JSON strings, with a
number only JSON numbers, with true/false only booleans; `meta.k = null` matches a JSON
null or an absent key. Literals become bound parameters; SQL is never built from input.
"""

from __future__ import annotations

import difflib
import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator
from sqlmodel import col

from lifecycle.catalogue.models import Item, Replica, Storage
from lifecycle.errors import InvalidFilterError, InvalidValueError
from lifecycle.states import ItemState, ItemType, Phase, ReplicaState
from lifecycle.units import parse_duration, parse_size, parse_timestamp

MAX_LENGTH: Final = 4096
MAX_DEPTH: Final = 50
# Conditions in one filter (an `in` list counts one per value): SQLite refuses an expression
# tree deeper than 1000 ("Expression tree is too large"), and `a or b or ...` nests one per term.
MAX_TERMS: Final = 500

FIELDS: Final[dict[str, str]] = {
    "name": "the item's name (text)",
    "version": "the item's version (a whole number)",
    "size": "size in bytes; units allowed: 10MB, 1.5GiB",
    "state": "item state: " + ", ".join(s.value for s in ItemState),
    "phase": "target phase, ordered PLASMA < GAS < LIQUID < SOLID",
    "type": "item type: " + ", ".join(t.value for t in ItemType),
    "owner": "the owner (text, or null)",
    "checksum": "the content checksum (text, or null)",
    "oid": "the item's id (a UUID)",
    "created": "when the item was registered: 2026-01-31, 2026-01-31T12:00:00Z, now, -30d",
    "updated": "when the item last changed (as created)",
    "expires": "when the item expires (as created, or null)",
    "storage": "a storage holding a live copy (= != ~ in; null: no live copy)",
    "meta.KEY": "a metadata value, KEY nested with dots (meta.obs.band): text, number, true, false, null",
}

Op = Literal["=", "!=", "<", "<=", ">", ">="]
CompareOp = Literal["=", "!=", "<", "<=", ">", ">=", "~"]
_ORDERING: Final = ("<", "<=", ">", ">=")
_OPERATORS: Final[dict[str, CompareOp]] = {
    "=": "=",
    "==": "=",
    "!=": "!=",
    "<": "<",
    "<=": "<=",
    ">": ">",
    ">=": ">=",
    "~": "~",
}
_KEYWORDS: Final = frozenset({"and", "or", "not", "in"})


# --------------------------------------------------------------------------- AST


@dataclass(frozen=True)
class Day:
    """A whole UTC day, as written `2026-01-31`."""

    day: date


@dataclass(frozen=True)
class RelativeTime:
    """`now` plus `delta` (negative for the past), resolved when compiled."""

    delta: timedelta


Value = str | int | float | bool | datetime | Day | RelativeTime | uuid.UUID | None


@dataclass(frozen=True)
class Compare:
    """`field op value`; `field` is a key of FIELDS or `meta.<key>`; `pos` is 0-based."""

    field: str
    op: CompareOp
    value: Value
    pos: int


@dataclass(frozen=True)
class Not:
    operand: Expr


@dataclass(frozen=True)
class And:
    operands: tuple[Expr, ...]


@dataclass(frozen=True)
class Or:
    operands: tuple[Expr, ...]


Expr = Compare | Not | And | Or


# --------------------------------------------------------------------------- fields


FieldKind = Literal["text", "enum", "int", "size", "date", "uuid", "storage", "meta"]


@dataclass(frozen=True)
class _Field:
    kind: FieldKind
    nullable: bool = False
    glob: bool = False
    ordered: bool = True


_FIELD_SPECS: Final[dict[str, _Field]] = {
    "name": _Field("text", glob=True),
    "version": _Field("int"),
    "size": _Field("size"),
    "state": _Field("enum", glob=True, ordered=False),
    "phase": _Field("enum", glob=True),
    "type": _Field("enum", glob=True, ordered=False),
    "owner": _Field("text", nullable=True, glob=True),
    "checksum": _Field("text", nullable=True, glob=True),
    "oid": _Field("uuid", ordered=False),
    "created": _Field("date"),
    "updated": _Field("date"),
    "expires": _Field("date", nullable=True),
    "storage": _Field("storage", nullable=True, glob=True, ordered=False),
}
_META: Final = _Field("meta", nullable=True, glob=True)
_ENUMS: Final[dict[str, type[ItemState] | type[Phase] | type[ItemType]]] = {
    "state": ItemState,
    "phase": Phase,
    "type": ItemType,
}
_GLOB_FIELDS: Final = ", ".join([*(n for n, f in _FIELD_SPECS.items() if f.glob), "meta.KEY"])
_META_KEY = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*", re.ASCII)
_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?", re.ASCII)
_SIZE = re.compile(r"[0-9]+(?:\.[0-9]+)?\s*[A-Za-z]+", re.ASCII)
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", re.ASCII)
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[T ].*", re.ASCII | re.DOTALL)
_RELATIVE = re.compile(r"([+-])([0-9]+\s*[smhdwy])", re.ASCII)
_INT64: Final = 2**63
_INT32: Final = 2**31


# --------------------------------------------------------------------------- tokens


TokenKind = Literal["word", "string", "op", "(", ")", ",", "end"]


@dataclass(frozen=True)
class _Token:
    kind: TokenKind
    text: str
    pos: int

    def keyword(self, word: str) -> bool:
        return self.kind == "word" and self.text.lower() == word

    def describe(self) -> str:
        if self.kind == "end":
            return "the end of the filter"
        if self.kind == "string":
            return f"text {_show(self.text)}"
        return _show(self.text)


_WORD = re.compile(r"[\w.:+\-/*?@%]+")
_OP_CHARS: Final = "=!<>~"
_ESCAPES: Final = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "t": "\t"}
_HINTS: Final = {"&": " (use 'and')", "|": " (use 'or')", ";": " (a filter is one expression)"}


def _show(text: str) -> str:
    """`text` quoted for a one-line message, shortened if long."""
    shown = repr(text[:40] + ("..." if len(text) > 40 else ""))
    return shown


def _error(pos: int, message: str) -> InvalidFilterError:
    return InvalidFilterError(f"invalid filter at position {pos + 1}: {message}")


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in "(),":
            tokens.append(_Token(c, c, i))  # type: ignore[arg-type]
            i += 1
        elif c in _OP_CHARS:
            j = i
            while j < n and text[j] in _OP_CHARS:
                j += 1
            op = text[i:j]
            if op not in _OPERATORS:
                raise _error(i, f"unknown operator {op!r} (operators: = != < <= > >= ~ in)")
            tokens.append(_Token("op", op, i))
            i = j
        elif c in "'\"":
            i = _read_string(text, i, tokens)
        elif m := _WORD.match(text, i):
            tokens.append(_Token("word", m.group(), i))
            i = m.end()
        else:
            raise _error(i, f"unexpected character {c!r}{_HINTS.get(c, '')}")
    tokens.append(_Token("end", "", n))
    return tokens


def _read_string(text: str, start: int, tokens: list[_Token]) -> int:
    quote = text[start]
    out: list[str] = []
    i = start + 1
    while i < len(text):
        c = text[i]
        if c == quote:
            tokens.append(_Token("string", "".join(out), start))
            return i + 1
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            # Unknown escapes keep their backslash, so a glob's \* stays a literal star.
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    raise _error(start, f"unterminated text: no closing {quote}")


# --------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.i = 0
        self.terms = 0

    def count_terms(self, n: int, pos: int) -> None:
        self.terms += n
        if self.terms > MAX_TERMS:
            raise _error(
                pos,
                f"too many conditions: a filter holds at most {MAX_TERMS} (an 'in' list counts each value)",
            )

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.i + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        tok = self.peek()
        self.i += 1
        return tok

    def parse(self) -> Expr:
        if len(self.tokens) == 1:
            raise _error(0, "empty filter")
        expr = self.or_(0)
        tok = self.peek()
        if tok.kind == ")":
            raise _error(tok.pos, "unbalanced ')': no '(' to close")
        if tok.kind != "end":
            raise _error(
                tok.pos, f"unexpected {tok.describe()} after a complete condition (join with 'and' or 'or')"
            )
        return expr

    def or_(self, depth: int) -> Expr:
        operands = [self.and_(depth)]
        while self.peek().keyword("or"):
            self.take()
            operands.append(self.and_(depth))
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def and_(self, depth: int) -> Expr:
        operands = [self.unary(depth)]
        while self.peek().keyword("and"):
            self.take()
            operands.append(self.unary(depth))
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def unary(self, depth: int) -> Expr:
        tok = self.peek()
        if tok.keyword("not") or tok.kind == "(":
            if depth >= MAX_DEPTH:
                raise _error(tok.pos, f"nested deeper than {MAX_DEPTH} levels")
            self.take()
            if tok.kind == "word":
                return Not(self.unary(depth + 1))
            expr = self.or_(depth + 1)
            close = self.peek()
            if close.kind != ")":
                raise _error(
                    close.pos,
                    f"expected ')' to close '(' at position {tok.pos + 1}, found {close.describe()}",
                )
            self.take()
            return expr
        if tok.kind == "word" and tok.text.lower() not in _KEYWORDS:
            return self.comparison()
        raise _error(tok.pos, f"expected a condition such as name = 'x', found {tok.describe()}")

    def comparison(self) -> Expr:
        field_tok = self.take()
        field, spec = _resolve_field(field_tok)
        tok = self.peek()
        if tok.kind == "op":
            self.take()
            op = _OPERATORS[tok.text]
            _check_operator(field, spec, op, tok)
            value = _convert(field, spec, op, self.value_token(tok))
            self.count_terms(1, field_tok.pos)
            return Compare(field, op, value, field_tok.pos)
        negated = tok.keyword("not") and self.peek(1).keyword("in")
        if negated or tok.keyword("in"):
            if negated:
                self.take()
            self.take()
            values = self.value_list(field, spec)
            self.count_terms(len(values), field_tok.pos)
            any_of: Expr = (
                Compare(field, "=", values[0], field_tok.pos)
                if len(values) == 1
                else Or(tuple(Compare(field, "=", v, field_tok.pos) for v in values))
            )
            return Not(any_of) if negated else any_of
        raise _error(
            tok.pos,
            f"expected an operator (= != < <= > >= ~ in) after {field!r}, found {tok.describe()}",
        )

    def value_token(self, after: _Token) -> _Token:
        tok = self.take()
        if tok.kind == "string" or (tok.kind == "word" and tok.text.lower() not in _KEYWORDS):
            return tok
        raise _error(tok.pos, f"expected a value after {after.text!r}, found {tok.describe()}")

    def value_list(self, field: str, spec: _Field) -> list[Value]:
        open_tok = self.take()
        if open_tok.kind != "(":
            raise _error(open_tok.pos, f"expected '(' after 'in', found {open_tok.describe()}")
        if self.peek().kind == ")":
            raise _error(self.peek().pos, "empty list after 'in'")
        values = [_convert(field, spec, "=", self.value_token(open_tok))]
        while True:
            tok = self.take()
            if tok.kind == ")":
                return values
            if tok.kind != ",":
                raise _error(
                    tok.pos,
                    f"expected ',' or ')' in the list opened at position {open_tok.pos + 1}, "
                    f"found {tok.describe()}",
                )
            values.append(_convert(field, spec, "=", self.value_token(tok)))


def _resolve_field(tok: _Token) -> tuple[str, _Field]:
    lowered = tok.text.lower()
    if lowered in _FIELD_SPECS:
        return lowered, _FIELD_SPECS[lowered]
    if lowered == "meta" or lowered.startswith("meta."):
        key = tok.text[5:]
        if not _META_KEY.fullmatch(key):
            raise _error(
                tok.pos,
                f"bad metadata key {_show(key)} in {_show(tok.text)}: use meta.KEY with letters, "
                "digits, _ and -, dots for nested keys (meta.obs.band)",
            )
        return "meta." + key, _META
    known = [*_FIELD_SPECS, "meta.KEY"]
    close = difflib.get_close_matches(lowered, list(_FIELD_SPECS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise _error(tok.pos, f"unknown field {_show(tok.text)} ({hint}fields: {', '.join(known)})")


def _check_operator(field: str, spec: _Field, op: CompareOp, tok: _Token) -> None:
    if op == "~" and not spec.glob:
        raise _error(tok.pos, f"'~' (glob) works only on text fields ({_GLOB_FIELDS}), not {field!r}")
    if op in _ORDERING and not spec.ordered:
        allowed = "=, !=, ~ or in" if spec.glob else "=, != or in"
        raise _error(tok.pos, f"{op!r} does not apply to {field!r}: use {allowed}")


# --------------------------------------------------------------------------- values


def _convert(field: str, spec: _Field, op: CompareOp, tok: _Token) -> Value:
    """The typed value of `tok` for `field`; raises InvalidFilterError."""
    word = tok.text if tok.kind == "word" else None
    keyword = word.lower() if word is not None else None
    if keyword == "null":
        if op not in ("=", "!="):
            raise _error(tok.pos, f"null works only with = and != (or in), not {op!r}")
        if not spec.nullable:
            raise _error(tok.pos, f"{field!r} is never null")
        return None
    if keyword in ("true", "false"):
        if spec.kind != "meta":
            raise _error(tok.pos, f"{field!r} takes no true/false; quote it for the text {tok.text!r}")
        if op not in ("=", "!="):
            raise _error(tok.pos, f"true/false work only with = and != (or in), not {op!r}")
        return keyword == "true"
    text = tok.text
    if op == "~":
        if spec.kind == "enum":
            return text.lower() if field == "type" else text.upper()
        return text
    if spec.kind in ("text", "storage"):
        return text
    if spec.kind == "meta":
        if word is not None and _NUMBER.fullmatch(word):
            return _number(word, tok)
        return text
    if spec.kind == "enum":
        return _enum(field, text, tok)
    if spec.kind == "int":
        if not _INT.fullmatch(text.strip()):
            raise _error(tok.pos, f"{field!r} needs a whole number, got {_show(text)}")
        value = _int(text, tok)
        if not -_INT32 <= value < _INT32:
            raise _error(tok.pos, f"number {_show(text)} is out of range")
        return value
    if spec.kind == "size":
        return _size(text, tok)
    if spec.kind == "uuid":
        try:
            return uuid.UUID(text.strip())
        except ValueError:
            raise _error(tok.pos, f"{field!r} needs a UUID, got {_show(text)}") from None
    return _date(field, text, tok)


def _int(text: str, tok: _Token) -> int:
    value = int(text)
    if not -_INT64 <= value < _INT64:
        raise _error(tok.pos, f"number {_show(text)} is out of range")
    return value


def _number(text: str, tok: _Token) -> int | float:
    if _INT.fullmatch(text):
        return _int(text, tok)
    value = float(text)
    if not math.isfinite(value):
        raise _error(tok.pos, f"number {_show(text)} is out of range")
    return value


def _enum(field: str, text: str, tok: _Token) -> str:
    enum = _ENUMS[field]
    wanted = text.strip().lower() if field == "type" else text.strip().upper()
    if wanted not in {member.value for member in enum}:
        allowed = ", ".join(member.value for member in enum)
        raise _error(tok.pos, f"unknown {field} {_show(text)} ({field}s: {allowed})")
    return wanted


def _size(text: str, tok: _Token) -> int:
    stripped = text.strip()
    if _INT.fullmatch(stripped):
        return _int(stripped, tok)
    if _SIZE.fullmatch(stripped):
        try:
            return parse_size(stripped)
        except InvalidValueError as exc:
            raise _error(tok.pos, str(exc)) from None
    raise _error(
        tok.pos, f"'size' needs a whole number of bytes or a size such as 10GiB or 1.5TB, got {_show(text)}"
    )


def _date(field: str, text: str, tok: _Token) -> datetime | Day | RelativeTime:
    stripped = text.strip()
    if stripped.lower() == "now":
        return RelativeTime(timedelta(0))
    try:
        if m := _RELATIVE.fullmatch(stripped):
            delta = parse_duration(m.group(2))
            return RelativeTime(-delta if m.group(1) == "-" else delta)
        if _DAY.fullmatch(stripped):
            return Day(parse_timestamp(stripped).date())
        if _TIMESTAMP.fullmatch(stripped):
            return parse_timestamp(stripped).astimezone(UTC)
    except InvalidValueError as exc:
        raise _error(tok.pos, str(exc)) from None
    except OverflowError:
        raise _error(tok.pos, f"date {_show(text)} is out of range") from None
    raise _error(
        tok.pos,
        f"{field!r} needs a date (2026-01-31), a date-time (2026-01-31T12:00:00Z), now, "
        f"or an age such as -30d, got {_show(text)}",
    )


# --------------------------------------------------------------------------- public API


def parse(text: str) -> Expr:
    """The checked AST of a filter; raises InvalidFilterError (one line, with the position)."""
    if len(text) > MAX_LENGTH:
        raise _error(MAX_LENGTH, f"filter is longer than {MAX_LENGTH} characters")
    for i, c in enumerate(text):
        if c == "\x00" or "\ud800" <= c <= "\udfff":
            raise _error(i, f"invalid character {c!r}")
    return _Parser(_tokenize(text)).parse()


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
    path = "$" + "".join(f'."{key}"' for key in keys)  # keys are [A-Za-z0-9_-]+, see _META_KEY
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
        spec = _FIELD_SPECS[node.field]
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
        args = _meta_args(node.field.split(".")[1:])
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
