"""Validation of item metadata (one place for every edge: CLI, bulk lists, later the REST API)."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from pathlib import Path
from typing import Any

from lifecycle.errors import InvalidMetadataError

MAX_META_BYTES = 64 * 1024  # an item's metadata as compact UTF-8 JSON
MAX_META_FILE_BYTES = 1024 * 1024  # a --meta-json file is not read past this
# A key path as `--meta KEY=VALUE` sets it and the filter language reads it (`meta.KEY`): segments
# of letters, digits, '_' and '-', dots between nested keys (`obs.band` is {"obs": {"band": ...}}).
# One pattern for both, so a key that can be set can be queried and the reverse.
META_KEY = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*", re.ASCII)
MAX_META_KEY_LENGTH = 128
# Levels of objects and arrays in an item's metadata: well below what every reader of stored
# metadata handles (orjson and pydantic serialise ~255 levels, SQLite's JSON functions 1000), so a
# stored document never breaks a listing, a bulk write or a filter.
MAX_META_DEPTH = 64
_BAD_KEY_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn")


def unstorable(text: str) -> str | None:
    """Why the catalogue cannot hold `text` (PostgreSQL refuses NUL, UTF-8 a lone surrogate), or
    None: such a name can be no catalogue row's."""
    bad = next((c for c in text if c == "\x00" or "\ud800" <= c <= "\udfff"), None)
    if bad is None:
        return None
    return "NUL (U+0000)" if bad == "\x00" else f"an unpaired surrogate U+{ord(bad):04X}"


def validate_metadata(meta: dict[str, Any], *, where: str = "") -> dict[str, Any]:
    """The metadata as it will be stored: keys in Unicode NFC; raises InvalidMetadataError.

    Refuses keys that are not strings or hold control or invisible characters, NUL and unpaired
    surrogates in text, numbers that are not finite (NaN, Infinity: JSON cannot hold them),
    and documents over MAX_META_BYTES (64 KiB) of JSON. `where` prefixes the message
    (e.g. "list.jsonl line 4: ").
    """
    out = _normalised(meta, where)
    size = len(json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if size > MAX_META_BYTES:
        raise InvalidMetadataError(
            f"{where}metadata is {size} bytes of JSON: the limit is {MAX_META_BYTES // 1024} KiB per item"
        )
    return out


def _normalised(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """A copy of `meta` with NFC keys, checked without recursion (a document may nest deeply)."""
    root: dict[str, Any] = {}
    stack: list[tuple[Any, Any, int]] = [(meta, root, 1)]
    while stack:
        src, dst, depth = stack.pop()
        if depth > MAX_META_DEPTH:
            raise InvalidMetadataError(
                f"{where}metadata is nested more than {MAX_META_DEPTH} levels deep (objects and arrays)"
            )
        items = src.items() if isinstance(src, dict) else enumerate(src)
        for key, value in items:
            if isinstance(src, dict):
                key = _key(key, where)
            if isinstance(value, dict | list):
                child: Any = {} if isinstance(value, dict) else [None] * len(value)
                stack.append((value, child, depth + 1))
                value = child
            else:
                _scalar_ok(value, where)
            if isinstance(dst, dict) and key in dst:
                raise InvalidMetadataError(f"{where}metadata key {key!r} is given twice (after NFC)")
            dst[key] = value
    return root


def _key(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise InvalidMetadataError(f"{where}invalid metadata key {key!r}: keys are strings")
    for ch in key:
        if unicodedata.category(ch) in _BAD_KEY_CATEGORIES:
            raise InvalidMetadataError(
                f"{where}invalid metadata key {key[:40]!r}: contains control or invisible character "
                f"U+{ord(ch):04X}"
            )
    return unicodedata.normalize("NFC", key)


def _scalar_ok(value: Any, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidMetadataError(
            f"{where}invalid metadata value {value!r}: numbers must be finite (no NaN or Infinity)"
        )
    if isinstance(value, str):
        why = unstorable(value)
        if why is not None:
            raise InvalidMetadataError(f"{where}invalid metadata text {value[:40]!r}: contains {why}")
    elif value is not None and not isinstance(value, bool | int | float):
        raise InvalidMetadataError(f"{where}invalid metadata value of type {type(value).__name__}")


def is_meta_key(key: str) -> bool:
    """Whether `key` is a metadata key path that `--meta KEY=VALUE` sets and `meta.KEY` queries."""
    return len(key) <= MAX_META_KEY_LENGTH and META_KEY.fullmatch(key) is not None


def set_meta_key(meta: dict[str, Any], key: str, value: Any) -> None:
    """Set the (nested, dotted) key path `key` in `meta`, creating the objects on the way.

    Raises InvalidMetadataError for a path through a value that is not an object.
    """
    *parents, last = key.split(".")
    node = meta
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InvalidMetadataError(
                f"invalid metadata key {key[:80]!r}: {'.'.join(parents[: i + 1])!r} holds a value, "
                "not an object"
            )
        node = child
    node[last] = value


def merged(defaults: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`defaults` with `over` laid on top, object by object: where both hold an object under a
    key the two are merged, elsewhere `over`'s value wins (so `--meta obs.site=A` as a list's
    default survives a row's own {"obs": {...}}). Neither argument is changed."""
    out = dict(defaults)
    for key, value in over.items():
        base = out.get(key)
        out[key] = merged(base, value) if isinstance(base, dict) and isinstance(value, dict) else value
    return out


def scalar(text: str) -> Any:
    """`--meta k=v` values: integers, decimals, true/false become JSON numbers/booleans."""
    if re.fullmatch(r"-?\d{1,18}", text):
        return int(text)
    if re.fullmatch(r"-?\d+\.\d+([eE][-+]?\d+)?", text):
        return float(text)  # 1.0e999 is inf: validate_metadata refuses it
    if text in ("true", "false"):
        return text == "true"
    return text


def parse_meta(pairs: list[str] | None, meta_json: Path | None) -> dict[str, Any]:
    """Metadata from a JSON object file overlaid with key=value pairs, validated. A dotted key
    sets a nested one (`obs.band=r` is {"obs": {"band": "r"}}), as `meta.obs.band` reads it.

    Raises InvalidMetadataError for an unreadable or invalid file, a malformed pair, or
    metadata that validate_metadata refuses.
    """
    meta: dict[str, Any] = {}
    if meta_json is not None:
        try:
            with meta_json.open("rb") as f:
                raw = f.read(MAX_META_FILE_BYTES + 1)
        except OSError as exc:
            raise InvalidMetadataError(f"cannot read --meta-json {meta_json}: {exc.strerror}") from None
        if len(raw) > MAX_META_FILE_BYTES:
            raise InvalidMetadataError(f"--meta-json {meta_json} is larger than 1 MiB")
        try:
            doc = json.loads(raw, parse_constant=_no_constant)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidMetadataError(f"--meta-json {meta_json} is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidMetadataError(f"--meta-json {meta_json} is nested too deeply") from None
        if not isinstance(doc, dict):
            raise InvalidMetadataError(
                f"--meta-json {meta_json} must hold a JSON object, not {type(doc).__name__}"
            )
        meta.update(doc)
    given: list[str] = []
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not is_meta_key(key):
            raise InvalidMetadataError(
                f"invalid --meta {pair[:80]!r}: use key=value with a key of letters, digits, _ . -"
            )
        # `--meta a.b=2 --meta a=1` would silently drop a.b (the reverse order is refused below)
        inside = next((g for g in given if g.startswith(key + ".")), None)
        if inside is not None:
            raise InvalidMetadataError(
                f"invalid --meta {pair[:80]!r}: it would replace {inside[:80]!r}, given before"
            )
        given.append(key)
        set_meta_key(meta, key, scalar(value))
    return validate_metadata(meta)


def _no_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not a JSON number", name, 0)
