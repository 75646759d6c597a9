"""Opaque keyset cursors: the (name, version) after which the next page of items starts."""

from __future__ import annotations

import base64
import binascii
import json

from lifecycle.catalogue.metadata import unstorable
from lifecycle.errors import InvalidValueError


def encode(last: tuple[str, int] | None) -> str | None:
    if last is None:
        return None
    raw = json.dumps([last[0], last[1]], ensure_ascii=False, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str | None) -> tuple[str, int] | None:
    """The position a cursor stands for. Raises InvalidValueError for one this API did not give."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        name, version = json.loads(raw)
        if (
            isinstance(name, str)
            and not unstorable(name)
            and type(version) is int
            and 0 <= version <= 2**63 - 1
        ):
            return name, version
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        pass
    raise InvalidValueError("invalid cursor: pass back the next_cursor of a previous page")
