"""Crash recovery: settles the in-flight rows (PENDING, COPYING, DELETING) that a dead run left.

A row is dead when the process that claimed it (`claimed_by` = host:pid) is gone from this
host, or when it has not moved for `stale_after` (a run on another host that died). Each
dead row is settled against what the storage really holds, with one rclone call per storage:

- PENDING/COPYING: the copy is at the destination with the item's checksum -> READY (the
  work was done); otherwise the claim is removed (and its transfer FAILED) so the catalogue
  never claims a copy that is not there; a partial object left behind is deleted.
  (A PENDING row of an item without a checksum, a bulk-listed file awaiting its checksum,
  is not in flight and is left alone.)
- DELETING: the object is gone -> DELETED; it is still there -> back to READY (the next
  planning run decides again), unless the item itself expired, in which case it is deleted.

It also removes the temporary upload files (`.dlm-tmp-<host>-<pid>-<random>`) that dead
processes left on posix storages: a writer on this host that is gone, one on another host
(or an old-style `.dlm-tmp-<random>`) only once the file is older than `stale_after`. A live
writer's file and any path a catalogue copy holds are never touched.
"""

from __future__ import annotations

import os
import socket
import stat
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlmodel import Session, col

from lifecycle.catalogue import audit
from lifecycle.catalogue.models import Item, Replica, Storage, Transfer, utcnow
from lifecycle.catalogue.sql import chunks
from lifecycle.errors import DLMError
from lifecycle.planning.snapshot import REPLICA_COLUMNS
from lifecycle.states import EventKind, ItemState, ReplicaState, StorageKind, StorageState, TransferState
from lifecycle.storage.backends import backend_for, copy_needs_read_back
from lifecycle.storage.posix import TEMP_PREFIX
from lifecycle.transfer.log import HASHES
from lifecycle.transfer.operations import delete_files, hashsum

IN_FLIGHT = (ReplicaState.PENDING.value, ReplicaState.COPYING.value, ReplicaState.DELETING.value)
_TEMP_EVENT_PATHS = 20


@dataclass
class RecoveryReport:
    completed: int = 0  # copies found intact: READY
    rolled_back: int = 0  # claims removed
    deleted: int = 0  # DELETING rows whose object is gone
    restored: int = 0  # DELETING rows back to READY
    skipped_live: int = 0  # rows held by a live process
    temp_removed: int = 0  # temporary upload files of dead processes removed
    temp_removed_bytes: int = 0
    temp_kept_live: int = 0  # temporary files of live (or not yet stale) writers left alone
    errors: dict[str, str] = field(default_factory=dict)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_is_dead(claimed_by: str | None, *, stale: bool) -> bool:
    """Whether the process that holds a row is gone: same host and no such pid, or stale."""
    if stale:
        return True
    if not claimed_by:
        return False
    host, _, pid = claimed_by.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return int(pid) != os.getpid() and not _pid_alive(int(pid))


def temp_writer(name: str) -> tuple[str, int] | None:
    """(host, pid) of the process that named a temporary file `.dlm-tmp-<host>-<pid>-<random>`;
    None for an old-style `.dlm-tmp-<random>` name (or any other)."""
    if not name.startswith(TEMP_PREFIX):
        return None
    parts = name[len(TEMP_PREFIX) :].rsplit("-", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or not parts[2]:
        return None
    return parts[0], int(parts[1])


def temp_is_dead(name: str, *, mtime: float, stale_after: timedelta, now: float | None = None) -> bool:
    """Whether a temporary file's writer is gone: on this host its pid is not alive (and it is
    not this process); on another host, or for an old-style name, the file is older than
    `stale_after`."""
    stale = mtime < (time.time() if now is None else now) - stale_after.total_seconds()
    writer = temp_writer(name)
    if writer is None:
        return stale
    host, pid = writer
    if host != socket.gethostname():
        return stale
    return pid != os.getpid() and not _pid_alive(pid)


def remove_dead_temp_files(
    session: Session,
    *,
    stale_after: timedelta,
    actor: str = "dlm",
    report: RecoveryReport | None = None,
    dry_run: bool = False,
) -> RecoveryReport:
    """Remove the temporary upload files of dead processes under the root of every online or
    draining posix storage (a walk that follows no symlink); count and bytes in the report,
    one `storage.temp_removed` event per storage. Files whose path a catalogue copy holds are
    kept. An unreadable tree is reported per storage. With `dry_run`, only count what would
    be removed (nothing removed, no event). Raises TransientError (catalogue)."""
    report = report or RecoveryReport()
    storages = session.execute(
        select(col(Storage.id), col(Storage.name), col(Storage.root)).where(
            col(Storage.kind) == StorageKind.POSIX.value,
            col(Storage.state).in_([StorageState.ONLINE.value, StorageState.DRAINING.value]),
        )
    ).all()
    events: list[audit.EventRow] = []
    for storage_id, name, root in storages:
        found: dict[str, tuple[str, int]] = {}  # relative path -> (full path, size)
        try:
            for dirpath, _dirnames, filenames in os.walk(root, onerror=_raise):
                for fname in filenames:
                    if not fname.startswith(TEMP_PREFIX):
                        continue
                    full = os.path.join(dirpath, fname)
                    try:
                        st = os.lstat(full)
                    except FileNotFoundError:
                        continue  # its writer finished meanwhile
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    if not temp_is_dead(fname, mtime=st.st_mtime, stale_after=stale_after):
                        report.temp_kept_live += 1
                        continue
                    rel = os.path.relpath(full, root).replace(os.sep, "/")
                    found[rel] = (full, st.st_size)
        except OSError as exc:
            report.errors[name] = f"cannot look for temporary files under {root}: {exc}"
            continue
        if found:
            held: set[str] = set()
            paths = list(found)
            for chunk in chunks(paths):
                held.update(
                    session.execute(
                        select(col(Replica.path)).where(
                            col(Replica.storage_id) == storage_id,
                            col(Replica.path).in_(chunk),
                            col(Replica.state) != ReplicaState.DELETED.value,
                        )
                    ).scalars()
                )
            removed: list[str] = []
            nbytes = 0
            for rel, (full, size) in sorted(found.items()):
                if rel in held:
                    continue
                try:
                    if not dry_run:
                        os.unlink(full)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    report.errors[name] = f"cannot remove the temporary file {rel!r}: {exc}"
                    continue
                removed.append(rel)
                nbytes += size
            if removed:
                report.temp_removed += len(removed)
                report.temp_removed_bytes += nbytes
                events.append(
                    {
                        "kind": EventKind.STORAGE_TEMP_REMOVED,
                        "storage_id": storage_id,
                        "actor": actor,
                        "details": {
                            "count": len(removed),
                            "bytes": nbytes,
                            "paths": removed[:_TEMP_EVENT_PATHS],
                        },
                    }
                )
    if not dry_run:
        audit.record_many(session, events)
    return report


def _raise(exc: OSError) -> None:
    raise exc


def rows_in_flight(session: Session, *, stale_after: timedelta) -> bool:
    """Whether recovery has rows to look at: a copy or deletion in flight (a live run's, or a
    dead one's to settle), or a transfer a dead run left RUNNING. Reads only; cheap (no
    storage is touched), so a run with nothing to do can tell it needs no recovery."""
    cutoff = utcnow() - stale_after
    in_flight = select(col(Replica.uid)).where(col(Replica.state).in_(IN_FLIGHT)).limit(1)
    abandoned = (
        select(col(Transfer.id))
        .where(col(Transfer.state) == TransferState.RUNNING.value, col(Transfer.started_at) < cutoff)
        .limit(1)
    )
    return session.execute(in_flight).first() is not None or session.execute(abandoned).first() is not None


def settle_in_flight(session: Session, *, stale_after: timedelta, actor: str = "dlm") -> RecoveryReport:
    """Settle every dead in-flight row and remove dead processes' temporary upload files (see
    the module docstring). Storage errors are reported per storage and leave its rows for the
    next run. Raises TransientError (catalogue)."""
    report = RecoveryReport()
    remove_dead_temp_files(session, stale_after=stale_after, actor=actor, report=report)
    cutoff = utcnow() - stale_after
    rows = session.execute(
        select(
            *REPLICA_COLUMNS,
            col(Replica.claimed_by),
            col(Replica.updated_at),
            col(Item.checksum),
            col(Item.checksum_algo),
            col(Item.state),
            col(Item.size),
        )
        .join(Item, col(Item.oid) == col(Replica.item_oid))
        .where(
            col(Replica.state).in_(IN_FLIGHT),
            # A PENDING copy of an item without a checksum is no copy in flight: a bulk-listed
            # file (`ingest --from-list` without checksums) that waits to be checksummed. Its
            # bytes are the user's: with nothing to compare them to, they are never judged.
            or_(col(Replica.state) != ReplicaState.PENDING.value, col(Item.checksum).is_not(None)),
        )
    ).all()
    dead = [r for r in rows if claim_is_dead(r[5], stale=r[6] < cutoff)]
    report.skipped_live = len(rows) - len(dead)
    by_storage: dict[uuid.UUID, list[Any]] = defaultdict(list)
    for r in dead:
        by_storage[r[2]].append(r)
    events: list[audit.EventRow] = []
    now = utcnow()
    for storage_id, group in by_storage.items():
        storage = session.get_one(Storage, storage_id)
        if storage.state in (StorageState.OFFLINE, StorageState.RETIRED):
            continue
        target = backend_for(storage).rclone_target()
        try:
            present: dict[str, str] = {}
            # a copy whose digest rclone may take from its source's stored hash is hashed from
            # its bytes (its source is not known here: taken as remote)
            by_algo: dict[tuple[str, bool], list[str]] = defaultdict(list)
            for r in group:
                read_back = copy_needs_read_back(None, storage.kind, int(r[10]))
                by_algo[(r[8] or "md5", read_back)].append(r[3])
            sizes = {r[3]: int(r[10]) for r in group}
            for (algo, read_back), paths in by_algo.items():
                present.update(
                    hashsum(
                        target,
                        paths,
                        algo if algo in HASHES else "md5",
                        download=True if read_back else None,
                        nbytes=sum(sizes[p] for p in paths),
                    )
                )
        except DLMError as exc:
            report.errors[storage.name] = str(exc)
            continue
        copies = [r for r in group if r[4] != ReplicaState.DELETING.value]
        deletes = [r for r in group if r[4] == ReplicaState.DELETING.value]
        good = [r for r in copies if (present.get(r[3]) or "").lower() == (r[7] or "").lower() and r[7]]
        bad = [r for r in copies if r not in good]
        partial = [r[3] for r in bad if r[3] in present]
        if partial:
            delete_files(target, partial)
        if good:
            session.execute(
                update(Replica)
                .where(col(Replica.uid).in_([r[0] for r in good]))
                .values(state=ReplicaState.READY.value, verified_at=now, updated_at=now, claimed_by=None)
            )
            session.execute(
                update(Storage)
                .where(col(Storage.id) == storage_id)
                .values(used_bytes=col(Storage.used_bytes) + sum(int(r[10]) for r in good))
            )
        if bad:
            session.execute(delete(Replica).where(col(Replica.uid).in_([r[0] for r in bad])))
        uids = [r[0] for r in copies]
        if uids:
            for r in copies:
                ok = r in good
                session.execute(
                    update(Transfer)
                    .where(
                        col(Transfer.replica_uid) == r[0],
                        col(Transfer.state).in_([TransferState.RUNNING.value, TransferState.PENDING.value]),
                    )
                    .values(
                        state=TransferState.DONE.value if ok else TransferState.FAILED.value,
                        error=None if ok else "the run died before the copy was complete; rolled back",
                        finished_at=now,
                        replica_uid=r[0] if ok else None,
                    )
                )
        for r in good:
            events.append(
                _event(EventKind.REPLICA_CREATED, r, storage_id, actor, {"recovered": True, "path": r[3]})
            )
        for r in bad:
            events.append(
                _event(
                    EventKind.TRANSFER_FAILED,
                    r,
                    storage_id,
                    actor,
                    {"recovered": True, "error": "run died mid-copy"},
                )
            )
        gone = [r for r in deletes if r[3] not in present]
        still = [r for r in deletes if r[3] in present]
        expired = [r for r in still if r[9] in (ItemState.EXPIRED.value, ItemState.DELETED.value)]
        if expired:
            res = delete_files(target, [r[3] for r in expired])
            gone += [r for r in expired if r[3] in res.ok]
        restore = [r for r in still if r not in gone]
        if gone:
            session.execute(
                update(Replica)
                .where(col(Replica.uid).in_([r[0] for r in gone]))
                .values(state=ReplicaState.DELETED.value, updated_at=now, claimed_by=None)
            )
            session.execute(
                update(Storage)
                .where(col(Storage.id) == storage_id)
                .values(used_bytes=col(Storage.used_bytes) - sum(int(r[10]) for r in gone))
            )
            events += [
                _event(EventKind.REPLICA_DELETED, r, storage_id, actor, {"recovered": True}) for r in gone
            ]
        if restore:
            session.execute(
                update(Replica)
                .where(col(Replica.uid).in_([r[0] for r in restore]))
                .values(state=ReplicaState.READY.value, updated_at=now, claimed_by=None)
            )
            events += [
                _event(EventKind.REPLICA_RESTORED, r, storage_id, actor, {"recovered": True}) for r in restore
            ]
        report.completed += len(good)
        report.rolled_back += len(bad)
        report.deleted += len(gone)
        report.restored += len(restore)
    # transfers whose run died before it claimed anything, or long gone
    session.execute(
        update(Transfer)
        .where(
            col(Transfer.state) == TransferState.RUNNING.value,
            or_(col(Transfer.replica_uid).is_(None), col(Transfer.started_at) < cutoff),
            col(Transfer.started_at) < cutoff,
        )
        .values(state=TransferState.FAILED.value, error="abandoned by a run that died", finished_at=now)
    )
    audit.record_many(session, events)
    return report


def _event(
    kind: EventKind, row: Any, storage_id: uuid.UUID, actor: str, details: dict[str, Any]
) -> audit.EventRow:
    return {
        "kind": kind,
        "item_oid": row[1],
        "replica_uid": row[0],
        "storage_id": storage_id,
        "actor": actor,
        "details": details,
    }
