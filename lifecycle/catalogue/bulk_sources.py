"""Read a --from-list file (JSON lines or CSV) into validated rows, one error per bad line."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import orjson

from lifecycle.catalogue.inputs import DEFAULT_ALGO, HEX_DIGITS, valid_algo, valid_checksum, valid_size
from lifecycle.errors import (
    DLMError,
    InvalidMetadataError,
    InvalidValueError,
    SourceNotFoundError,
    UserInputError,
)
from lifecycle.names import MAX_SEGMENT_LENGTH, validate_name, validate_owner
from lifecycle.states import Phase
from lifecycle.units import MAX_BYTES, parse_timestamp

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
FIELDS = frozenset(
    ("name", "path", "size", "checksum", "checksum_algo", "metadata", "meta", "phase", "expires_at", "owner")
)
PHASES = {p.value: p.value for p in Phase}
_HEX = frozenset("0123456789abcdef")
_DEFAULT_DIGITS = HEX_DIGITS[DEFAULT_ALGO]

# One validated list row: name, path, size, checksum, checksum_algo, phase (None: the default),
# expires_at (None: the default), owner (None: the default), metadata, line number.
Row = tuple[
    str, str, int, str | None, str | None, str | None, datetime | None, str | None, dict[str, Any] | None, int
]
# The same once its metadata is checked and merged under the list's defaults: compact JSON in
# the writer's form (lifecycle.catalogue.bulk_writers; None: the defaults alone).
CheckedRow = tuple[str, str, int, str | None, str | None, str | None, datetime | None, str | None, Any, int]


class RowError(Exception):
    """A bad row; the caller adds the file and line number."""

    def __init__(self, cls: type[UserInputError], message: str) -> None:
        super().__init__(message)
        self.cls = cls
        self.message = message


# --------------------------------------------------------------------------- reading

# A parser turns one raw record (a JSON value or a CSV record) and its line number into a row.
_Parser = Callable[[Any, int], Row]


class Source:
    """A list file opened for streaming: its label, its (line number, record) pairs, their parser."""

    def __init__(self, source: Path | TextIO, fmt: str) -> None:
        self.source = source
        self.fmt = fmt
        self.label = str(source) if isinstance(source, Path) else str(getattr(source, "name", "<list>"))
        self._file: Any = None

    def __enter__(self) -> tuple[str, Iterator[tuple[int, Any]], _Parser]:
        fmt = self.fmt
        lines: Iterable[Any]
        if isinstance(self.source, Path):
            path = self.source
            suffix = path.suffix.lower()
            if fmt == "auto" and suffix in JSONL_SUFFIXES:
                fmt = "jsonl"
            elif fmt == "auto" and suffix == ".csv":
                fmt = "csv"
            try:
                if fmt == "jsonl":
                    self._file = open(path, "rb")
                else:
                    self._file = open(path, encoding="utf-8", newline="")
            except FileNotFoundError:
                raise SourceNotFoundError(f"list file {str(path)!r} does not exist") from None
            except IsADirectoryError:
                raise InvalidValueError(f"list file {str(path)!r} is a directory") from None
            except OSError as exc:
                raise InvalidValueError(f"cannot read list file {str(path)!r}: {exc.strerror}") from None
            lines = self._file
        else:
            lines = self.source
        try:
            lines, fmt = _sniff(lines, fmt)
            if fmt == "jsonl":
                return self.label, _jsonl_records(lines, self.label), _row_from_object
            records, parser = _csv_records(lines, self.label)
        except BaseException:
            self.__exit__()
            raise
        return self.label, records, parser

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


def _sniff(lines: Iterable[Any], fmt: str) -> tuple[Iterable[Any], str]:
    """Decide 'auto' from the first non-blank character ('{' is JSON lines, else CSV)."""
    if fmt != "auto":
        return lines, fmt
    it = iter(lines)
    head: list[Any] = []
    for line in it:
        head.append(line)
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        stripped = text.lstrip("\ufeff").strip()
        if stripped:
            return itertools.chain(head, it), "jsonl" if stripped.startswith("{") else "csv"
    return head, "jsonl"


def _jsonl_records(lines: Iterable[bytes | str], label: str) -> Iterator[tuple[int, Any]]:
    loads = orjson.loads
    lineno = 0
    try:
        for lineno, line in enumerate(lines, 1):
            if lineno == 1 and line[:1] in ("\ufeff", b"\xef"):
                line = line.lstrip("\ufeff") if isinstance(line, str) else line.removeprefix(b"\xef\xbb\xbf")
            try:
                yield lineno, loads(line)
            except orjson.JSONDecodeError as exc:
                if not line.strip():
                    continue
                raise InvalidValueError(f"{label} line {lineno}: invalid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidValueError(f"{label} line {lineno + 1}: not UTF-8 text: {exc.reason}") from None


def _row_from_object(obj: Any, lineno: int) -> Row:
    if type(obj) is not dict:
        raise RowError(InvalidValueError, "each line must be a JSON object")
    if not obj.keys() <= FIELDS:
        unknown = sorted(obj.keys() - FIELDS)
        raise RowError(
            InvalidValueError, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(FIELDS))})"
        )
    name = obj.get("name")
    if type(name) is not str:
        raise RowError(InvalidValueError, "'name' is required and must be a string")
    path = obj.get("path")
    if path is None:
        path = name
    elif type(path) is not str:
        raise RowError(InvalidValueError, "'path' must be a string")
    size = obj.get("size")
    if type(size) is not int or size < 0 or size > MAX_BYTES:  # the fast check of inputs.valid_size
        if size is None:
            raise RowError(InvalidValueError, "'size' is required")
        try:
            size = valid_size(size)
        except InvalidValueError as exc:
            raise RowError(InvalidValueError, str(exc)) from None
    row_meta = obj.get("metadata")
    if "meta" in obj:
        if row_meta is not None:
            raise RowError(InvalidMetadataError, "give 'metadata' or 'meta', not both")
        row_meta = obj["meta"]
    if row_meta is not None and type(row_meta) is not dict:
        raise RowError(InvalidMetadataError, "invalid metadata: must be a JSON object")
    checksum = obj.get("checksum")
    algo = obj.get("checksum_algo")
    if (checksum is not None and type(checksum) is not str) or (algo is not None and type(algo) is not str):
        raise RowError(InvalidValueError, "'checksum' and 'checksum_algo' must be strings")
    return _validated(
        name,
        path,
        size,
        checksum,
        algo,
        obj.get("phase"),
        obj.get("expires_at"),
        obj.get("owner"),
        row_meta,
        lineno,
    )


def _csv_records(lines: Iterable[str], label: str) -> tuple[Iterator[tuple[int, Any]], _Parser]:
    """The records of a CSV list after its header, and the parser of one record."""
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
    except (csv.Error, UnicodeDecodeError) as exc:
        raise InvalidValueError(f"{label} line 1: invalid CSV: {exc}") from None
    if header is None:
        return iter(()), _row_from_object
    columns = [c.strip().lstrip("\ufeff").lower() for c in header]
    unknown = [c for c in columns if c not in FIELDS]
    if unknown or "name" not in columns or "size" not in columns or len(set(columns)) != len(columns):
        raise InvalidValueError(
            f"{label} line {reader.line_num}: invalid CSV header: need columns name and size, "
            f"optionally {', '.join(sorted(FIELDS - {'name', 'size'}))}, each once"
        )
    width = len(columns)
    index = {c: i for i, c in enumerate(columns)}
    i_name, i_size = index["name"], index["size"]
    optional = [index.get(c) for c in ("path", "checksum", "checksum_algo", "phase", "expires_at", "owner")]
    i_meta = index.get("metadata", index.get("meta"))

    def records() -> Iterator[tuple[int, Any]]:
        while True:
            try:
                rec = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                raise InvalidValueError(f"{label} line {reader.line_num + 1}: invalid CSV: {exc}") from None
            if not rec or (len(rec) == 1 and not rec[0].strip()):
                continue
            if len(rec) != width:
                raise InvalidValueError(
                    f"{label} line {reader.line_num}: expected {width} columns, found {len(rec)}"
                )
            yield reader.line_num, rec

    def parse(rec: list[str], lineno: int) -> Row:
        size_text = rec[i_size].strip()
        if not size_text:
            raise RowError(InvalidValueError, "'size' is required")
        if not (size_text.isascii() and size_text.isdigit()) or int(size_text) > MAX_BYTES:
            raise RowError(InvalidValueError, f"invalid size {size_text!r}: must be a non-negative integer")
        row_meta: Any = None
        if i_meta is not None and rec[i_meta].strip():
            try:
                row_meta = orjson.loads(rec[i_meta])
            except orjson.JSONDecodeError as exc:
                raise RowError(InvalidMetadataError, f"invalid metadata JSON: {exc}") from None
            if type(row_meta) is not dict:
                raise RowError(InvalidMetadataError, "invalid metadata: must be a JSON object")
        path, checksum, algo, phase, expires, owner = (
            None if i is None else rec[i] or None for i in optional
        )
        name = rec[i_name]
        return _validated(
            name, path or name, int(size_text), checksum, algo, phase, expires, owner, row_meta, lineno
        )

    return records(), parse


def _validated(
    name: str,
    path: str,
    size: int,
    checksum: str | None,
    algo: str | None,
    phase: Any,
    expires: Any,
    owner: Any,
    row_meta: dict[str, Any] | None,
    lineno: int,
) -> Row:
    name = _valid_name(name, "item name")
    path = name if path == name else _valid_name(path, "path")
    if (
        algo is None
        and checksum is not None
        and len(checksum) == _DEFAULT_DIGITS
        and _HEX.issuperset(checksum)
    ):
        algo = DEFAULT_ALGO  # what valid_checksum answers for a lower-case digest of the default algorithm
    else:
        try:  # the rules of lifecycle.catalogue.inputs.ItemCreate
            if algo is not None:
                valid_algo(algo)
            if checksum is not None:
                checksum, algo = valid_checksum(checksum, algo)
        except InvalidValueError as exc:
            raise RowError(InvalidValueError, str(exc)) from None
    if phase is not None:
        phase = PHASES.get(phase.upper()) if type(phase) is str else None
        if phase is None:
            raise RowError(InvalidValueError, f"invalid phase: use one of {', '.join(PHASES)}")
    expires_at: datetime | None = None
    if expires is not None:
        if type(expires) is not str:
            raise RowError(InvalidValueError, "'expires_at' must be an ISO 8601 date-time string")
        try:
            expires_at = parse_timestamp(expires)
        except DLMError as exc:
            raise RowError(InvalidValueError, str(exc)) from None
    if owner is not None:
        if type(owner) is not str:
            raise RowError(InvalidValueError, "'owner' must be a string without control characters")
        if not (owner and owner.isascii() and owner.isprintable() and owner.strip() == owner):
            try:
                owner = validate_owner(owner)
            except UserInputError as exc:
                raise RowError(type(exc), str(exc)) from None
    return (name, path, size, checksum, algo, phase, expires_at, owner, row_meta, lineno)


def _valid_name(name: str, what: str) -> str:
    """validate_name, with a fast path for plain ASCII names that it would return unchanged."""
    if (
        0 < len(name) <= MAX_SEGMENT_LENGTH
        and name.isascii()
        and name.isprintable()
        and name[0] not in "/."
        and name[-1] != "/"
        and "\\" not in name
        and "//" not in name
        and "/." not in name
        and (
            what != "item name"  # item names: no '@', no whitespace at a segment's ends
            or ("@" not in name and " " not in (name[0], name[-1]) and " /" not in name and "/ " not in name)
        )
    ):
        return name
    try:
        return validate_name(name, what=what)
    except UserInputError as exc:
        raise RowError(type(exc), str(exc)) from None
