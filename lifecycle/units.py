"""Parsing and formatting of sizes (10GiB), durations (30d) and timestamps for users."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction

from lifecycle.errors import InvalidValueError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "p": 1000**5,
    "pb": 1000**5,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_DURATION = re.compile(r"^\s*(\d+)\s*([smhdwy])\s*$")
MAX_BYTES = 2**63 - 1
MAX_LIFETIME = timedelta(days=365 * 1000)


def parse_size(text: str) -> int:
    """Bytes from '10GiB', '1.5TB', '4096'; raises InvalidValueError (also for a size that is
    not a whole number of bytes, such as '1.5B' or '0.3KiB')."""
    m = _SIZE.match(text)
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _SIZE_UNITS:
        raise InvalidValueError(
            f"invalid size {text!r}: use a number with B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
        )
    number = Fraction(m.group(1))  # exact: 0.3KiB is 307.2 bytes, not 307
    exact = number * _SIZE_UNITS[unit]
    if exact.denominator != 1:
        raise InvalidValueError(f"invalid size {text!r}: not a whole number of bytes ({float(exact):g} B)")
    value = int(exact)
    if value > MAX_BYTES:
        raise InvalidValueError(f"invalid size {text!r}: too large")
    return value


def parse_duration(text: str) -> timedelta:
    """A positive duration from '30d', '12h', '2w', '1y'; raises InvalidValueError."""
    m = _DURATION.match(text)
    if not m:
        raise InvalidValueError(
            f"invalid lifetime {text!r}: use a positive whole number with s, m, h, d, w or y (e.g. 30d)"
        )
    seconds = int(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds <= 0:
        raise InvalidValueError(f"invalid lifetime {text!r}: must be greater than zero")
    if seconds > MAX_LIFETIME.total_seconds():
        raise InvalidValueError(f"invalid lifetime {text!r}: longer than 1000 years")
    return timedelta(seconds=seconds)


def parse_timestamp(text: str) -> datetime:
    """An aware datetime from an ISO date or date-time (UTC if no zone); raises InvalidValueError."""
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return datetime(d.year, d.month, d.day, tzinfo=UTC)
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidValueError(
            f"invalid date {text!r}: use ISO 8601, e.g. 2026-01-31 or 2026-01-31T12:00:00Z"
        ) from None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
