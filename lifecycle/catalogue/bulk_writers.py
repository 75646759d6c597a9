"""Write validated --from-list rows in bulk: COPY on PostgreSQL, multi-row INSERT on SQLite."""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from lifecycle.catalogue.bulk_sources import Row
from lifecycle.catalogue.metadata import MAX_META_BYTES, MAX_META_DEPTH, merged, validate_metadata
from lifecycle.catalogue.sql import chunks, core_table
from lifecycle.errors import (
    ConflictError,
)
from lifecycle.states import EventKind, ItemState, ItemType, ReplicaState

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
        self.ids = TimeOrderedIds()

    def write(self, batch: list[Row]) -> None:
        """Insert the batch and add it to the running totals."""
        raise NotImplementedError

    def max_versions(self, names: list[str]) -> dict[str, int]:
        raise NotImplementedError

    def versions(self, batch: list[Row]) -> tuple[list[int], int]:
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
        """Metadata (keys in NFC) and its JSON text, refused as lifecycle.catalogue.metadata says (NUL,
        control characters in keys, over 64 KiB, nested too deeply); plain ASCII metadata with
        few objects and arrays skips the full walk."""
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
        return meta, data.decode()

    def merged_meta(self, row_meta: dict[str, Any] | None) -> dict[str, Any]:
        if row_meta is None:
            return self.meta
        if not self.meta:
            return row_meta
        return merged(self.meta, row_meta)  # nested keys of the defaults survive


def _copy_text(value: str) -> str:
    """A value escaped for COPY's text format (names and paths never need it: they are validated)."""
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    return value


class PostgresWriter(_Writer):
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

    def write(self, batch: list[Row]) -> None:
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
                state, rstate, kind, ck = "INITIALISED", "PENDING", EventKind.ITEM_REGISTERED, "\\N"
            else:
                state, rstate, kind, ck = "READY", "READY", EventKind.ITEM_READY, checksum
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
                    ("item", ITEM_COLUMNS, items),
                    ("replica", REPLICA_COLUMNS, replicas),
                    ("event", EVENT_COLUMNS, events),
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


class SQLiteWriter(_Writer):
    """Core executemany inserts (SQLite, and any other database SQLAlchemy reaches)."""

    def __init__(self, session: Session, **kwargs: Any) -> None:
        super().__init__(session, **kwargs)
        self.item_table = core_table("item")
        self.replica_table = core_table("replica")
        self.event_table = core_table("event")

    def max_versions(self, names: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for chunk in chunks(names, SQLITE_IN_CHUNK):
            t = self.item_table
            result = self.session.execute(
                select(t.c.name, func.max(t.c.version)).where(t.c.name.in_(chunk)).group_by(t.c.name)
            )
            out.update({name: version for name, version in result})
        return out

    def write(self, batch: list[Row]) -> None:
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
                state, rstate, kind = ItemState.INITIALISED, ReplicaState.PENDING, EventKind.ITEM_REGISTERED
            else:
                state, rstate, kind = ItemState.READY, ReplicaState.READY, EventKind.ITEM_READY
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
                    "kind": kind.value,
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


SQLITE_IN_CHUNK = 500

ITEM_COLUMNS = (
    "oid, name, version, size, checksum, checksum_algo, item_type, target_phase, expires_at, "
    "owner, meta, parents, state, created_at, updated_at"
)
REPLICA_COLUMNS = "uid, item_oid, storage_id, path, state, expires_at, verified_at, created_at, updated_at"
EVENT_COLUMNS = "ts, kind, item_oid, replica_uid, storage_id, actor, details"


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
