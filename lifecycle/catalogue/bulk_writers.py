"""Write validated --from-list rows in bulk: binary COPY on PostgreSQL, one INSERT ... SELECT per
table and batch on SQLite, from a writer thread.

The rows come from bulk.py already checked (names, sizes, checksums, metadata, the same path
twice in a batch, links). What is left needs the database: whether a live copy already holds a
path (a copy in the catalogue, or one of an earlier batch) and the next version of each name.
The caller's thread turns each batch into the database's own format (COPY rows, a JSON
document) and hands it to a writer thread, which checks and writes it on the session's
connection while the caller's thread reads the next batch: the database and Python work at
the same time, on two cores. The writer thread spends its time in the database driver with
the GIL released (a COPY, or one SQLite statement for a whole batch), so the two threads do
not contend. At most one batch waits between them: memory stays bounded.

Long because the two databases' writers (COPY payloads and their check on PostgreSQL, JSON
documents and INSERT ... SELECT on SQLite) share the batch, thread and error handling here,
and splitting them would put the one-transaction contract in two places.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import struct
import sys
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
from lifecycle.states import EventKind, ItemState, ReplicaState

__all__ = ["MetaJson", "PostgresWriter", "SQLiteWriter", "TimeOrderedIds"]

_NOT_LIVE = f"('{ReplicaState.DELETED.value}', '{ReplicaState.LOST.value}')"  # copies that hold no path

PATHS_TAKEN = "another registration took some of the same paths at the same time; retry"
VERSIONS_TAKEN = "another registration added some of the same item versions at the same time; retry"


def taken_message(label: str, line: int, path: str, storage: str, name: str, version: int) -> str:
    return (
        f"{label} line {line}: path {path!r} on storage {storage!r} is already registered as "
        f"{name} v{version}; nothing was registered"
    )


def first_taken(label: str, storage: str, lines: dict[str, int], taken: list[Any]) -> ConflictError:
    """The refusal of the earliest line among `taken` (path, name, version) rows."""
    path, name, version = min(taken, key=lambda t: lines[t[0]])
    return ConflictError(taken_message(label, lines[path], path, storage, name, version))


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


class _FastHandOver:
    """A shorter GIL switch interval while any writer thread runs: each time the database answers,
    the writer thread must get the GIL back from the caller's thread (busy reading rows) to send
    the next statement, and at Python's default 5 ms the database would wait that long each time.
    Counted, so registrations in several threads at once restore the process's own interval."""

    INTERVAL = 0.0005

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.saved = 0.0

    def enter(self) -> None:
        with self.lock:
            if self.users == 0:
                self.saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self.saved, self.INTERVAL))
            self.users += 1

    def leave(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0:
                sys.setswitchinterval(self.saved)


_HANDOVER = _FastHandOver()


class _Writer:
    """Writes batches of checked rows (CheckedRow: metadata in meta_form, or None for the list's
    defaults) from a writer thread; subclasses per database turn a batch into a job (prepare,
    in the caller's thread) and write it (apply, in the writer thread).

    count, ready and bytes are the rows handed to write(); new_versions is final after finish().
    The session's connection belongs to the writer thread from the first write() until finish()
    or abort() returns.
    """

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
        self.conn: Any = session.connection().connection.driver_connection
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
        self.jobs: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.stopping = False
        self.thread: threading.Thread | None = None

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

    # ------------------------------------------------------------ the caller's thread

    def write(self, batch: list[CheckedRow], lines: dict[str, int]) -> None:
        """Prepare the batch (`lines`: each path's line number, for messages) and hand it to the
        writer thread, waiting while it still has one waiting. Raises the error an earlier
        batch met."""
        if self.error is not None:
            raise self.error
        job = self.prepare(batch, lines)
        if self.thread is None:
            self.start()
        self.jobs.put(job)

    def prepare(self, batch: list[CheckedRow], lines: dict[str, int]) -> tuple[Any, ...]:
        """The batch as the writer thread's job; adds to count, ready and bytes."""
        raise NotImplementedError

    def start(self) -> None:
        thread = threading.Thread(target=self._run, name="dlm-bulk-writer", daemon=True)
        _HANDOVER.enter()
        try:
            thread.start()
        except BaseException:
            _HANDOVER.leave()
            raise
        self.thread = thread

    def finish(self) -> None:
        """Wait until every batch is written; raise the first error a batch met."""
        self._stop()
        if self.error is not None:
            raise self.error

    def abort(self, *, drain: bool) -> BaseException | None:
        """Stop writing; with `drain`, after the batches handed over so far (they come before
        the caller's error, so a refusal among them is the one to name), else after the batch
        being written. The error a batch met, if any. The caller rolls back."""
        self.stopping = not drain
        self._stop()
        return self.error

    def _stop(self) -> None:
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()
            self.thread = None
            _HANDOVER.leave()

    def close(self) -> None:
        """Undo per-call connection settings (after finish or abort)."""

    # ------------------------------------------------------------ the writer thread

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None or self.stopping:
                continue  # a batch failed, or the caller's thread did: skip the rest, it rolls back
            try:
                self.apply(*job)
            except BaseException as exc:  # handed to the caller's thread
                self.error = exc

    def apply(self, *job: Any) -> None:
        """Check and write one prepared batch; adds to new_versions."""
        raise NotImplementedError

    def versions(self, names: list[str], current: dict[str, int]) -> list[int]:
        """The version of each row (next after the catalogue's and earlier rows'); [] when every
        row is version 1. `current` maps the names the catalogue holds to their highest version.
        Adds the rows of version 2 and more to new_versions."""
        if not current and len(set(names)) == len(names):
            return []
        out = []
        again = 0
        get = current.get
        for name in names:
            v = get(name, 0) + 1
            current[name] = v
            out.append(v)
            if v > 1:
                again += 1
        self.new_versions += again
        return out


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


_FILE = _text("file")

# The columns of the binary rows (item's version last: the writer thread adds it).
ITEM_COLUMNS = (
    "oid, name, size, checksum, checksum_algo, item_type, target_phase, expires_at, owner, meta, "
    "parents, state, created_at, updated_at, version"
)
REPLICA_COLUMNS = "uid, item_oid, storage_id, path, state, expires_at, verified_at, created_at, updated_at"
EVENT_COLUMNS = "ts, kind, item_oid, replica_uid, storage_id, actor, details"

# One round trip per batch: the live copies holding one of its paths, then the highest version
# of each of its names. Names and paths never hold a newline (no control characters), so each
# list goes as one text that the server splits.
PG_CHECK = (
    "SELECT r.path, i.name, i.version FROM replica r JOIN item i ON i.oid = r.item_oid "
    "WHERE r.storage_id = %s AND r.path = ANY(string_to_array(%s, E'\\n')) "
    f"AND r.state NOT IN {_NOT_LIVE} "
    "UNION ALL SELECT NULL, name, max(version) FROM item "
    "WHERE name = ANY(string_to_array(%s, E'\\n')) GROUP BY name"
)


class PostgresWriter(_Writer):
    """Binary COPY into item, replica and event through the session's own psycopg connection.

    Binary rows spare the server parsing uuids, timestamps and numbers from text: the server's
    work is what bounds a load (the rows' indexes, the replica's foreign-key checks)."""

    def __init__(self, session: Session, **kwargs: Any) -> None:
        super().__init__(session, **kwargs)
        now = _ts(self.now)
        sid = self.storage_id.bytes
        # Constant runs of fields, so a row is a few joins.
        self.item_head = struct.pack(">h", 15) + _UUID
        self.owner_blob = _NULL if self.owner is None else _text(self.owner)
        self.expiry_blob = _NULL if self.default_expiry is None else _ts(self.default_expiry)
        self.algo_blobs: dict[str | None, bytes] = {None: _NULL}
        self.mid_blobs: dict[tuple[Any, ...], bytes] = {}
        tail = _jsonb(b"[]")
        self.item_tails = {
            True: tail + _text(ItemState.READY.value) + now + now,
            False: tail + _text(ItemState.INITIALISED.value) + now + now,
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

    @staticmethod
    def meta_form(data: bytes) -> bytes:
        return _jsonb(data)

    def prepare(self, batch: list[CheckedRow], lines: dict[str, int]) -> tuple[Any, ...]:
        n = len(batch)
        ids = self.ids.take_bytes(2 * n)
        items: list[bytes] = []
        replicas: list[bytes] = []
        events: list[bytes] = []
        names: list[str] = []
        add_item, add_replica, add_event = items.append, replicas.append, events.append
        add_name = names.append
        item_head, item_tails = self.item_head, self.item_tails
        replica_head, replica_mid, replica_tails = self.replica_head, self.replica_mid, self.replica_tails
        event_heads, event_tail = self.event_heads, self.event_tail
        mid_of, default_meta = self._mid, self.check_meta.default
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
            path_blob = name_blob if path is name else _text(path)
            add_replica(
                b"".join((replica_head, uid, _UUID, oid, replica_mid, path_blob, replica_tails[done]))
            )
            add_event(b"".join((event_heads[done], oid, _UUID, uid, event_tail)))
        self.count += n
        self.ready += ready
        self.bytes += nbytes
        # Everything the writer thread can be spared is done here: it needs the GIL for each
        # step between statements, and this thread holds it most of the time.
        return (
            names,
            lines,
            "\n".join(lines),
            "\n".join(names),
            items,
            b"".join((_HEADER, _V1.join(items), _V1, _TRAILER)),  # every row version 1, the usual case
            b"".join((_HEADER, *replicas, _TRAILER)),
            b"".join((_HEADER, *events, _TRAILER)),
        )

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
                    _text(self.phase if phase is None else phase),
                    self.expiry_blob if expires is None else _ts(expires),
                    self.owner_blob if owner is None else _text(owner),
                )
            )
            if len(self.mid_blobs) < 4096:  # rows with their own expiry or owner: a bounded cache
                self.mid_blobs[key] = blob
        return blob

    def apply(
        self,
        names: list[str],
        lines: dict[str, int],
        paths_text: str,
        names_text: str,
        items: list[bytes],
        *data: bytes,
    ) -> None:
        import psycopg

        with self.conn.cursor() as cur:
            cur.execute(PG_CHECK, (self.storage_id, paths_text, names_text))
            taken, current = [], {}
            for path, name, version in cur:
                if path is None:
                    current[name] = version
                else:
                    taken.append((path, name, version))
            if taken:
                raise first_taken(self.label, self.storage_name, lines, taken)
            versions = self.versions(names, current)
            if versions:  # names the catalogue or the list already holds: each row with its version
                tails = [_i32i32(4, v) for v in versions]
                data = (
                    b"".join((_HEADER, *itertools.chain(*zip(items, tails, strict=True)), _TRAILER)),
                    *data[1:],
                )
            try:
                for (table, columns), rows in zip(
                    (("item", ITEM_COLUMNS), ("replica", REPLICA_COLUMNS), ("event", EVENT_COLUMNS)),
                    data,
                    strict=True,
                ):
                    with cur.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                        copy.write(rows)
            except psycopg.errors.UniqueViolation as exc:  # a concurrent registration, after the check
                raise ConflictError(
                    PATHS_TAKEN if "uq_replica_storage_path_live" in str(exc) else VERSIONS_TAKEN
                ) from exc


# --------------------------------------------------------------------------- SQLite

SQLITE_CACHE_KIB = 64 * 1024  # page cache while a list loads (SQLite's default is 2 MiB)

# Each statement reads a batch from one JSON document (json_each), so a batch is one call into
# SQLite per table, with the GIL released, instead of a Python call per row. CROSS JOIN keeps
# the document the outer loop (one index search per row).
SQLITE_TAKEN = (
    "SELECT r.path, i.name, i.version FROM json_each(?1) AS p CROSS JOIN replica AS r "
    "CROSS JOIN item AS i WHERE r.storage_id = ?2 AND r.path = p.value AND i.oid = r.item_oid "
    f"AND r.state NOT IN {_NOT_LIVE}"
)
SQLITE_VERSIONS = (
    "SELECT i.name, max(i.version) FROM json_each(?1) AS n CROSS JOIN item AS i "
    "WHERE i.name = n.value GROUP BY i.name"
)
SQLITE_ITEMS = (
    "INSERT INTO item (oid, name, size, checksum, checksum_algo, target_phase, expires_at, owner, "
    "meta, state, version, item_type, parents, created_at, updated_at) SELECT "
    + ", ".join(f"json_extract(value, '$[{i}]')" for i in range(10))
    + ", coalesce(json_extract(value, '$[10]'), 1), 'file', '[]', ?2, ?2 FROM json_each(?1)"
)
SQLITE_REPLICAS = (
    "INSERT INTO replica (uid, item_oid, path, state, storage_id, created_at, updated_at) SELECT "
    + ", ".join(f"json_extract(value, '$[{i}]')" for i in range(4))
    + ", ?2, ?3, ?3 FROM json_each(?1)"
)
# The batch's replicas are the rows after the highest rowid before it (the transaction holds
# SQLite's write lock: no other writer), so their events are one INSERT ... SELECT.
SQLITE_EVENTS = (
    "INSERT INTO event (ts, kind, item_oid, replica_uid, storage_id, actor, details) "
    f"SELECT created_at, CASE state WHEN '{ReplicaState.READY.value}' THEN '{EventKind.ITEM_READY.value}' "
    f"ELSE '{EventKind.ITEM_REGISTERED.value}' END, item_oid, uid, storage_id, ?1, ?2 "
    "FROM replica WHERE rowid > ?3 ORDER BY rowid"
)


def _json_text(value: Any) -> str:
    """A JSON document for json_each, bound as text (SQLite 3.45+ reads a BLOB as its binary JSONB)."""
    return orjson.dumps(value).decode()


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


class SQLiteWriter(_Writer):
    """INSERT ... SELECT from a JSON document per table and batch, through the session's own
    sqlite3 connection (which SQLAlchemy opens without sqlite3's same-thread check)."""

    def __init__(self, session: Session, **kwargs: Any) -> None:
        super().__init__(session, **kwargs)
        self.now_text = _sqlite_time(self.now)
        self.sid = self.storage_id.hex
        self.expiry_text = None if self.default_expiry is None else _sqlite_time(self.default_expiry)
        self.details = orjson.dumps({"bulk": True}).decode()
        self.saved_cache: int | None = None

    @staticmethod
    def meta_form(data: bytes) -> str:
        return data.decode()

    def prepare(self, batch: list[CheckedRow], lines: dict[str, int]) -> tuple[Any, ...]:
        if self.saved_cache is None:  # before the writer thread starts
            self.saved_cache = self.conn.execute("PRAGMA cache_size").fetchone()[0]
            self.conn.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
        n = len(batch)
        ids = [f"{v:032x}" for v in self.ids.take(2 * n)]
        default_owner, default_expiry, default_phase = self.owner, self.expiry_text, self.phase
        default_meta = self.check_meta.default
        items: list[tuple[Any, ...]] = []
        replicas: list[tuple[Any, ...]] = []
        names: list[str] = []
        add_item, add_replica, add_name = items.append, replicas.append, names.append
        ready = nbytes = 0
        for (name, path, size, checksum, algo, phase, expires, owner, meta, _line), oid, uid in zip(
            batch, ids[:n], ids[n:], strict=True
        ):
            nbytes += size
            add_name(name)
            if checksum is None:
                state, rstate = ItemState.INITIALISED.value, ReplicaState.PENDING.value
            else:
                state, rstate = ItemState.READY.value, ReplicaState.READY.value
                ready += 1
            add_item(
                (
                    oid,
                    name,
                    size,
                    checksum,
                    algo,
                    phase or default_phase,
                    default_expiry if expires is None else _sqlite_time(expires),
                    default_owner if owner is None else owner,
                    default_meta if meta is None else meta,
                    state,
                )
            )
            add_replica((uid, oid, path, rstate))
        self.count += n
        self.ready += ready
        self.bytes += nbytes
        return (
            names,
            lines,
            _json_text(list(lines)),
            _json_text(names),
            items,
            _json_text(items),
            _json_text(replicas),
        )

    def apply(
        self,
        names: list[str],
        lines: dict[str, int],
        paths_doc: str,
        names_doc: str,
        items: list[tuple[Any, ...]],
        item_doc: str,
        replica_doc: str,
    ) -> None:
        import sqlite3

        conn = self.conn
        taken = conn.execute(SQLITE_TAKEN, (paths_doc, self.sid)).fetchall()
        if taken:
            raise first_taken(self.label, self.storage_name, lines, taken)
        versions = self.versions(names, dict(conn.execute(SQLITE_VERSIONS, (names_doc,))))
        if versions:  # names the catalogue or the list already holds: each row with its version
            item_doc = _json_text([(*row, v) for row, v in zip(items, versions, strict=True)])
        try:
            conn.execute(SQLITE_ITEMS, (item_doc, self.now_text))
        except sqlite3.IntegrityError as exc:  # cannot happen while the transaction holds the write lock
            raise ConflictError(VERSIONS_TAKEN) from exc
        (last,) = conn.execute("SELECT coalesce(max(rowid), 0) FROM replica").fetchone()
        try:
            conn.execute(SQLITE_REPLICAS, (replica_doc, self.sid, self.now_text))
        except sqlite3.IntegrityError as exc:
            raise ConflictError(PATHS_TAKEN) from exc
        conn.execute(SQLITE_EVENTS, (self.actor, self.details, last))

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
