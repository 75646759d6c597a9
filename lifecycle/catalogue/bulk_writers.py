"""Write validated --from-list rows in bulk: binary COPY on PostgreSQL, executemany on SQLite.

The rows come from lifecycle.catalogue.bulk_sources and bulk.py, already checked (names, sizes,
checksums, metadata, the same path twice in a batch, links). What is left needs the database:
the next version of each name, and whether a live copy already holds a path. On PostgreSQL a
writer thread does that and the three COPYs (item, replica, event) of one batch while the
caller's thread reads and checks the next batch, so the server is never idle while Python
works; on SQLite (in-process, the same core) the batch is written in the caller's thread.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import struct
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlmodel import Session

from lifecycle.catalogue.bulk_sources import CheckedRow
from lifecycle.catalogue.metadata import MAX_META_BYTES, MAX_META_DEPTH, merged, validate_metadata
from lifecycle.errors import ConflictError
from lifecycle.states import EventKind, ReplicaState

__all__ = ["SQLITE_IN_CHUNK", "MetaJson", "PostgresWriter", "SQLiteWriter", "TimeOrderedIds"]

SQLITE_IN_CHUNK = 500  # values per IN list on SQLite (under its bound-parameter limit)
_NOT_LIVE = f"('{ReplicaState.DELETED.value}', '{ReplicaState.LOST.value}')"

PATHS_TAKEN = "another registration took some of the same paths at the same time; retry"
VERSIONS_TAKEN = "another registration added some of the same item versions at the same time; retry"


def taken_message(label: str, line: int, path: str, storage: str, name: str, version: int) -> str:
    return (
        f"{label} line {line}: path {path!r} on storage {storage!r} is already registered as "
        f"{name} v{version}; nothing was registered"
    )


class MetaJson:
    """A row's metadata, merged under the list's defaults, as compact JSON in the writer's
    `form` (jsonb field bytes, text); refused as lifecycle.catalogue.metadata says (NUL,
    control characters in keys, over 64 KiB, nested too deeply). Plain ASCII metadata with few
    objects and arrays skips the full walk."""

    def __init__(self, defaults: dict[str, Any], form: Callable[[bytes], Any]) -> None:
        self.defaults = defaults
        self.form = form  # also makes a right-sized copy: orjson's bytes keep a 4 KiB buffer
        self.label = "<list>"
        self.default = form(self.checked(defaults, 0))

    def __call__(self, row_meta: dict[str, Any], lineno: int) -> Any:
        return self.form(self.checked(merged(self.defaults, row_meta) if self.defaults else row_meta, lineno))

    def checked(self, meta: dict[str, Any], lineno: int) -> bytes:
        try:
            data: bytes | None = orjson.dumps(meta)
        except orjson.JSONEncodeError:  # e.g. nested past orjson's limit: validate_metadata names it
            data = None
        if (
            data is None
            or len(data) > MAX_META_BYTES
            or b"\\u" in data
            or b"\x7f" in data
            or not data.isascii()
            or data.count(b"{") + data.count(b"[") > MAX_META_DEPTH  # it may nest too deeply
        ):
            meta = validate_metadata(meta, where=f"{self.label} line {lineno}: " if lineno else "")
            data = orjson.dumps(meta)
        return data


class _Writer:
    """Writes batches of validated rows (their metadata already JSON: Row[8] bytes or None for
    the list's defaults); subclasses per database. count, ready and bytes are the rows handed to
    write(); new_versions is final after finish()."""

    def __init__(
        self,
        session: Session,
        *,
        storage_id: uuid.UUID,
        storage_name: str,
        now: datetime,
        actor: str,
        owner: str | None,
        phase: str,
        default_expiry: datetime | None,
        meta: dict[str, Any],
    ) -> None:
        self.session = session
        self.storage_id = storage_id
        self.storage_name = storage_name
        self.now = now
        self.actor = actor
        self.owner = owner
        self.phase = phase
        self.default_expiry = default_expiry
        self.check_meta = MetaJson(meta, self.meta_form)
        self._label = "<list>"
        self.count = self.ready = self.bytes = self.new_versions = 0
        self.ids = TimeOrderedIds()

    @staticmethod
    def meta_form(data: bytes) -> Any:
        """Metadata JSON as this writer's rows carry it (CheckedRow[8])."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        return self._label

    @label.setter
    def label(self, value: str) -> None:
        self._label = self.check_meta.label = value

    def write(self, batch: list[CheckedRow], lines: dict[str, int]) -> None:
        """Write the batch (`lines`: each path's line number, for messages)."""
        raise NotImplementedError

    def finish(self) -> None:
        """Wait until every batch is written; raise the first error a batch met."""

    def abort(self, *, drain: bool) -> BaseException | None:
        """Stop writing; with `drain`, after the batches handed over so far (they come before
        the caller's error, so a refusal among them is the one to name), else after the batch
        being written. The error a batch met, if any. The caller rolls back."""
        return None

    def close(self) -> None:
        """Undo per-call connection settings (after finish or abort)."""

    @staticmethod
    def versions(names: list[str], current: dict[str, int]) -> tuple[list[int], int]:
        """The version of each row (next after the catalogue's and earlier rows'), and how many
        are 2+; [] when every row is version 1. `current` maps the names the catalogue holds
        to their highest version."""
        if not current and len(set(names)) == len(names):
            return [], 0
        out = []
        again = 0
        get = current.get
        for name in names:
            v = get(name, 0) + 1
            current[name] = v
            out.append(v)
            if v > 1:
                again += 1
        return out, again


# --------------------------------------------------------------------------- PostgreSQL

_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # PostgreSQL's binary timestamps count from here
_MICRO = timedelta(microseconds=1)
_i32 = struct.Struct(">i").pack
_i32i32 = struct.Struct(">ii").pack
_i32i64 = struct.Struct(">iq").pack
_jsonb_head = struct.Struct(">iB").pack  # the length, then jsonb's binary format version (1)
_NULL = _i32(-1)
_UUID = _i32(16)
_HEADER = b"PGCOPY\n\xff\r\n\x00" + _i32i32(0, 0)
_TRAILER = b"\xff\xff"
_V1 = _i32i32(4, 1)


def _text(value: str) -> bytes:
    data = value.encode()
    return _i32(len(data)) + data


def _ts(value: datetime) -> bytes:
    return _i32i64(8, (value - _EPOCH) // _MICRO)


def _jsonb(data: bytes) -> bytes:
    return _jsonb_head(len(data) + 1, 1) + data


# The columns of the binary rows (item's version last: it is known only in the writer thread).
ITEM_COLUMNS = (
    "oid, name, size, checksum, checksum_algo, item_type, target_phase, expires_at, owner, meta, "
    "parents, state, created_at, updated_at, version"
)
REPLICA_COLUMNS = "uid, item_oid, storage_id, path, state, expires_at, verified_at, created_at, updated_at"
EVENT_COLUMNS = "ts, kind, item_oid, replica_uid, storage_id, actor, details"


CHECK_BATCH = (
    "SELECT r.path, i.name, i.version FROM replica r JOIN item i ON i.oid = r.item_oid "
    "WHERE r.storage_id = %s AND r.path = ANY(string_to_array(%s, E'\\n')) "
    f"AND r.state NOT IN {_NOT_LIVE} "
    "UNION ALL SELECT NULL, name, max(version) FROM item "
    "WHERE name = ANY(string_to_array(%s, E'\\n')) GROUP BY name"
)


class PostgresWriter(_Writer):
    """Binary COPY into item, replica and event through the session's own psycopg connection,
    from a writer thread (the session is not used by the caller until finish() or abort())."""

    def __init__(self, session: Session, **kwargs: Any) -> None:
        super().__init__(session, **kwargs)
        self.conn: Any = session.connection().connection.driver_connection
        now = _ts(self.now)
        sid = self.storage_id.bytes
        self.sid = sid
        # Constant runs of fields, so a row is a few joins (see _item_rows and friends).
        self.item_head = struct.pack(">h", 15) + _UUID
        self.owner_blob = _NULL if self.owner is None else _text(self.owner)
        self.expiry_blob = _NULL if self.default_expiry is None else _ts(self.default_expiry)
        self.meta_blob = self.check_meta.default
        self.algo_blobs: dict[str | None, bytes] = {None: _NULL}
        self.phase_blobs = {self.phase: _text(self.phase)}
        self.mid_blobs: dict[tuple[Any, ...], bytes] = {}
        tail = _jsonb(b"[]")
        self.item_tails = {
            True: tail + _text("READY") + now + now,
            False: tail + _text("INITIALISED") + now + now,
        }
        self.replica_head = struct.pack(">h", 9) + _UUID
        self.replica_mid = _UUID + sid
        self.replica_tails = {
            True: _text(ReplicaState.READY.value) + _NULL + _NULL + now + now,
            False: _text(ReplicaState.PENDING.value) + _NULL + _NULL + now + now,
        }
        self.event_heads = {
            True: struct.pack(">h", 7) + now + _text(EventKind.ITEM_READY.value) + _UUID,
            False: struct.pack(">h", 7) + now + _text(EventKind.ITEM_REGISTERED.value) + _UUID,
        }
        self.event_tail = _UUID + sid + _text(self.actor) + _jsonb(orjson.dumps({"bulk": True}))
        self.jobs: queue.Queue[tuple[list[str], dict[str, int], list[bytes], bytes, bytes] | None] = (
            queue.Queue(maxsize=1)
        )
        self.error: BaseException | None = None
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.switch = _FasterHandOver()

    @staticmethod
    def meta_form(data: bytes) -> bytes:
        return _jsonb(data)

    # ------------------------------------------------------------ the caller's thread

    def write(self, batch: list[CheckedRow], lines: dict[str, int]) -> None:
        """Turn the batch into COPY rows here, and hand them to the writer thread (which waits
        for at most one batch: memory stays bounded)."""
        if self.error is not None:
            raise self.error
        n = len(batch)
        ids = self.ids.take_bytes(2 * n)
        items: list[bytes] = []
        replicas: list[bytes] = []
        events: list[bytes] = []
        names: list[str] = []
        add_item, add_replica, add_event, add_name = (
            items.append,
            replicas.append,
            events.append,
            names.append,
        )
        item_head, item_tails = self.item_head, self.item_tails
        replica_head, replica_mid, replica_tails = self.replica_head, self.replica_mid, self.replica_tails
        event_heads, event_tail = self.event_heads, self.event_tail
        mid_of, default_meta = self._mid, self.meta_blob
        ready = nbytes = 0
        for (name, path, size, checksum, algo, phase, expires, owner, meta, _line), oid, uid in zip(
            batch, ids[:n], ids[n:], strict=True
        ):
            nbytes += size
            add_name(name)
            name_blob = _text(name)
            if checksum is None:
                done = False
                ck = _NULL
            else:
                done = True
                ready += 1
                ck = _text(checksum)
            add_item(
                b"".join(
                    (
                        item_head,
                        oid,
                        name_blob,
                        _i32i64(8, size),
                        ck,
                        mid_of(algo, phase, expires, owner),
                        default_meta if meta is None else meta,
                        item_tails[done],
                    )
                )
            )
            add_replica(
                b"".join(
                    (
                        replica_head,
                        uid,
                        _UUID,
                        oid,
                        replica_mid,
                        name_blob if path is name else _text(path),
                        replica_tails[done],
                    )
                )
            )
            add_event(b"".join((event_heads[done], oid, _UUID, uid, event_tail)))
        self.count += n
        self.ready += ready
        self.bytes += nbytes
        job = (names, lines, items, b"".join(replicas), b"".join(events))
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="dlm-bulk-writer", daemon=True)
            self.switch.__enter__()
            self.thread.start()
        self.jobs.put(job)

    def _mid(self, algo: str | None, phase: str | None, expires: datetime | None, owner: str | None) -> bytes:
        """checksum_algo, item_type, target_phase, expires_at and owner as one run of fields."""
        key = (algo, phase, expires, owner)
        blob = self.mid_blobs.get(key)
        if blob is None:
            algo_blob = self.algo_blobs.get(algo)
            if algo_blob is None:
                algo_blob = self.algo_blobs[algo] = _text(algo)  # type: ignore[arg-type]
            blob = b"".join(
                (
                    algo_blob,
                    _FILE,
                    self.phase_blobs[self.phase] if phase is None else _text(phase),
                    self.expiry_blob if expires is None else _ts(expires),
                    self.owner_blob if owner is None else _text(owner),
                )
            )
            if len(self.mid_blobs) < 4096:  # rows with their own expiry or owner: bounded cache
                self.mid_blobs[key] = blob
        return blob

    def finish(self) -> None:
        self._stop()
        if self.error is not None:
            raise self.error

    def abort(self, *, drain: bool) -> BaseException | None:
        self.stopping = not drain  # else the thread writes the batch waiting, if any
        self._stop()
        return self.error

    def _stop(self) -> None:
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None
            self.switch.__exit__()

    # ------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None or self.stopping:
                continue  # a batch failed, or the caller's thread did: skip the rest, it rolls back
            try:
                self._write(*job)
            except BaseException as exc:  # handed to the caller's thread
                self.error = exc

    def _write(
        self, names: list[str], lines: dict[str, int], items: list[bytes], replicas: bytes, events: bytes
    ) -> None:
        import psycopg

        with self.conn.cursor() as cur:
            # One round trip: the live copies holding one of the paths, then the highest version
            # of each name. Names and paths never hold a newline (no control characters), so the
            # lists go as one text each, split by the server.
            cur.execute(CHECK_BATCH, (self.storage_id, "\n".join(lines), "\n".join(names)))
            taken, current = [], {}
            for path, name, version in cur:
                if path is None:
                    current[name] = version
                else:
                    taken.append((path, name, version))
            if taken:
                path, name, version = min(taken, key=lambda t: lines[t[0]])
                raise ConflictError(
                    taken_message(self.label, lines[path], path, self.storage_name, name, version)
                )
            versions, again = self.versions(names, current)
            if versions:
                pack = _i32i32
                tails = [_V1 if v == 1 else pack(4, v) for v in versions]
            else:
                tails = [_V1] * len(items)
            item_data = b"".join(itertools.chain.from_iterable(zip(items, tails, strict=True)))
            try:
                for table, columns, data in (
                    ("item", ITEM_COLUMNS, item_data),
                    ("replica", REPLICA_COLUMNS, replicas),
                    ("event", EVENT_COLUMNS, events),
                ):
                    with cur.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                        copy.write(_HEADER)
                        copy.write(data)
                        copy.write(_TRAILER)
            except psycopg.errors.UniqueViolation as exc:
                raise ConflictError(
                    PATHS_TAKEN if "uq_replica_storage_path_live" in str(exc) else VERSIONS_TAKEN
                ) from exc
        self.new_versions += again


_FILE = _text("file")


class _FasterHandOver:
    """While the writer thread runs, a shorter GIL switch interval: the thread mostly waits on
    the server, and each time the server answers it must get the GIL back from the caller's
    thread (busy reading rows) before it can send the next statement; at the default 5 ms the
    server would sit idle for that long a few times per batch."""

    INTERVAL = 0.0005

    def __init__(self) -> None:
        self.saved: float | None = None

    def __enter__(self) -> None:
        import sys

        self.saved = sys.getswitchinterval()
        sys.setswitchinterval(min(self.saved, self.INTERVAL))

    def __exit__(self, *exc: object) -> None:
        import sys

        if self.saved is not None:
            sys.setswitchinterval(self.saved)
            self.saved = None


# --------------------------------------------------------------------------- SQLite

SQLITE_CACHE_KIB = 64 * 1024  # page cache while a list loads (SQLite's default is 2 MiB)


def _sqlite_time(value: datetime) -> str:
    """A timestamp as SQLAlchemy stores UTCDateTime on SQLite (naive UTC, microseconds)."""
    v = value.astimezone(UTC)
    return "%04d-%02d-%02d %02d:%02d:%02d.%06d" % (  # noqa: UP031 - SQLAlchemy's exact format
        v.year,
        v.month,
        v.day,
        v.hour,
        v.minute,
        v.second,
        v.microsecond,
    )


SQLITE_EVENTS = (
    "INSERT INTO event (ts, kind, item_oid, replica_uid, storage_id, actor, details) "
    f"SELECT created_at, CASE state WHEN '{ReplicaState.READY.value}' THEN '{EventKind.ITEM_READY.value}' "
    f"ELSE '{EventKind.ITEM_REGISTERED.value}' END, item_oid, uid, storage_id, ?, ? "
    "FROM replica WHERE rowid > ? ORDER BY rowid"
)


class SQLiteWriter(_Writer):
    """executemany inserts through the session's own sqlite3 connection, in the caller's thread
    (SQLite runs in-process: a second thread would only contend for the same core and the GIL)."""

    def __init__(self, session: Session, **kwargs: Any) -> None:
        super().__init__(session, **kwargs)
        self.conn: Any = session.connection().connection.driver_connection
        self.now_text = _sqlite_time(self.now)
        self.sid = self.storage_id.hex
        self.expiry_text = None if self.default_expiry is None else _sqlite_time(self.default_expiry)
        self.default_meta = self.check_meta.default
        self.details = orjson.dumps({"bulk": True}).decode()
        self.saved_cache: int | None = None

    @staticmethod
    def meta_form(data: bytes) -> str:
        return data.decode()

    def _select_in(self, sql: str, values: list[str], *params: Any) -> list[Any]:
        out: list[Any] = []
        execute = self.conn.execute
        for i in range(0, len(values), SQLITE_IN_CHUNK):
            chunk = values[i : i + SQLITE_IN_CHUNK]
            out.extend(execute(sql.replace("(?)", f"({','.join('?' * len(chunk))})"), (*params, *chunk)))
        return out

    def write(self, batch: list[CheckedRow], lines: dict[str, int]) -> None:
        conn = self.conn
        if self.saved_cache is None:
            self.saved_cache = conn.execute("PRAGMA cache_size").fetchone()[0]
            conn.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
        taken = self._select_in(
            "SELECT r.path, i.name, i.version FROM replica r JOIN item i ON i.oid = r.item_oid "
            f"WHERE r.storage_id = ? AND r.state NOT IN {_NOT_LIVE} AND r.path IN (?)",
            list(lines),
            self.sid,
        )
        if taken:
            path, name, version = min(taken, key=lambda t: lines[t[0]])
            raise ConflictError(
                taken_message(self.label, lines[path], path, self.storage_name, name, version)
            )
        names = [row[0] for row in batch]
        current = self._select_in(
            "SELECT name, max(version) FROM item WHERE name IN (?) GROUP BY name", list(set(names))
        )
        versions, again = self.versions(names, dict(current))
        n = len(batch)
        ids = [f"{v:032x}" for v in self.ids.take(2 * n)]
        now, sid = self.now_text, self.sid
        default_owner, default_expiry, default_phase = self.owner, self.expiry_text, self.phase
        default_meta = self.default_meta
        item_rows: list[tuple[Any, ...]] = []
        replica_rows: list[tuple[Any, ...]] = []
        add_item, add_replica = item_rows.append, replica_rows.append
        ready = nbytes = 0
        for i, (name, path, size, checksum, algo, phase, expires, owner, meta, _line) in enumerate(batch):
            oid, uid = ids[i], ids[n + i]
            nbytes += size
            if checksum is None:
                state, rstate = "INITIALISED", "PENDING"
            else:
                state, rstate = "READY", "READY"
                ready += 1
            add_item(
                (
                    oid,
                    name,
                    versions[i] if versions else 1,
                    size,
                    checksum,
                    algo,
                    phase or default_phase,
                    default_expiry if expires is None else _sqlite_time(expires),
                    default_owner if owner is None else owner,
                    default_meta if meta is None else meta,
                    state,
                    now,
                )
            )
            add_replica((uid, oid, sid, path, rstate, now))
        import sqlite3

        try:
            conn.executemany(
                "INSERT INTO item (oid, name, version, size, checksum, checksum_algo, item_type, "
                "target_phase, expires_at, owner, meta, parents, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 'file', ?, ?, ?, ?, '[]', ?, ?12, ?12)",
                item_rows,
            )
        except sqlite3.IntegrityError as exc:
            raise ConflictError(VERSIONS_TAKEN) from exc
        # The batch's replicas are the rows after the highest rowid now (this transaction holds
        # SQLite's write lock: no other writer), so their events are one INSERT ... SELECT.
        (last,) = conn.execute("SELECT coalesce(max(rowid), 0) FROM replica").fetchone()
        try:
            conn.executemany(
                "INSERT INTO replica (uid, item_oid, storage_id, path, state, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?6, ?6)",
                replica_rows,
            )
        except sqlite3.IntegrityError as exc:
            raise ConflictError(PATHS_TAKEN) from exc
        conn.execute(SQLITE_EVENTS, (self.actor, self.details, last))
        self.count += n
        self.ready += ready
        self.bytes += nbytes
        self.new_versions += again

    def close(self) -> None:
        import sqlite3

        if self.saved_cache is not None:
            with contextlib.suppress(sqlite3.Error):  # never hide the error being raised, if any
                self.conn.execute(f"PRAGMA cache_size = {int(self.saved_cache)}")
            self.saved_cache = None


# --------------------------------------------------------------------------- keys


class TimeOrderedIds:
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

    def take_bytes(self, n: int) -> list[bytes]:
        """The next `n` ids as 16 big-endian bytes each (uuid's binary form), ascending."""
        to_bytes: Callable[..., bytes] = int.to_bytes
        return [to_bytes(v, 16) for v in self.take(n)]
