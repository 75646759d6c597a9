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

import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Final, Literal

from lifecycle.states import ItemState, ItemType

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
class Field:
    kind: FieldKind
    nullable: bool = False
    glob: bool = False
    ordered: bool = True


FIELD_SPECS: Final[dict[str, Field]] = {
    "name": Field("text", glob=True),
    "version": Field("int"),
    "size": Field("size"),
    "state": Field("enum", glob=True, ordered=False),
    "phase": Field("enum", glob=True),
    "type": Field("enum", glob=True, ordered=False),
    "owner": Field("text", nullable=True, glob=True),
    "checksum": Field("text", nullable=True, glob=True),
    "oid": Field("uuid", ordered=False),
    "created": Field("date"),
    "updated": Field("date"),
    "expires": Field("date", nullable=True),
    "storage": Field("storage", nullable=True, glob=True, ordered=False),
}
