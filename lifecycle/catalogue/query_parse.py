"""Parse the filter language (lifecycle.catalogue.query) from text: tokens, the
recursive-descent parser, and values checked against their field.
"""

from __future__ import annotations

import difflib
import math
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

from lifecycle.catalogue.metadata import MAX_META_KEY_LENGTH, is_meta_key
from lifecycle.catalogue.query import (
    FIELD_SPECS,
    MAX_DEPTH,
    MAX_LENGTH,
    MAX_TERMS,
    And,
    Compare,
    CompareOp,
    Day,
    Expr,
    Field,
    Not,
    Or,
    RelativeTime,
    Value,
)
from lifecycle.errors import InvalidFilterError, InvalidValueError
from lifecycle.states import ItemState, ItemType, Phase
from lifecycle.units import parse_duration, parse_size, parse_timestamp

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
_META: Final = Field("meta", nullable=True, glob=True)
_ENUMS: Final[dict[str, type[ItemState] | type[Phase] | type[ItemType]]] = {
    "state": ItemState,
    "phase": Phase,
    "type": ItemType,
}
_GLOB_FIELDS: Final = ", ".join([*(n for n, f in FIELD_SPECS.items() if f.glob), "meta.KEY"])
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

    def value_list(self, field: str, spec: Field) -> list[Value]:
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


def _resolve_field(tok: _Token) -> tuple[str, Field]:
    lowered = tok.text.lower()
    if lowered in FIELD_SPECS:
        return lowered, FIELD_SPECS[lowered]
    if lowered == "meta" or lowered.startswith("meta."):
        key = tok.text[5:]
        if not is_meta_key(key):  # the keys `--meta KEY=VALUE` sets (lifecycle.catalogue.metadata)
            raise _error(
                tok.pos,
                f"bad metadata key {_show(key)} in {_show(tok.text)}: use meta.KEY with letters, "
                f"digits, _ and -, dots for nested keys (meta.obs.band), at most {MAX_META_KEY_LENGTH} "
                "characters",
            )
        return "meta." + key, _META
    known = [*FIELD_SPECS, "meta.KEY"]
    close = difflib.get_close_matches(lowered, list(FIELD_SPECS), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise _error(tok.pos, f"unknown field {_show(tok.text)} ({hint}fields: {', '.join(known)})")


def _check_operator(field: str, spec: Field, op: CompareOp, tok: _Token) -> None:
    if op == "~" and not spec.glob:
        raise _error(tok.pos, f"'~' (glob) works only on text fields ({_GLOB_FIELDS}), not {field!r}")
    if op in _ORDERING and not spec.ordered:
        allowed = "=, !=, ~ or in" if spec.glob else "=, != or in"
        raise _error(tok.pos, f"{op!r} does not apply to {field!r}: use {allowed}")


# --------------------------------------------------------------------------- values


def _convert(field: str, spec: Field, op: CompareOp, tok: _Token) -> Value:
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
