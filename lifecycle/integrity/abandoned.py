"""Uploads nobody finished: items registered for an upload through the API (INITIALISED, with
the declared checksum) that are still INITIALISED `timeout` after they were registered
(DLM_UPLOAD__TIMEOUT, 24h by default). The expire pipeline settles them before it plans:

- the object holds exactly the declared bytes (the client uploaded them but never called
  `POST /items/{oid}/ready`): the upload is finished as `ready` would have finished it (copy
  and item READY, `replica.created`, `item.ready`). Bytes the client declared and sent are
  never deleted;
- otherwise (nothing uploaded, or other bytes, e.g. a PUT cut short): the object, if there is
  one, is deleted, the copy becomes DELETED (`replica.deleted`) and the item a DELETED tombstone
  (`item.upload_aborted`, saying what was found).

Only items with a checksum are taken: a file listed by `ingest --from-list` without one is
INITIALISED too, but it is the user's file, waiting for its checksum, and is never touched.
One listing (`rclone hashsum`) and at most one deletion process per storage, bulk updates, at
most `limit` items per run (the oldest first). An item whose storage is offline or cannot be
read is left for a later run. On PostgreSQL the items are locked (SKIP LOCKED), so a concurrent
`ready` either finishes first or finds the item settled.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlmodel import Session, col

from lifecycle.catalogue import audit
from lifecycle.catalogue.models import Item, Replica, Storage, utcnow
from lifecycle.catalogue.sql import chunks
from lifecycle.errors import DLMError
from lifecycle.states import EventKind, ItemState, ReplicaState, StorageState
from lifecycle.storage.backends import backend_for
from lifecycle.transfer.log import HASHES
from lifecycle.transfer.operations import delete_files, hashsum

MAX_PER_RUN = 10_000
_SETTLED = (ReplicaState.PENDING.value, ReplicaState.READY.value)
_REACHABLE = (StorageState.ONLINE.value, StorageState.DRAINING.value)


@dataclass
class AbandonedReport:
    aborted: int = 0  # items made DELETED tombstones
    finished: int = 0  # items whose bytes were complete: made READY
    removed: int = 0  # objects that were not the declared bytes, deleted
    left: int = 0  # items left for a later run (a storage offline or unreadable)
    errors: dict[str, str] = field(default_factory=dict)  # storage name -> why


@dataclass
class _Upload:
    oid: uuid.UUID
    name: str
    version: int
    size: int
    checksum: str
    algo: str
    copies: list[Any] = field(default_factory=list)  # (uid, storage_id, path, state)


def _abandoned(timeout: timedelta) -> tuple[Any, ...]:
    """The items that are uploads nobody finished within `timeout` (declared checksum, still
    INITIALISED)."""
    return (
        col(Item.state) == ItemState.INITIALISED.value,
        col(Item.checksum).is_not(None),
        col(Item.created_at) < utcnow() - timeout,
    )


def any_abandoned_uploads(session: Session, *, timeout: timedelta) -> bool:
    """Whether an expire run has an unfinished upload to settle (reads only)."""
    return session.execute(select(col(Item.oid)).where(*_abandoned(timeout)).limit(1)).first() is not None


def settle_abandoned_uploads(
    session: Session, *, timeout: timedelta, actor: str = "dlm", limit: int = MAX_PER_RUN
) -> AbandonedReport:
    """Finish or abort the uploads still INITIALISED `timeout` after they were registered (see
    the module docstring). Raises TransientError (catalogue); storage failures are reported
    per storage and leave their items for a later run."""
    report = AbandonedReport()
    stmt = (
        select(
            col(Item.oid),
            col(Item.name),
            col(Item.version),
            col(Item.size),
            col(Item.checksum),
            col(Item.checksum_algo),
        )
        .where(*_abandoned(timeout))
        .order_by(col(Item.created_at))
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    uploads = {
        r[0]: _Upload(r[0], r[1], int(r[2]), int(r[3]), str(r[4]).lower(), r[5] or "md5")
        for r in session.execute(stmt).all()
    }
    if not uploads:
        return report
    odd: set[uuid.UUID] = set()  # a copy in another state (being copied or deleted): not ours to judge
    for chunk in chunks(list(uploads)):
        for uid, oid, sid, path, state in session.execute(
            select(
                col(Replica.uid),
                col(Replica.item_oid),
                col(Replica.storage_id),
                col(Replica.path),
                col(Replica.state),
            ).where(
                col(Replica.item_oid).in_(chunk),
                col(Replica.state).notin_([ReplicaState.DELETED.value, ReplicaState.LOST.value]),
            )
        ).all():
            if state not in _SETTLED:
                odd.add(oid)
            uploads[oid].copies.append((uid, sid, path, state))
    by_storage: dict[uuid.UUID, list[_Upload]] = defaultdict(list)
    for up in uploads.values():
        for sid in {c[1] for c in up.copies}:
            by_storage[sid].append(up)
    found: dict[tuple[uuid.UUID, str], str] = {}  # (storage id, path) -> hash, where an object is
    unreadable: set[uuid.UUID] = set(odd)
    storages: dict[uuid.UUID, Storage] = {}
    for sid, ups in by_storage.items():
        storage = session.get_one(Storage, sid)
        storages[sid] = storage
        if storage.state not in _REACHABLE:
            report.errors[storage.name] = f"storage {storage.name} is {storage.state}"
            unreadable.update(u.oid for u in ups)
            continue
        try:
            target = backend_for(storage).rclone_target()
            by_algo: dict[str, list[str]] = defaultdict(list)
            for up in ups:
                algo = up.algo if up.algo in HASHES else "md5"
                by_algo[algo] += [c[2] for c in up.copies if c[1] == sid]
            for algo, paths in by_algo.items():
                nbytes = sum(u.size for u in ups)
                found.update(
                    {(sid, p): h.lower() for p, h in hashsum(target, paths, algo, nbytes=nbytes).items()}
                )
        except DLMError as exc:
            report.errors[storage.name] = str(exc)
            unreadable.update(u.oid for u in ups)
    finish: list[tuple[_Upload, Any]] = []
    abort: list[_Upload] = []
    for up in uploads.values():
        if up.oid in unreadable:
            continue
        whole = next((c for c in up.copies if found.get((c[1], c[2])) == up.checksum), None)
        if whole is not None:
            finish.append((up, whole))
        else:
            abort.append(up)
    # delete the objects that are not the declared bytes, one process per storage
    removed: dict[uuid.UUID, set[str]] = defaultdict(set)
    for sid in {c[1] for up in abort for c in up.copies}:
        paths = [c[2] for up in abort for c in up.copies if c[1] == sid and (sid, c[2]) in found]
        if not paths:
            continue
        storage = storages[sid]
        try:
            result = delete_files(backend_for(storage).rclone_target(), paths)
        except DLMError as exc:
            report.errors[storage.name] = str(exc)
            result = None
        gone = set(result.ok) if result is not None else set()
        removed[sid] = gone
        if len(gone) < len(paths):
            report.errors.setdefault(storage.name, f"could not delete {len(paths) - len(gone)} objects")
    kept_back = {
        up.oid for up in abort for c in up.copies if (c[1], c[2]) in found and c[2] not in removed[c[1]]
    }
    abort = [up for up in abort if up.oid not in kept_back]
    report.left = len(unreadable) + len(kept_back)
    report.removed = sum(len(v) for v in removed.values())
    _finish(session, finish, storages, actor, report)
    _abort(session, abort, storages, found, timeout, actor, report)
    return report


def _finish(
    session: Session,
    finish: list[tuple[_Upload, Any]],
    storages: dict[uuid.UUID, Storage],
    actor: str,
    report: AbandonedReport,
) -> None:
    """The uploads whose object holds the declared bytes: copy and item READY."""
    if not finish:
        return
    now = utcnow()
    done = {
        r[0]
        for r in session.execute(
            update(Item)
            .where(
                col(Item.oid).in_([up.oid for up, _ in finish]),
                col(Item.state) == ItemState.INITIALISED.value,
            )
            .values(state=ItemState.READY.value, updated_at=now)
            .returning(col(Item.oid))
        ).all()
    }
    finish = [(up, c) for up, c in finish if up.oid in done]
    if not finish:
        return
    session.execute(
        update(Replica)
        .where(col(Replica.uid).in_([c[0] for _, c in finish]))
        .values(state=ReplicaState.READY.value, verified_at=now, updated_at=now, claimed_by=None)
    )
    added: dict[uuid.UUID, int] = defaultdict(int)
    for up, c in finish:
        if c[3] == ReplicaState.PENDING.value:  # a READY one (recovery settled it) is counted
            added[c[1]] += up.size
    for sid, nbytes in added.items():
        session.execute(
            update(Storage).where(col(Storage.id) == sid).values(used_bytes=col(Storage.used_bytes) + nbytes)
        )
    why = "the upload was never finished; its bytes are the declared ones"
    events: list[audit.EventRow] = []
    for up, c in finish:
        if c[3] == ReplicaState.PENDING.value:
            events.append(
                {
                    "kind": EventKind.REPLICA_CREATED,
                    "item_oid": up.oid,
                    "replica_uid": c[0],
                    "storage_id": c[1],
                    "actor": actor,
                    "details": {"path": c[2], "uploaded": True, "reason": why},
                }
            )
        events.append(
            {
                "kind": EventKind.ITEM_READY,
                "item_oid": up.oid,
                "actor": actor,
                "details": {
                    "name": up.name,
                    "version": up.version,
                    "size": up.size,
                    "checksum": f"{up.algo}:{up.checksum}",
                    "storage": storages[c[1]].name,
                    "reason": why,
                },
            }
        )
    audit.record_many(session, events)
    report.finished = len(finish)


def _abort(
    session: Session,
    abort: list[_Upload],
    storages: dict[uuid.UUID, Storage],
    found: dict[tuple[uuid.UUID, str], str],
    timeout: timedelta,
    actor: str,
    report: AbandonedReport,
) -> None:
    """The uploads with nothing, or other bytes, uploaded: copies DELETED, item DELETED."""
    if not abort:
        return
    now = utcnow()
    done = {
        r[0]
        for r in session.execute(
            update(Item)
            .where(
                col(Item.oid).in_([up.oid for up in abort]),
                col(Item.state) == ItemState.INITIALISED.value,
            )
            .values(state=ItemState.DELETED.value, updated_at=now)
            .returning(col(Item.oid))
        ).all()
    }
    abort = [up for up in abort if up.oid in done]
    copies = [(up, c) for up in abort for c in up.copies]
    if copies:
        session.execute(
            update(Replica)
            .where(col(Replica.uid).in_([c[0] for _, c in copies]))
            .values(state=ReplicaState.DELETED.value, updated_at=now, claimed_by=None)
        )
    freed: dict[uuid.UUID, int] = defaultdict(int)
    for up, c in copies:
        if c[3] == ReplicaState.READY.value:
            freed[c[1]] += up.size
    for sid, nbytes in freed.items():
        session.execute(
            update(Storage).where(col(Storage.id) == sid).values(used_bytes=col(Storage.used_bytes) - nbytes)
        )
    hours = timeout.total_seconds() / 3600
    reason = f"upload not finished within {hours:g}h"
    events: list[audit.EventRow] = []
    for up in abort:
        what = [
            f"{storages[c[1]].name}:{c[2]}: "
            + ("other bytes than declared (removed)" if (c[1], c[2]) in found else "nothing uploaded")
            for c in up.copies
        ]
        events.append(
            {
                "kind": EventKind.ITEM_UPLOAD_ABORTED,
                "item_oid": up.oid,
                "actor": actor,
                "details": {"name": up.name, "version": up.version, "reason": reason, "found": what},
            }
        )
        for c in up.copies:
            events.append(
                {
                    "kind": EventKind.REPLICA_DELETED,
                    "item_oid": up.oid,
                    "replica_uid": c[0],
                    "storage_id": c[1],
                    "actor": actor,
                    "details": {"path": c[2], "reason": reason, "storage": storages[c[1]].name},
                }
            )
    audit.record_many(session, events)
    report.aborted = len(abort)
