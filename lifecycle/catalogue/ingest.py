"""Ingest: plan and register new items from local files, upload them to their first storage
and check the stored bytes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from lifecycle.catalogue import audit
from lifecycle.catalogue.inputs import ItemCreate, ItemOptions
from lifecycle.catalogue.models import (
    Item,
    Replica,
    Storage,
    utcnow,
)
from lifecycle.catalogue.sql import chunks
from lifecycle.checksum import CHUNK, checksum_file, new_hasher
from lifecycle.errors import (
    ConflictError,
    InvalidValueError,
    SourceNotFoundError,
)
from lifecycle.names import validate_name
from lifecycle.settings import get_settings
from lifecycle.states import (
    LIVE_REPLICA_STATES,
    EventKind,
    ItemState,
    ReplicaState,
)
from lifecycle.storage import identity
from lifecycle.storage.backends import backend_for

# --------------------------------------------------------------------------- ingest


@dataclass
class IngestSource:
    """One payload to ingest, resolved and validated before anything is written."""

    name: str
    path: str  # root-relative path on the storage
    local: Path | None = None  # for --upload


# What a user sets on the items of one ingest (phase, expiry, owner, metadata, parents), validated.
IngestOptions = ItemOptions


def _next_versions(session: Session, names: Iterable[str]) -> dict[str, int]:
    names = list(set(names))
    found: dict[str, int] = {}
    for chunk in chunks(names):
        rows = session.execute(
            select(col(Item.name), func.max(col(Item.version)))
            .where(col(Item.name).in_(chunk))
            .group_by(col(Item.name))
        ).all()
        found.update({n: int(v) for n, v in rows})
    return {n: found.get(n, 0) + 1 for n in names}


def upload_path(name: str, version: int) -> str:
    """Where an uploaded version lives on a storage: NAME for v1, NAME~vN for later ones."""
    return name if version == 1 else f"{name}~v{version}"


def plan_ingest(
    *, session: Session, storage: Storage, paths: Sequence[str], upload: bool, name: str | None = None
) -> list[IngestSource]:
    """Resolve and validate every path before any write.

    Raises InvalidNameError (bad name, path outside the root), SourceNotFoundError,
    ConflictError (a path already registered), InvalidValueError.
    """
    if name is not None and len(paths) != 1:
        raise InvalidValueError("--name applies to a single path only")
    if not paths:
        raise InvalidValueError("nothing to ingest: give at least one path")
    backend = backend_for(storage)
    sources: list[IngestSource] = []
    for raw in paths:
        if upload:
            local = Path(raw).expanduser()
            if not local.exists():
                raise SourceNotFoundError(f"no such file: {raw}")
            if local.is_dir():
                base = local.resolve()
                files = sorted(p for p in base.rglob("*") if p.is_file())
                if not files:
                    raise SourceNotFoundError(f"directory {raw} holds no files")
                prefix = name if name is not None else base.name
                for f in files:
                    rel = f.relative_to(base).as_posix()
                    sources.append(IngestSource(validate_name(f"{prefix}/{rel}"), "", f))
            elif not local.is_file():  # a FIFO or a device: reading it would block or never end
                raise InvalidValueError(f"{raw} is not a regular file")
            else:
                name_v = validate_name(name if name is not None else local.name)
                sources.append(IngestSource(name_v, "", local.resolve()))
        else:
            rel = backend.resolve(raw)
            backend.stat(rel)  # raises SourceNotFoundError
            names = identity.link_count(storage, rel)
            if names > 1:  # one inode is one physical copy, whatever names it has
                raise InvalidValueError(
                    f"{raw} is a hard link shared with another file ({names} names, one physical "
                    "copy): DLM counts copies by their bytes; ingest a file of its own"
                )
            sources.append(IngestSource(validate_name(name if name is not None else rel), rel))
    seen: set[str] = set()
    for s in sources:
        if s.name in seen:
            raise ConflictError(f"item name {s.name!r} given twice")
        seen.add(s.name)
    if not upload:
        taken = session.execute(
            select(col(Replica.path), col(Item.name), col(Item.version))
            .join(Item, col(Item.oid) == col(Replica.item_oid))
            .where(
                col(Replica.storage_id) == storage.id,
                col(Replica.path).in_([s.path for s in sources]),
                col(Replica.state).in_(LIVE_REPLICA_STATES),
            )
        ).first()
        if taken is not None:
            raise ConflictError(
                f"{taken[0]!r} on storage {storage.name!r} is already registered as "
                f"{taken[1]} v{taken[2]}: READY items are write-once; ingest a new file"
            )
    return sources


def ingest(
    *,
    session: Session,
    storage: Storage,
    sources: Sequence[IngestSource],
    options: IngestOptions,
    actor: str = "user",
    progress: Any = None,
) -> list[Item]:
    """Register (or upload, then register) each source as a READY item with one READY replica.

    An upload never writes over an existing file or object, and the checksum recorded is
    that of the bytes stored: hashed before the upload, then compared with the storage's own
    hash (S3) or a read-back (posix); a source that changed meanwhile is refused and its
    upload removed. In place, the checksum is read from the storage's object.
    Raises ConflictError (a path held by another item, or already existing on the storage),
    InvalidValueError (a source that changed while it was read), StorageError and
    subclasses, SourceNotFoundError, TransientError.
    """
    algo = get_settings().checksum_algo
    backend = backend_for(storage)
    versions = _next_versions(session, (s.name for s in sources))
    now = utcnow()
    expires = options.expiry(now)
    items: list[Item] = []
    total = 0
    written: list[str] = []
    try:
        for src in sources:
            version = versions[src.name]
            versions[src.name] += 1
            if src.local is not None:
                path = upload_path(src.name, version)
                _refuse_taken(session, storage, path, f"{src.name} v{version}")
                local_before = _local_stat(src.local)
                digests, size = _file_digests(src.local, (algo, "md5"))
                digest = digests[algo]
                info = backend.put(
                    path, src.local, metadata={"dlm-name": src.name, "dlm-checksum": f"{algo}:{digest}"}
                )
                written.append(path)
                if info.size != size or _local_stat(src.local) != local_before:
                    raise InvalidValueError(
                        f"{src.local} changed while it was uploaded ({size} bytes read, {info.size} "
                        "stored); nothing was registered: ingest it again when it is complete"
                    )
                if not _stored_bytes_match(backend, path, info, algo, digests):
                    raise InvalidValueError(
                        f"{src.local} changed while it was uploaded (the stored bytes are not the "
                        "ones hashed); nothing was registered: ingest it again when it is complete"
                    )
            else:
                path = src.path
                before = backend.stat(path)
                digest = backend.checksum(path, algo)
                size = before.size
                after = backend.stat(path)
                if after.size != before.size or (
                    before.mtime and after.mtime and after.mtime != before.mtime
                ):
                    raise InvalidValueError(
                        f"{path} changed while it was read; ingest it again when it is complete"
                    )
            new = ItemCreate(name=src.name, size=size, checksum=digest, checksum_algo=algo)
            item = Item(
                name=new.name,
                version=version,
                size=new.size,
                checksum=new.checksum,
                checksum_algo=new.checksum_algo,
                target_phase=options.phase,
                expires_at=expires,
                owner=options.owner,
                meta=dict(options.metadata),
                parents=list(options.parents),
                state=ItemState.READY,
                created_at=now,
                updated_at=now,
            )
            replica = Replica(
                item_oid=item.oid,
                storage_id=storage.id,
                path=path,
                state=ReplicaState.READY,
                verified_at=now,
                created_at=now,
                updated_at=now,
            )
            session.add(item)
            session.add(replica)
            items.append(item)
            total += size
            audit.record_many(
                session,
                [
                    {
                        "kind": EventKind.REPLICA_CREATED,
                        "item_oid": item.oid,
                        "replica_uid": replica.uid,
                        "storage_id": storage.id,
                        "actor": actor,
                        "details": {"path": path, "uploaded": src.local is not None},
                    },
                    {
                        "kind": EventKind.ITEM_READY,
                        "item_oid": item.oid,
                        "actor": actor,
                        "details": {
                            "name": item.name,
                            "version": version,
                            "size": size,
                            "checksum": f"{algo}:{digest}",
                            "storage": storage.name,
                        },
                    },
                ],
            )
            if progress is not None:
                progress(size)
        session.execute(
            update(Storage)
            .where(col(Storage.id) == storage.id)
            .values(used_bytes=col(Storage.used_bytes) + total)
        )
        try:
            session.flush()
        except IntegrityError as exc:
            if not path_taken(exc):
                raise
            raise ConflictError(
                f"a path on storage {storage.name!r} was registered by another item at the same "
                "time; nothing was registered"
            ) from None
    except BaseException:
        for path in written:  # leave no orphan uploads behind a failed ingest
            with contextlib.suppress(Exception):  # best effort; reconcile reports leftovers
                backend.delete(path)
        raise
    return items


def path_taken(exc: Exception) -> bool:
    """Whether a database error is the one-owner-per-path index refusing a second live copy."""
    text = str(getattr(exc, "orig", exc))
    return "uq_replica_storage_path_live" in text or "replica.storage_id, replica.path" in text


def _refuse_taken(session: Session, storage: Storage, path: str, what: str) -> None:
    """Raises ConflictError if a live copy of another item holds `path` on the storage."""
    taken = session.execute(
        select(col(Item.name), col(Item.version))
        .join(Replica, col(Replica.item_oid) == col(Item.oid))
        .where(
            col(Replica.storage_id) == storage.id,
            col(Replica.path) == path,
            col(Replica.state).in_(LIVE_REPLICA_STATES),
        )
    ).first()
    if taken is not None:
        raise ConflictError(
            f"{what} would be uploaded to {path!r} on storage {storage.name!r}, which already holds "
            f"{taken[0]} v{taken[1]}: give another name"
        )


def _local_stat(path: Path) -> tuple[int, int]:
    """(size, mtime in ns) of a local file, to tell whether it changed during an upload."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _file_digests(path: Path, algos: Iterable[str]) -> tuple[dict[str, str], int]:
    """Hex digests of a local file in several algorithms, in one read; and its size."""

    wanted = list(dict.fromkeys(algos))
    if len(wanted) == 1:
        digest, size = checksum_file(path, wanted[0])
        return {wanted[0]: digest}, size
    hashers = {a: new_hasher(a) for a in wanted}
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}, size


def _stored_bytes_match(backend: Any, path: str, info: Any, algo: str, digests: Mapping[str, str]) -> bool:
    """Whether the stored object holds the bytes hashed before the upload: by the hash the
    storage computed itself (S3 ETag MD5, or the md5chksum of a multipart upload whose parts
    were each checked), else by reading the stored bytes back (also when the stored hash
    differs: an encrypted object's ETag, say, is no MD5)."""
    algo_kept = info.checksum_algo
    if info.checksum and algo_kept in digests and str(info.checksum).lower() == digests[algo_kept]:
        return True
    return bool(backend.checksum(path, algo) == digests[algo])
