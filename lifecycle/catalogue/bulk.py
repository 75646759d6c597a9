"""Bulk registration of payloads already on a storage from a JSON-lines or CSV list (--from-list)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import text, update
from sqlmodel import Session

from lifecycle.catalogue.bulk_sources import CheckedRow, Row, RowError, Source
from lifecycle.catalogue.bulk_writers import MetaJson, PostgresWriter, SQLiteWriter
from lifecycle.catalogue.inputs import ItemOptions
from lifecycle.catalogue.models import Storage, utcnow
from lifecycle.catalogue.sql import core_table
from lifecycle.errors import (
    ConflictError,
    InvalidNameError,
    InvalidValueError,
    UserInputError,
)
from lifecycle.links import LinkGuard
from lifecycle.states import Phase, StorageKind, StorageState
from lifecycle.units import MAX_BYTES

__all__ = ["BulkResult", "register_from_list"]

FORMATS = ("auto", "jsonl", "csv")

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

    The file is streamed in batches of `batch_size` rows (memory stays bounded: at most one
    batch waits to be written while the next is read); rows go in with binary COPY on
    PostgreSQL and one INSERT ... SELECT per table and batch on SQLite, written by a thread of
    their own while this one reads and checks the next batch (lifecycle.catalogue.bulk_writers),
    with one Event per item (written directly: bulk events are not handed to audit
    publishers). Everything happens in the caller's transaction and nothing is committed here,
    so an error leaves the catalogue as it was once the caller rolls back. `progress` is called
    with the running count after each batch is handed over.

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
    # the defaults go through the same input model as ingest's options (rows share its rules)
    defaults = ItemOptions(phase=phase, lifetime=lifetime, metadata={} if meta is None else meta, owner=owner)
    meta, owner = defaults.metadata, defaults.owner
    phase_value = defaults.phase.value
    now = utcnow()
    default_expiry = defaults.expiry(now)
    session.flush()  # the storage row (and anything else pending) must exist for the foreign keys
    dialect = session.get_bind().dialect.name
    writer_class = PostgresWriter if dialect == "postgresql" else SQLiteWriter
    writer = writer_class(
        session,
        storage_id=storage.id,
        storage_name=storage.name,
        now=now,
        actor=actor,
        owner=owner,
        phase=phase_value,
        default_expiry=default_expiry,
        meta=meta or {},
    )
    # On a posix storage, no path that is or goes through a link, nor a file with other names.
    guard = LinkGuard(storage.root) if storage.kind == StorageKind.POSIX.value else None
    try:
        with Source(source, fmt) as (label, records, parse):
            writer.label = label
            rows = _batches(label, records, parse, writer.check_meta, guard, storage.name, batch_size)
            for batch, lines in rows:
                writer.write(batch, lines)
                if progress is not None:
                    progress(writer.count)
        writer.finish()
    except BaseException as exc:
        # The writer thread is done with the connection once abort returns; after a bad row it
        # first writes the batches before it, whose refusal, if any, comes first (its line does).
        bad_row = isinstance(exc, UserInputError)
        earlier = writer.abort(drain=bad_row)
        if bad_row and earlier is not None and earlier is not exc:
            raise earlier from None
        raise
    finally:
        writer.close()
    nbytes = writer.bytes

    if nbytes:
        table = core_table("storage")
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


def _batches(
    label: str,
    records: Iterator[tuple[int, Any]],
    parse: Callable[[Any, int], Row],
    check_meta: MetaJson,
    guard: LinkGuard | None,
    storage: str,
    batch_size: int,
) -> Iterator[tuple[list[CheckedRow], dict[str, int]]]:
    """The list's rows checked one by one in line order, in batches with each path's line.

    Everything that needs no database is checked here, so the first bad line is the one named:
    the row itself (bulk_sources), a path an earlier row of the batch holds (a path held by
    an earlier batch, or by a live copy in the catalogue, the writer refuses: one query per
    batch), with `guard` (a posix storage) a path that is or goes through a symbolic link or
    a file with other names (a hard link; one lstat per path, directories cached), and the
    metadata merged under the list's defaults.

    Raises InvalidValueError (bad row, the same path twice, sizes adding up past 2**63-1 bytes:
    the storage's used bytes could not count them), InvalidNameError (bad name, a
    link), InvalidMetadataError, each naming the line."""
    batch: list[CheckedRow] = []
    lines: dict[str, int] = {}
    total = 0
    add = batch.append
    first_line = lines.setdefault
    for lineno, record in records:
        try:
            row = parse(record, lineno)
        except RowError as exc:
            raise exc.cls(f"{label} line {lineno}: {exc.message}") from None
        total += row[2]
        if total > MAX_BYTES:
            raise InvalidValueError(
                f"{label} line {lineno}: the sizes listed up to here add up to more than "
                f"{MAX_BYTES} bytes, more than any storage holds"
            )
        path = row[1]
        first = first_line(path, lineno)
        if first != lineno:
            raise InvalidValueError(
                f"{label} line {lineno}: path {path!r} is already listed on line {first}: "
                "one file can belong to one item only"
            )
        if guard is not None:
            why = guard.why_refused(path, one_name=True)
            if why is not None:
                raise InvalidNameError(
                    f"{label} line {lineno}: path {path!r} on storage {storage!r} {why}; "
                    "nothing was registered"
                )
        meta = row[8]
        add(row if meta is None else (*row[:8], check_meta(meta, lineno), lineno))
        if len(batch) >= batch_size:
            yield batch, lines
            batch, lines = [], {}
            add, first_line = batch.append, lines.setdefault
    if batch:
        yield batch, lines
