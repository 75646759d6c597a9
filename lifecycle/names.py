"""Validation of item names, storage-relative paths and slugs: nothing may escape its root."""

from __future__ import annotations

import re
import unicodedata
from pathlib import PurePosixPath

from lifecycle.errors import InvalidNameError

MAX_NAME_LENGTH = 1024
MAX_SEGMENT_LENGTH = 255
_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
# Slashes that NFKC does not map to '/' or '\\' but that look like one (fraction, division, big
# solidus, box-drawing diagonals): a name holding one would read as a different path.
_SLASH_LOOKALIKES = frozenset("\u2044\u2215\u2571\u2572\u29f5\u29f8\u29f9")


def validate_slug(value: str, *, what: str = "name") -> str:
    """A lower-case slug (letters, digits, '-', '_'); raises InvalidNameError otherwise."""
    if not _SLUG.match(value):
        raise InvalidNameError(
            f"invalid {what} {value[:80]!r}: use 1-64 lower-case letters, digits, '-' or '_'"
        )
    return value


def validate_name(name: str, *, what: str = "item name") -> str:
    """A relative, normalised, path-like name; raises InvalidNameError if it could escape a root.

    Refuses: empty names, absolute paths, '..' or '.' segments, empty segments, backslashes,
    NUL and other control characters, names over 1024 characters or segments over 255,
    names that are not in Unicode NFC form (lookalike spellings of the same name), and
    lookalikes of path syntax: slashes such as U+FF0F or U+2215, segments such as U+FF0E U+FF0E.
    """
    shown = repr(name[:80]) + ("..." if len(name) > 80 else "")
    if not name:
        raise InvalidNameError(f"invalid {what}: empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(f"invalid {what} {shown}: longer than {MAX_NAME_LENGTH} characters")
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            raise InvalidNameError(
                f"invalid {what} {shown}: contains control or invisible character U+{ord(ch):04X}"
            )
    if unicodedata.normalize("NFC", name) != name:
        raise InvalidNameError(f"invalid {what} {shown}: not in Unicode NFC form")
    if not name.isascii():
        for ch in name:
            if ch in _SLASH_LOOKALIKES or (
                not ch.isascii() and {"/", "\\"} & set(unicodedata.normalize("NFKC", ch))
            ):
                raise InvalidNameError(f"invalid {what} {shown}: U+{ord(ch):04X} looks like a path separator")
    if "\\" in name:
        raise InvalidNameError(f"invalid {what} {shown}: contains a backslash")
    if name.startswith("/"):
        raise InvalidNameError(f"invalid {what} {shown}: absolute paths are not allowed")
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise InvalidNameError(
                f"invalid {what} {shown}: '..', '.' and empty path segments are not allowed"
            )
        if not part.isascii() and unicodedata.normalize("NFKC", part) in (".", ".."):
            raise InvalidNameError(
                f"invalid {what} {shown}: segment {part!r} looks like "
                f"{unicodedata.normalize('NFKC', part)!r} (U+{ord(part[0]):04X})"
            )
        if len(part) > MAX_SEGMENT_LENGTH:
            raise InvalidNameError(
                f"invalid {what} {shown}: a path segment is longer than {MAX_SEGMENT_LENGTH}"
            )
    return str(PurePosixPath(name))
