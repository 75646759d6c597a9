"""Bulk registration of payloads already on a storage from a JSON-lines or CSV list (--from-list)."""

from __future__ import annotations

import csv
import hashlib
import itertools
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import orjson
from sqlalchemy import Table, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel

from lifecycle.checksum import ALGORITHMS
from lifecycle.errors import (
    ConflictError,
    DLMError,
    InvalidMetadataError,
    InvalidNameError,
    InvalidValueError,
    SourceNotFoundError,
    UserInputError,
)
from lifecycle.metadata import MAX_META_BYTES, validate_metadata
from lifecycle.models import Storage, utcnow
from lifecycle.names import MAX_SEGMENT_LENGTH, validate_name, validate_owner
from lifecycle.states import ItemState, ItemType, Phase, ReplicaState, StorageKind, StorageState
from lifecycle.storage.links import LinkGuard
from lifecycle.units import MAX_BYTES, parse_timestamp

__all__ = ["BulkResult", "register_from_list"]

FORMATS = ("auto", "jsonl", "csv")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_DEFAULT_ALGO = "md5"
_HEX_LENGTH = {algo: hashlib.new(algo).digest_size * 2 for algo in ALGORITHMS}
_HEX = frozenset("0123456789abcdef")
_FIELDS = frozenset(
    ("name", "path", "size", "checksum", "checksum_algo", "metadata", "meta", "phase", "expires_at", "owner")
)
_PHASES = {p.value: p.value for p in Phase}
_SQLITE_IN_CHUNK = 500

_ITEM_COLUMNS = (
    "oid, name, version, size, checksum, checksum_algo, item_type, target_phase, expires_at, "
    "owner, meta, parents, state, created_at, updated_at"
)
_REPLICA_COLUMNS = "uid, item_oid, storage_id, path, state, expires_at, verified_at, created_at, updated_at"
_EVENT_COLUMNS = "ts, kind, item_oid, replica_uid, storage_id, actor, details"

# One validated list row: name, path, size, checksum, checksum_algo, phase (None: the default),
# expires_at (None: the default), owner (None: the default), metadata, line number.
_Row = tuple[
    str, str, int, str | None, str | None, str | None, datetime | None, str | None, dict[str, Any] | None, int
]

ANALYZE_AFTER = 10_000  # rows registered in one call before the tables are re-analyzed


@dataclass(frozen=True)
class BulkResult:
    """What one bulk registration did."""

    count: int  # items registered
    ready: int  # READY items (the list gave a checksum)
    pending: int  # INITIALISED items whose replica waits for verify to checksum it
    bytes: int  # total size, added to the storage's used_bytes
    new_versions: int  # items registered as version 2+ of a name (in the catalogue or earlier in the list)
    duration_s: float


class _RowError(Exception):
    """A bad row; the caller adds the file and line number."""

    def __init__(self, cls: type[UserInputError], message: str) -> None:
        super().__init__(message)
        self.cls = cls
        self.message = message


def register_from_list(
    session: Session,
    *,
    storage: Storage,
    source: Path | TextIO,
    fmt: str = "auto",
    owner: str | None = None,
    phase: Phase = Phase.GAS,
    lifetime: timedelta | None = None,
    meta: dict[str, Any] | None = None,
    actor: str = "user",
    batch_size: int = 10_000,
    progress: Callable[[int], None] | None = None,
) -> BulkResult:
    """Register every payload listed in `source` as an Item with one Replica on `storage`.

    `source` is a JSON-lines file (one object per line: name, path, size, checksum,
    checksum_algo, metadata or meta, phase, expires_at, owner) or a CSV file with a header
    row naming the same columns (metadata as JSON object text). Only `name` and `size` are
    required; `path` defaults to the name. A row with a checksum becomes a READY item with
    a READY replica; a row without one an INITIALISED item whose PENDING replica verify
    checksums later. A name already in the catalogue (or earlier in the list) gets the next
    version. `meta` is merged under each row's metadata; `owner`, `phase` and `lifetime`
    are defaults that a row's own owner, phase and expires_at override.

    The file is streamed in batches of `batch_size` rows (memory stays bounded); rows go in
    with COPY on PostgreSQL and executemany inserts on SQLite, with one Event per item
    (written directly: bulk events are not handed to audit publishers). Everything happens
    in the caller's transaction and nothing is committed here, so an error leaves the
    catalogue as it was once the caller rolls back. `progress` is called with the running
    count after each batch.

    Raises SourceNotFoundError if the file does not exist; InvalidNameError,
    InvalidMetadataError or InvalidValueError (all UserInputError) naming the file and line
    of the first bad row, a bad format, or a path listed twice; ConflictError naming the line
    of a path a live copy already holds on the storage, or if the storage is retired or a
    concurrent registration took one of the same name-versions (or paths) first.
    """
    start = time.perf_counter()
    if fmt not in FORMATS:
        raise InvalidValueError(f"invalid list format {fmt!r}: use one of {', '.join(FORMATS)}")
    if batch_size < 1:
        raise InvalidValueError(f"invalid batch size {batch_size}: must be at least 1")
    if storage.state == StorageState.RETIRED:
        raise ConflictError(f"storage {storage.name!r} is retired: nothing can be registered on it")
    if meta is not None and not isinstance(meta, dict):
        raise InvalidMetadataError("invalid metadata: must be a JSON object")
    meta = validate_metadata(meta) if meta else meta
    phase_value = Phase(phase).value
    now = utcnow()
    default_expiry = now + lifetime if lifetime is not None else None
    session.flush()  # the storage row (and anything else pending) must exist for the foreign keys
    dialect = session.get_bind().dialect.name
    writer_class = _PostgresWriter if dialect == "postgresql" else _SQLiteWriter
    writer = writer_class(
        session,
        storage_id=storage.id,
        now=now,
        actor=actor,
        owner=owner,
        phase=phase_value,
        default_expiry=default_expiry,
        meta=meta or {},
    )
    # On a posix storage, no path that is or goes through a link, nor a file with other names.
    guard = LinkGuard(storage.root) if storage.kind == StorageKind.POSIX.value else None
    with _Source(source, fmt) as (label, records, parse):
        writer.label = label
        batch: list[_Row] = []
        for lineno, record in records:
            try:
                batch.append(parse(record, lineno))
            except _RowError as exc:
                raise exc.cls(f"{label} line {lineno}: {exc.message}") from None
            if len(batch) >= batch_size:
                _check_paths(session, storage, batch, label, guard)
                writer.write(batch)
                batch = []
                if progress is not None:
                    progress(writer.count)
        if batch:
            _check_paths(session, storage, batch, label, guard)
            writer.write(batch)
            if progress is not None:
                progress(writer.count)
    nbytes = writer.bytes

    if nbytes:
        table = _table("storage")
        session.execute(
            update(table).where(table.c.id == storage.id).values(used_bytes=table.c.used_bytes + nbytes)
        )
        if storage in session:
            session.expire(storage, ["used_bytes"])
    if writer.count >= ANALYZE_AFTER and session.get_bind().dialect.name == "postgresql":
        # Fresh statistics, so the first pipeline run after a big load gets good plans even
        # where autovacuum is slow or off (ANALYZE is allowed inside the transaction).
        session.execute(text("ANALYZE item"))
        session.execute(text("ANALYZE replica"))
    return BulkResult(
        count=writer.count,
        ready=writer.ready,
        pending=writer.count - writer.ready,
        bytes=nbytes,
        new_versions=writer.new_versions,
        duration_s=time.perf_counter() - start,
    )


def _check_paths(
    session: Session, storage: Storage, batch: list[_Row], label: str, guard: LinkGuard | None = None
) -> None:
    """Refuse a row whose path another row of the list, or a live copy in the catalogue, holds
    on the storage: two items on one file would delete each other's bytes. One query per
    batch (earlier batches are already in the transaction, so they count too). With `guard`
    (a posix storage), also a path that is or goes through a symbolic link, or a file with
    other names (a hard link): one lstat per path, directories cached.

    Raises InvalidValueError (the same path twice in the list), ConflictError (a path already
    registered), InvalidNameError (a link), each naming the line."""
    from lifecycle.db import one_of

    lines: dict[str, int] = {}
    for row in batch:
        first = lines.setdefault(row[1], row[9])
        if first != row[9]:
            raise InvalidValueError(
                f"{label} line {row[9]}: path {row[1]!r} is already listed on line {first}: "
                "one file can belong to one item only"
            )
        why = guard.why_refused(row[1], one_name=True) if guard is not None else None
        if why is not None:
            raise InvalidNameError(
                f"{label} line {row[9]}: path {row[1]!r} on storage {storage.name!r} {why}; "
                "nothing was registered"
            )
    t = _table("replica")
    items = _table("item")
    dialect = session.get_bind().dialect.name
    paths = list(lines)
    step = len(paths) if dialect == "postgresql" else _SQLITE_IN_CHUNK
    for i in range(0, len(paths), step):
        taken = session.execute(
            select(t.c.path, items.c.name, items.c.version)
            .join(items, items.c.oid == t.c.item_oid)
            .where(
                t.c.storage_id == storage.id,
                one_of(dialect, t.c.path, paths[i : i + step]),
                t.c.state.notin_([ReplicaState.DELETED.value, ReplicaState.LOST.value]),
            )
            .limit(1)
        ).first()
        if taken is not None:
            raise ConflictError(
                f"{label} line {lines[taken[0]]}: path {taken[0]!r} on storage {storage.name!r} is "
                f"already registered as {taken[1]} v{taken[2]}; nothing was registered"
            )


class _TimeOrderedIds:
    """UUIDv7 keys (RFC 9562): the call's millisecond timestamp, then a counter, then 32 random bits.

    Keys that ascend make a bulk load append to the uuid indexes (item, replica, event) instead of
    touching random pages of them, which is what makes large loads slow; the counter starts at a
    random offset and the random low bits keep concurrent loads apart.
    """

    _LOW30 = (1 << 30) - 1

    def __init__(self) -> None:
        ms = time.time_ns() // 1_000_000
        self.base = (ms << 80) | (0x7 << 76) | (0b10 << 62)
        self.counter = int.from_bytes(os.urandom(5)) & ((1 << 40) - 1)

    def take(self, n: int) -> list[int]:
        """The next `n` ids as 128-bit integers, ascending."""
        base, low30, start = self.base, self._LOW30, self.counter
        self.counter += n
        rand = memoryview(os.urandom(4 * n)).cast("I")
        return [
            base | ((c >> 30) << 64) | ((c & low30) << 32) | r
            for c, r in zip(range(start, start + n), rand, strict=True)
        ]


def _table(name: str) -> Table:
    """The Core table of a catalogue model (bulk paths bypass the ORM)."""
    return SQLModel.metadata.tables[name]


# --------------------------------------------------------------------------- reading

# A parser turns one raw record (a JSON value or a CSV record) and its line number into a row.
_Parser = Callable[[Any, int], _Row]


class _Source:
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
            if fmt == "auto" and suffix in _JSONL_SUFFIXES:
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


def _row_from_object(obj: Any, lineno: int) -> _Row:
    if type(obj) is not dict:
        raise _RowError(InvalidValueError, "each line must be a JSON object")
    if not obj.keys() <= _FIELDS:
        unknown = sorted(obj.keys() - _FIELDS)
        raise _RowError(
            InvalidValueError, f"unknown field {unknown[0]!r} (known: {', '.join(sorted(_FIELDS))})"
        )
    name = obj.get("name")
    if type(name) is not str:
        raise _RowError(InvalidValueError, "'name' is required and must be a string")
    path = obj.get("path")
    if path is None:
        path = name
    elif type(path) is not str:
        raise _RowError(InvalidValueError, "'path' must be a string")
    size = obj.get("size")
    if type(size) is not int or size < 0 or size > MAX_BYTES:
        if size is None:
            raise _RowError(InvalidValueError, "'size' is required")
        raise _RowError(InvalidValueError, f"invalid size {size!r}: must be a non-negative integer")
    row_meta = obj.get("metadata")
    if "meta" in obj:
        if row_meta is not None:
            raise _RowError(InvalidMetadataError, "give 'metadata' or 'meta', not both")
        row_meta = obj["meta"]
    if row_meta is not None and type(row_meta) is not dict:
        raise _RowError(InvalidMetadataError, "invalid metadata: must be a JSON object")
    checksum = obj.get("checksum")
    algo = obj.get("checksum_algo")
    if (checksum is not None and type(checksum) is not str) or (algo is not None and type(algo) is not str):
        raise _RowError(InvalidValueError, "'checksum' and 'checksum_algo' must be strings")
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
    unknown = [c for c in columns if c not in _FIELDS]
    if unknown or "name" not in columns or "size" not in columns or len(set(columns)) != len(columns):
        raise InvalidValueError(
            f"{label} line {reader.line_num}: invalid CSV header: need columns name and size, "
            f"optionally {', '.join(sorted(_FIELDS - {'name', 'size'}))}, each once"
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

    def parse(rec: list[str], lineno: int) -> _Row:
        size_text = rec[i_size].strip()
        if not size_text:
            raise _RowError(InvalidValueError, "'size' is required")
        if not (size_text.isascii() and size_text.isdigit()) or int(size_text) > MAX_BYTES:
            raise _RowError(InvalidValueError, f"invalid size {size_text!r}: must be a non-negative integer")
        row_meta: Any = None
        if i_meta is not None and rec[i_meta].strip():
            try:
                row_meta = orjson.loads(rec[i_meta])
            except orjson.JSONDecodeError as exc:
                raise _RowError(InvalidMetadataError, f"invalid metadata JSON: {exc}") from None
            if type(row_meta) is not dict:
                raise _RowError(InvalidMetadataError, "invalid metadata: must be a JSON object")
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
) -> _Row:
    name = _valid_name(name, "item name")
    path = name if path == name else _valid_name(path, "path")
    if algo is not None and algo not in _HEX_LENGTH:
        raise _RowError(
            InvalidValueError, f"unknown checksum algorithm {algo!r}: use one of {', '.join(ALGORITHMS)}"
        )
    if checksum is not None:
        algo = algo or _DEFAULT_ALGO
        checksum = checksum.lower()
        if len(checksum) != _HEX_LENGTH[algo] or not _HEX.issuperset(checksum):
            raise _RowError(
                InvalidValueError,
                f"invalid {algo} checksum {checksum[:140]!r}: must be {_HEX_LENGTH[algo]} hex digits",
            )
    if phase is not None:
        phase = _PHASES.get(phase.upper()) if type(phase) is str else None
        if phase is None:
            raise _RowError(InvalidValueError, f"invalid phase: use one of {', '.join(_PHASES)}")
    expires_at: datetime | None = None
    if expires is not None:
        if type(expires) is not str:
            raise _RowError(InvalidValueError, "'expires_at' must be an ISO 8601 date-time string")
        try:
            expires_at = parse_timestamp(expires)
        except DLMError as exc:
            raise _RowError(InvalidValueError, str(exc)) from None
    if owner is not None:
        if type(owner) is not str:
            raise _RowError(InvalidValueError, "'owner' must be a string without control characters")
        if not (owner and owner.isascii() and owner.isprintable() and owner.strip() == owner):
            try:
                owner = validate_owner(owner)
            except UserInputError as exc:
                raise _RowError(type(exc), str(exc)) from None
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
        raise _RowError(type(exc), str(exc)) from None


# --------------------------------------------------------------------------- writing


class _Writer:
    """Writes batches of validated rows; subclasses per database."""

    def __init__(
        self,
        session: Session,
        *,
        storage_id: uuid.UUID,
        now: datetime,
        actor: str,
        owner: str | None,
        phase: str,
        default_expiry: datetime | None,
        meta: dict[str, Any],
    ) -> None:
        self.session = session
        self.storage_id = storage_id
        self.now = now
        self.actor = actor
        self.owner = owner
        self.phase = phase
        self.default_expiry = default_expiry
        self.meta = meta
        self.label = "<list>"
        self.count = self.ready = self.bytes = self.new_versions = 0
        self.ids = _TimeOrderedIds()

    def write(self, batch: list[_Row]) -> None:
        """Insert the batch and add it to the running totals."""
        raise NotImplementedError

    def max_versions(self, names: list[str]) -> dict[str, int]:
        raise NotImplementedError

    def versions(self, batch: list[_Row]) -> tuple[list[int], int]:
        """The version of each row (next after the catalogue's and earlier rows'), and how many are 2+."""
        names = list({row[0] for row in batch})
        current = self.max_versions(names)
        out = []
        again = 0
        get = current.get
        for row in batch:
            v = get(row[0], 0) + 1
            current[row[0]] = v
            out.append(v)
            if v > 1:
                again += 1
        return out, again

    def json(self, meta: dict[str, Any], lineno: int) -> str:
        """Metadata as JSON text; see checked()."""
        return self.checked(meta, lineno)[1]

    def checked(self, meta: dict[str, Any], lineno: int) -> tuple[dict[str, Any], str]:
        """Metadata (keys in NFC) and its JSON text, refused as lifecycle.metadata says (NUL,
        control characters in keys, over 64 KiB); plain ASCII metadata skips the full walk."""
        data = orjson.dumps(meta)
        if len(data) > MAX_META_BYTES or b"\\u" in data or b"\x7f" in data or not data.isascii():
            meta = validate_metadata(meta, where=f"{self.label} line {lineno}: " if lineno else "")
            data = orjson.dumps(meta)
        return meta, data.decode()

    def merged_meta(self, row_meta: dict[str, Any] | None) -> dict[str, Any]:
        if row_meta is None:
            return self.meta
        if not self.meta:
            return row_meta
        return {**self.meta, **row_meta}


def _copy_text(value: str) -> str:
    """A value escaped for COPY's text format (names and paths never need it: they are validated)."""
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    return value


class _PostgresWriter(_Writer):
    """COPY into item, replica and event through the session's own psycopg connection."""

    def __init__(self, session: Session, **kwargs: Any) -> None:
        super().__init__(session, **kwargs)
        self.conn: Any = session.connection().connection.driver_connection
        self.now_text = self.now.isoformat()
        self.sid = self.storage_id.hex
        self.owner_text = "\\N" if self.owner is None else _copy_text(self.owner)
        self.expiry_text = "\\N" if self.default_expiry is None else self.default_expiry.isoformat()
        self.meta_text = _copy_text(self.json(self.meta, 0))
        details = _copy_text(orjson.dumps({"bulk": True}).decode())
        self.event_tail = f"\t{self.sid}\t{_copy_text(self.actor)}\t{details}\n"

    def max_versions(self, names: list[str]) -> dict[str, int]:
        with self.conn.cursor() as cur:
            cur.execute("SELECT name, max(version) FROM item WHERE name = ANY(%s) GROUP BY name", (names,))
            return dict(cur.fetchall())

    def write(self, batch: list[_Row]) -> None:
        versions, again = self.versions(batch)
        n = len(batch)
        ids = [f"{v:032x}" for v in self.ids.take(2 * n)]
        now, sid = self.now_text, self.sid
        default_owner, default_expiry, default_phase = self.owner_text, self.expiry_text, self.phase
        default_meta = self.meta_text
        event_head = f"{now}\t"
        event_tail = self.event_tail
        items: list[str] = []
        replicas: list[str] = []
        events: list[str] = []
        ready = nbytes = 0
        for i, (name, path, size, checksum, algo, phase, expires, owner, row_meta, lineno) in enumerate(
            batch
        ):
            oid, uid = ids[i], ids[n + i]
            nbytes += size
            if checksum is None:
                state, rstate, kind, ck = "INITIALISED", "PENDING", "item.registered", "\\N"
            else:
                state, rstate, kind, ck = "READY", "READY", "item.ready", checksum
                ready += 1
            if row_meta is None:
                meta_text = default_meta
            else:
                meta_text = _copy_text(self.json(self.merged_meta(row_meta), lineno))
            items.append(
                f"{oid}\t{name}\t{versions[i]}\t{size}\t{ck}\t{algo or chr(92) + 'N'}\tfile\t"
                f"{phase or default_phase}\t"
                f"{default_expiry if expires is None else expires.isoformat()}\t"
                f"{default_owner if owner is None else _copy_text(owner)}\t{meta_text}\t[]\t"
                f"{state}\t{now}\t{now}\n"
            )
            replicas.append(f"{uid}\t{oid}\t{sid}\t{path}\t{rstate}\t\\N\t\\N\t{now}\t{now}\n")
            events.append(f"{event_head}{kind}\t{oid}\t{uid}{event_tail}")
        try:
            with self.conn.cursor() as cur:
                for table, columns, rows in (
                    ("item", _ITEM_COLUMNS, items),
                    ("replica", _REPLICA_COLUMNS, replicas),
                    ("event", _EVENT_COLUMNS, events),
                ):
                    with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                        copy.write("".join(rows).encode())
        except Exception as exc:
            import psycopg

            if isinstance(exc, psycopg.errors.UniqueViolation) and "uq_replica_storage_path_live" in str(exc):
                raise ConflictError(
                    "another registration took some of the same paths at the same time; retry"
                ) from exc
            if isinstance(exc, psycopg.errors.UniqueViolation):
                raise ConflictError(
                    "another registration added some of the same item versions at the same time; retry"
                ) from exc
            raise
        self.count += len(batch)
        self.ready += ready
        self.bytes += nbytes
        self.new_versions += again


class _SQLiteWriter(_Writer):
    """Core executemany inserts (SQLite, and any other database SQLAlchemy reaches)."""

    def __init__(self, session: Session, **kwargs: Any) -> None:
        super().__init__(session, **kwargs)
        self.item_table = _table("item")
        self.replica_table = _table("replica")
        self.event_table = _table("event")

    def max_versions(self, names: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for i in range(0, len(names), _SQLITE_IN_CHUNK):
            chunk = names[i : i + _SQLITE_IN_CHUNK]
            t = self.item_table
            result = self.session.execute(
                select(t.c.name, func.max(t.c.version)).where(t.c.name.in_(chunk)).group_by(t.c.name)
            )
            out.update({name: version for name, version in result})
        return out

    def write(self, batch: list[_Row]) -> None:
        versions, again = self.versions(batch)
        n = len(batch)
        ids = [uuid.UUID(int=v) for v in self.ids.take(2 * n)]
        now, sid = self.now, self.storage_id
        details = {"bulk": True}
        items: list[dict[str, Any]] = []
        replicas: list[dict[str, Any]] = []
        events: list[dict[str, Any]] = []
        ready = nbytes = 0
        for i, (name, path, size, checksum, algo, phase, expires, owner, row_meta, lineno) in enumerate(
            batch
        ):
            oid, uid = ids[i], ids[n + i]
            nbytes += size
            meta = self.merged_meta(row_meta)
            if row_meta is not None:
                meta = self.checked(meta, lineno)[0]
            if checksum is None:
                state, rstate, kind = ItemState.INITIALISED, ReplicaState.PENDING, "item.registered"
            else:
                state, rstate, kind = ItemState.READY, ReplicaState.READY, "item.ready"
                ready += 1
            items.append(
                {
                    "oid": oid,
                    "name": name,
                    "version": versions[i],
                    "size": size,
                    "checksum": checksum,
                    "checksum_algo": algo,
                    "item_type": ItemType.FILE.value,
                    "target_phase": phase or self.phase,
                    "expires_at": self.default_expiry if expires is None else expires,
                    "owner": self.owner if owner is None else owner,
                    "meta": meta,
                    "parents": [],
                    "state": state.value,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            replicas.append(
                {
                    "uid": uid,
                    "item_oid": oid,
                    "storage_id": sid,
                    "path": path,
                    "state": rstate.value,
                    "expires_at": None,
                    "verified_at": None,
                    "created_at": now,
                    "updated_at": now,
                }
            )
            events.append(
                {
                    "ts": now,
                    "kind": kind,
                    "item_oid": oid,
                    "replica_uid": uid,
                    "storage_id": sid,
                    "actor": self.actor,
                    "details": details,
                }
            )
        try:
            self.session.execute(insert(self.item_table), items)
        except IntegrityError as exc:
            raise ConflictError(
                "another registration added some of the same item versions at the same time; retry"
            ) from exc
        try:
            self.session.execute(insert(self.replica_table), replicas)
        except IntegrityError as exc:
            raise ConflictError(
                "another registration took some of the same paths at the same time; retry"
            ) from exc
        self.session.execute(insert(self.event_table), events)
        self.count += len(batch)
        self.ready += ready
        self.bytes += nbytes
        self.new_versions += again
