"""Validation of item names, storage-relative paths, owners and slugs: nothing may escape its root."""

from __future__ import annotations

import re
import unicodedata
from pathlib import PurePosixPath
from urllib.parse import urlsplit

from lifecycle.errors import InvalidNameError, InvalidValueError
from lifecycle.redact import redact

MAX_NAME_LENGTH = 1024
MAX_SEGMENT_LENGTH = 255  # characters, and bytes in UTF-8 (what file systems count)
MAX_OWNER_LENGTH = 255
VERSION_SEPARATOR = "@"  # NAME@vN names a version: an item name may not hold it
RESERVED_PREFIX = ".dlm-"  # DLM's own files (the `.dlm-storage` marker, `.dlm-tmp-*`): no item name
STORAGE_MARKER = ".dlm-storage"  # lifecycle.storage.identity's marker: no item name nor path
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


def validate_name(name: str, *, what: str = "item name", item: bool | None = None) -> str:
    """A relative, normalised, path-like name; raises InvalidNameError if it could escape a root.

    Refuses: empty names, absolute paths, '..' or '.' segments, empty segments, backslashes,
    NUL and other control characters, the storage marker's name `.dlm-storage` as a segment,
    names over 1024 characters or segments over 255
    characters or 255 bytes in UTF-8, names that are not in Unicode NFC form (lookalike
    spellings of the same name), and lookalikes of path syntax: slashes such as U+FF0F or
    U+2215, segments such as U+FF0E U+FF0E.

    Item names (`item`, by default when `what` is "item name") also refuse segments starting
    with '.dlm-' (DLM's own files: markers, temporary files), '@' (the version
    separator of NAME@vN) and segments that are blank or start or end with whitespace; paths
    of files already on a storage keep those.
    """
    item = (what == "item name") if item is None else item
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
        if not part.isascii() and len(part.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_LENGTH:
            raise InvalidNameError(
                f"invalid {what} {shown}: a path segment is longer than {MAX_SEGMENT_LENGTH} bytes in UTF-8"
            )
        if (part.lower() == STORAGE_MARKER) or (item and part[:5].lower() == RESERVED_PREFIX):
            raise InvalidNameError(
                f"invalid {what} {shown}: names starting with {RESERVED_PREFIX!r} are reserved for "
                f"DLM's own files (the storage marker {STORAGE_MARKER!r}, temporary files)"
            )
        if item and (part.strip() != part):
            raise InvalidNameError(
                f"invalid {what} {shown}: a path segment is blank or starts or ends with whitespace"
            )
    if item and VERSION_SEPARATOR in name:
        raise InvalidNameError(
            f"invalid {what} {shown}: '@' is the version separator (NAME@vN) and cannot be in a name"
        )
    return str(PurePosixPath(name))


def validate_owner(owner: str, *, what: str = "owner") -> str:
    """An owner (or actor) name in Unicode NFC; raises InvalidNameError for an empty or blank
    one, one over 255 characters, or one holding control or invisible characters (ESC, newline...).
    """
    shown = repr(owner[:80]) + ("..." if len(owner) > 80 else "")
    for ch in owner:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            raise InvalidNameError(
                f"invalid {what} {shown}: contains control or invisible character U+{ord(ch):04X}"
            )
    value = unicodedata.normalize("NFC", owner)
    if not value.strip():
        raise InvalidNameError(f"invalid {what} {shown}: empty")
    if value.strip() != value:
        raise InvalidNameError(f"invalid {what} {shown}: starts or ends with whitespace")
    if len(value) > MAX_OWNER_LENGTH:
        raise InvalidNameError(f"invalid {what} {shown}: longer than {MAX_OWNER_LENGTH} characters")
    return value


def validate_endpoint(url: str) -> str:
    """An S3 endpoint URL without credentials in it; raises InvalidValueError for `user:secret@`
    (credentials come from the environment, never from the catalogue)."""
    try:
        parts = urlsplit(url)
        has_user = parts.username is not None or parts.password is not None
    except ValueError:
        raise InvalidValueError(f"invalid endpoint {redact(url)[:200]!r}: not a URL") from None
    if has_user or "@" in parts.netloc:
        shown = redact(url) if parts.password is not None else url
        raise InvalidValueError(
            f"invalid endpoint {shown[:200]!r}: credentials do not belong in the endpoint URL; "
            "put them in PREFIX_ACCESS_KEY_ID and PREFIX_SECRET_ACCESS_KEY and use --credentials-env PREFIX"
        )
    return url
