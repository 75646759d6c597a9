"""Reconcile compares what a storage holds with the catalogue: unknown objects, lost and resized copies.

The catalogue side (path -> size, replica, state of every tracked copy on the storage) is
loaded into one dict; the storage's listing (ONE `rclone lsjson -R`, streamed) is matched
against it entry by entry and never held, so memory is one catalogue dict whatever the
storage holds. Then:

- an object nobody tracks is *unknown*: reported, and with `adopt` registered in bulk
  (lifecycle.catalogue.bulk, one Event each) as a READY item named after its path, with its size, its
  MD5 (the storage's own where it keeps one, else computed by reading it) and the object's
  user metadata as the item's metadata (the object is the source of truth; rclone's system
  keys such as mtime or content-type are dropped);
- a READY or CORRUPTED copy whose object is absent from a complete listing is LOST
  (`replica.lost`); a READY copy whose object has another size is CORRUPTED
  (`replica.corrupted`); both are returned for repair (lifecycle.integrity.verify's repair path);
- DLM's own temporary objects (rclone `.partial` files, `.dlm-tmp-*`, `.dlm-checkout-*`) and
  objects of in-flight rows are left alone; the temporary ones are reported (count, bytes,
  the first `report_limit` paths): a stray one is left by a process that died;
- a symbolic link on a local storage is never followed nor adopted: it is reported and
  skipped (`reconcile.link_skipped`), and a tracked copy whose path is now a link is LOST
  (its bytes are not the copy DLM wrote).

Nothing is marked LOST unless the listing completed: a listing that fails raises and changes
no copy's state.
"""

from __future__ import annotations

import io
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy import select
from sqlmodel import col

from lifecycle.apply.settle import COPY_COLUMNS, ReplicaChange, apply_replica_changes, check_of, settle_items
from lifecycle.catalogue import audit, bulk
from lifecycle.catalogue.models import Item, Replica, Storage, utcnow
from lifecycle.catalogue.sql import SessionFactory, chunks, default_sessions
from lifecycle.catalogue.storages import get_storage
from lifecycle.errors import ConflictError, InvalidNameError, StorageError
from lifecycle.integrity.verify import native_hashes
from lifecycle.names import validate_name
from lifecycle.states import EventKind, ItemState, Phase, ReplicaState, StorageKind, StorageState
from lifecycle.storage import identity
from lifecycle.storage.backends import backend_for
from lifecycle.storage.rclone import SYSTEM_METADATA
from lifecycle.transfer.listing import list_files
from lifecycle.transfer.operations import hashsum, lsjson
from lifecycle.transfer.target import ObjectInfo, RcloneTarget

__all__ = [
    "SYSTEM_METADATA",
    "ReconcileResult",
    "TemporaryObject",
    "UnknownObject",
    "is_temporary",
    "reconcile_storage",
    "user_metadata",
]

# DLM's temporary files, its upload-digest probe (S3Storage.checks_upload_digests), rclone's partials
_TEMPORARY = re.compile(r"(^|/)\.dlm-(tmp|checkout)-|(^|/)\.dlm-digest-check$|\.partial$")
_JUDGED = (ReplicaState.READY.value, ReplicaState.CORRUPTED.value)
_TRACKED = (
    ReplicaState.PENDING.value,
    ReplicaState.COPYING.value,
    ReplicaState.READY.value,
    ReplicaState.DELETING.value,
    ReplicaState.CORRUPTED.value,
)


def is_temporary(path: str) -> bool:
    """Whether an object is one of DLM's (or rclone's) temporary files."""
    return bool(_TEMPORARY.search(path))


def user_metadata(metadata: dict[str, Any], *, percent_encoded: bool = False) -> dict[str, str]:
    """The user's keys of an object's rclone metadata (S3 x-amz-meta-* keys come without prefix);
    with `percent_encoded` (S3, where DLM percent-encodes what is not ASCII) decoded."""
    found = {str(k): str(v) for k, v in metadata.items() if str(k).lower() not in SYSTEM_METADATA}
    if percent_encoded:
        from lifecycle.storage.s3 import decode_metadata

        found = decode_metadata(found)
    return found


@dataclass
class UnknownObject:
    """An object on the storage that no catalogue copy tracks."""

    path: str
    size: int
    checksum: str | None = None  # MD5 as the listing gave it, if it did
    item_oid: uuid.UUID | None = None  # set once adopted
    note: str = ""  # why it was not adopted

    def row(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "md5": self.checksum or "",
            "adopted as": str(self.item_oid) if self.item_oid else "",
            "note": self.note,
        }


@dataclass
class TemporaryObject:
    """A temporary object (DLM's or rclone's) found on the storage."""

    path: str
    size: int
    modified: str = ""  # ISO time, if the listing gave one

    def row(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "modified": self.modified}


@dataclass
class ReconcileResult:
    """What one reconcile of one storage found and did."""

    storage: str
    dry_run: bool = False
    adopt: bool = False
    listed: int = 0
    listed_bytes: int = 0
    matched: int = 0  # tracked copies found with the right size
    in_flight: int = 0  # objects of PENDING/COPYING/DELETING rows
    reappeared: int = 0  # objects back at LOST copies' paths (verify checks them)
    ignored: int = 0  # temporary files (DLM's `.dlm-tmp-*`, rclone's `*.partial`): not judged
    temporary_bytes: int = 0
    temporary_objects: list[TemporaryObject] = field(default_factory=list)  # the first report_limit
    unknown: int = 0
    unknown_bytes: int = 0
    unknown_objects: list[UnknownObject] = field(default_factory=list)  # the first report_limit
    links: int = 0  # symbolic links found (skipped, never followed nor adopted)
    link_paths: list[str] = field(default_factory=list)  # the first report_limit
    adopted: int = 0
    lost: int = 0
    corrupted: int = 0
    items_corrupted: int = 0
    missing: int = 0  # tracked copies absent (dry run: would be LOST)
    resized: int = 0  # tracked copies of another size (dry run: would be CORRUPTED)
    damaged: list[uuid.UUID] = field(default_factory=list)  # LOST or CORRUPTED now: repair them
    duration_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        skip = ("unknown_objects", "damaged", "temporary_objects")
        return {k: v for k, v in self.__dict__.items() if k not in skip}


def _load_catalogue(sessions: SessionFactory, storage_id: uuid.UUID) -> dict[str, tuple[int, uuid.UUID, str]]:
    """path -> (item size, replica uid, state) of every tracked copy on the storage, plus the
    LOST copies of live items whose path no tracked copy uses."""
    known: dict[str, tuple[int, uuid.UUID, str]] = {}
    with sessions() as s:
        result = s.execute(
            select(col(Replica.path), col(Item.size), col(Replica.uid), col(Replica.state))
            .join(Item, col(Item.oid) == col(Replica.item_oid))
            .where(
                col(Replica.storage_id) == storage_id,
                col(Replica.state).in_([*_TRACKED, ReplicaState.LOST.value]),
            )
            .execution_options(yield_per=10_000)
        )
        for path, size, uid, state in result:
            if state == ReplicaState.LOST.value and path in known:
                continue
            known[path] = (int(size), uid, str(state))
    return known


def reconcile_storage(
    name: str,
    *,
    sessions: SessionFactory = default_sessions,
    actor: str = "dlm",
    adopt: bool = False,
    dry_run: bool = False,
    phase: Phase = Phase.GAS,
    report_limit: int = 1000,
    chunk: int = 1000,
    timeout: float | None = None,
) -> ReconcileResult:
    """List storage `name` and compare it with the catalogue (see the module docstring).

    With dry_run nothing changes: unknown objects are reported, lost and resized copies
    counted. Adopted items get target phase `phase`.

    Raises StorageNotFoundError; ConflictError if the storage is offline or retired;
    CredentialsError, StorageUnavailableError or RcloneError if the listing fails (then no
    copy changed state; objects adopted before the failure stay adopted).
    """
    started = time.monotonic()
    with sessions() as s:
        storage = get_storage(name, session=s)
        s.expunge(storage)
    if storage.state in (StorageState.OFFLINE, StorageState.RETIRED):
        raise ConflictError(f"storage {name!r} is {storage.state}: it cannot be listed")
    result = ReconcileResult(storage.name, dry_run=dry_run, adopt=adopt)
    identity.check_identity(storage, write=False)  # never list (nor adopt) another storage's root as this one
    target = backend_for(storage).rclone_target()
    known = _load_catalogue(sessions, storage.id)
    resized: list[tuple[uuid.UUID, int, int]] = []  # uid, catalogue size, found size
    pending: list[ObjectInfo] = []
    links: list[str] = []  # filled once the listing has completed
    listing = lsjson(
        target, hash=bool(native_hashes(storage)), hash_types=("md5",), timeout=timeout, links=links
    )
    for info in listing:
        if identity.is_marker(info.path) and info.path not in known:  # the storage's marker
            continue
        result.listed += 1
        result.listed_bytes += info.size
        entry = known.pop(info.path, None)
        if entry is None and is_temporary(info.path):  # a tracked copy is judged whatever its name
            result.ignored += 1
            result.temporary_bytes += info.size
            if len(result.temporary_objects) < report_limit:
                modified = info.mtime.isoformat(timespec="seconds") if info.mtime else ""
                result.temporary_objects.append(TemporaryObject(info.path, info.size, modified))
            continue
        if entry is None:
            pending.append(info)
            if len(pending) >= chunk:
                _unknown(
                    sessions,
                    storage,
                    target,
                    pending,
                    result,
                    actor,
                    adopt and not dry_run,
                    phase,
                    report_limit,
                )
                pending = []
            continue
        size, uid, state = entry
        if state == ReplicaState.LOST.value:
            result.reappeared += 1
        elif state not in _JUDGED:
            result.in_flight += 1
        elif info.size != size and state == ReplicaState.READY.value:
            resized.append((uid, size, info.size))
        else:
            result.matched += 1
    if pending:
        _unknown(
            sessions, storage, target, pending, result, actor, adopt and not dry_run, phase, report_limit
        )
    linked = _skip_links(sessions, storage, links, known, result, actor, dry_run, report_limit)
    missing = [uid for _, (_, uid, state) in known.items() if state in _JUDGED]
    known.clear()
    result.missing, result.resized = len(missing), len(resized)
    if not dry_run and (missing or resized):
        _settle(sessions, storage, missing, resized, result, actor, linked)
    result.duration_s = time.monotonic() - started
    return result


def _settle(
    sessions: SessionFactory,
    storage: Storage,
    missing: Sequence[uuid.UUID],
    resized: Sequence[tuple[uuid.UUID, int, int]],
    result: ReconcileResult,
    actor: str,
    linked: dict[uuid.UUID, str] | None = None,
) -> None:
    """Missing copies LOST, resized ones CORRUPTED (guarded by the state they were listed in);
    `linked`: the missing copies whose path is now a symbolic link, and why."""
    linked = linked or {}
    found_size = {uid: (want, got) for uid, want, got in resized}
    uids = [*missing, *found_size]
    base = {"storage": storage.name, "found_by": "reconcile"}
    for chunk in chunks(uids):
        with sessions() as s:
            rows = s.execute(
                select(*COPY_COLUMNS)
                .join(Item, col(Item.oid) == col(Replica.item_oid))
                .where(col(Replica.uid).in_(chunk), col(Replica.state).in_(_JUDGED))
            ).all()
            changes: list[ReplicaChange] = []
            for check in map(check_of, rows):
                uid, path = check.replica_uid, check.path
                if uid in found_size:
                    if check.state != ReplicaState.READY:
                        continue
                    want, got = found_size[uid]
                    details = {**base, "path": path, "expected_size": want, "found_size": got}
                    bad = ReplicaChange(check, ReplicaState.CORRUPTED, EventKind.REPLICA_CORRUPTED, details)
                    changes.append(bad)
                else:
                    details = {**base, "path": path}
                    if uid in linked:
                        details["reason"] = linked[uid]
                    lost_kind = EventKind.REPLICA_LOST
                    lost = ReplicaChange(check, ReplicaState.LOST, lost_kind, details, -check.size)
                    changes.append(lost)
            applied = apply_replica_changes(s, changes, storage_id=storage.id, actor=actor, now=utcnow())
            for ch in applied:
                if ch.to == ReplicaState.LOST:
                    result.lost += 1
                else:
                    result.corrupted += 1
                result.damaged.append(ch.check.replica_uid)
            corrupted, _ = settle_items(s, {ch.check.item_oid for ch in applied}, actor=actor)
            result.items_corrupted += corrupted


def _skip_links(
    sessions: SessionFactory,
    storage: Storage,
    links: Sequence[str],
    known: dict[str, tuple[int, uuid.UUID, str]],
    result: ReconcileResult,
    actor: str,
    dry_run: bool,
    report_limit: int,
) -> dict[uuid.UUID, str]:
    """Report the symbolic links the listing skipped, one `reconcile.link_skipped` event each
    (none in a dry run); return the tracked copies at those paths (they stay in `known`, to
    be judged missing), uid -> why."""
    result.links = len(links)
    result.link_paths = list(links[:report_limit])
    why = "a symbolic link: never followed nor adopted"
    linked: dict[uuid.UUID, str] = {}
    if links:
        found = set(links)
        for path, (_, uid, state) in known.items():
            if state not in _JUDGED:
                continue
            parts = path.split("/")
            ancestors = ("/".join(parts[:n]) for n in range(1, len(parts) + 1))
            hit = next((a for a in ancestors if a in found), None)
            if hit is not None:
                linked[uid] = (
                    f"{path!r} is a symbolic link (never followed)"
                    if hit == path
                    else f"{path!r} goes through a symbolic link ({hit!r}, never followed)"
                )
    if dry_run or not links:
        return linked
    for chunk in chunks(links):
        with sessions() as s:
            audit.record_many(
                s,
                [
                    {
                        "kind": EventKind.RECONCILE_LINK_SKIPPED,
                        "storage_id": storage.id,
                        "actor": actor,
                        "details": {"storage": storage.name, "path": p, "reason": why},
                    }
                    for p in chunk
                ],
            )
    return linked


def _unknown(
    sessions: SessionFactory,
    storage: Storage,
    target: RcloneTarget,
    objects: Sequence[ObjectInfo],
    result: ReconcileResult,
    actor: str,
    adopt: bool,
    phase: Phase,
    report_limit: int,
) -> None:
    """Report one chunk of unknown objects; with adopt, register the adoptable ones in bulk."""
    found = [UnknownObject(o.path, o.size, o.checksum if o.checksum_algo == "md5" else None) for o in objects]
    result.unknown += len(found)
    result.unknown_bytes += sum(o.size for o in found)
    room = max(0, report_limit - len(result.unknown_objects))
    result.unknown_objects += found[:room]
    if adopt:
        _adopt(sessions, storage, target, found, result, actor, phase)


def _adopt(
    sessions: SessionFactory,
    storage: Storage,
    target: RcloneTarget,
    objects: Sequence[UnknownObject],
    result: ReconcileResult,
    actor: str,
    phase: Phase,
) -> None:
    """Register unknown objects as READY items: ONE lsjson (metadata and MD5) for the chunk,
    one `hashsum --download` for objects whose MD5 the storage does not keep, one bulk insert."""
    by_path: dict[str, UnknownObject] = {}
    for o in objects:
        try:
            validate_name(o.path, what="item name")
        except InvalidNameError as exc:
            o.note = f"not adoptable: {exc}"
            continue
        by_path[o.path] = o
    if not by_path:
        return
    with sessions() as s:  # a copy may have been claimed at one of these paths since the listing
        taken = set(
            s.execute(
                select(col(Replica.path)).where(
                    col(Replica.storage_id) == storage.id,
                    col(Replica.path).in_(list(by_path)),
                    col(Replica.state) != ReplicaState.DELETED.value,
                )
            ).scalars()
        )
    for path in taken:
        by_path.pop(path).note = "tracked since the listing"
    try:
        entries = list_files(target, list(by_path), metadata=True, hash_type="md5")
        md5 = {p: str((e.get("Hashes") or {}).get("md5") or "") for p, e in entries.items()}
        unhashed = [p for p, h in md5.items() if not h]
        if unhashed:
            md5.update(
                hashsum(target, unhashed, "md5", download=True, nbytes=sum(by_path[p].size for p in unhashed))
            )
    except StorageError as exc:
        for o in by_path.values():
            o.note = f"not adopted: {exc}"
        return
    lines = []
    for path, o in by_path.items():
        entry = entries.get(path)
        if entry is None or not md5.get(path):
            o.note = "gone, or unreadable, since the listing"
            continue
        size = entry.get("Size")
        o.size = size if isinstance(size, int) and size >= 0 else o.size
        o.checksum = md5[path].lower()
        meta = entry.get("Metadata")
        lines.append(
            orjson.dumps(
                {
                    "name": path,
                    "path": path,
                    "size": o.size,
                    "checksum": o.checksum,
                    "checksum_algo": "md5",
                    "metadata": user_metadata(
                        meta if isinstance(meta, dict) else {},
                        percent_encoded=storage.kind == StorageKind.S3,
                    ),
                }
            )
        )
    if not lines:
        return
    source = io.StringIO(b"\n".join(lines).decode() + "\n")
    with sessions() as s:
        row = s.get_one(Storage, storage.id)
        try:
            done = bulk.register_from_list(
                s, storage=row, source=source, fmt="jsonl", phase=phase, actor=actor
            )
        except ConflictError as exc:  # a copy took one of these paths since the check above
            s.rollback()  # nothing of this chunk is registered
            for o in by_path.values():
                o.note = o.note or f"not adopted: {exc}"
            return
        adopted: dict[str, uuid.UUID] = {
            path: oid
            for path, oid in s.execute(
                select(col(Replica.path), col(Replica.item_oid))
                .join(Item, col(Item.oid) == col(Replica.item_oid))
                .where(
                    col(Replica.storage_id) == storage.id,
                    col(Replica.path).in_(list(by_path)),
                    col(Replica.state) == ReplicaState.READY.value,
                    col(Item.state) == ItemState.READY.value,
                )
            )
        }
    result.adopted += done.count
    for path, o in by_path.items():
        if path in adopted and not o.note:
            o.item_oid = adopted[path]
