"""Uploads straight to S3: the item is registered first, the client writes the bytes with a
presigned PUT, and the catalogue checks them before the item becomes READY.

1. `begin_upload` registers an INITIALISED item (name, size, MD5 as declared) with one PENDING
   copy on an S3 storage, and returns a presigned PUT URL for that copy's object.
2. The client PUTs the bytes to that URL (DLM's processes never carry them) with the
   `Content-MD5` header and the Content-Length it is signed for: S3 itself refuses other
   bytes, and a declared size that is not theirs, then and later
   (the URL stays valid a while after the item is READY, and cannot replace its bytes).
3. `finish_upload` compares the object with what was declared: its size, and its MD5 (the
   ETag of a single-part object, rclone's md5chksum of a multipart one, else the bytes read
   back). Only if both match do the copy and the item become READY (`replica.created`,
   `item.ready`); a mismatch is ConflictError and changes nothing, so the client may PUT
   again and retry.

A PENDING copy nobody finishes is settled by a later run's recovery (lifecycle.integrity.recovery)
once it is stale: READY if the object holds the declared bytes (`finish_upload` then still
checks it and makes the item READY), else the claim is removed.
"""

from __future__ import annotations

from typing import Any, Self

from pydantic import BaseModel, model_validator
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from lifecycle.catalogue import audit
from lifecycle.catalogue.access import visible_item
from lifecycle.catalogue.ingest import path_taken, upload_path
from lifecycle.catalogue.inputs import ItemCreate
from lifecycle.catalogue.models import Item, Replica, Storage, utcnow
from lifecycle.catalogue.public import ItemPublic
from lifecycle.catalogue.storages import get_storage
from lifecycle.errors import ConflictError, InvalidValueError, SourceNotFoundError
from lifecycle.settings import get_settings
from lifecycle.states import (
    LIVE_REPLICA_STATES,
    EventKind,
    ItemState,
    ReplicaState,
    StorageKind,
    StorageState,
)
from lifecycle.storage.backends import backend_for
from lifecycle.storage.s3 import S3Storage

DEFAULT_URL_LIFETIME_S = 3600


class UploadCreate(ItemCreate):
    """A new item to upload: the item's fields (a checksum is required: its MD5) and the S3
    storage to upload it to."""

    storage: str

    @model_validator(mode="after")
    def _md5(self) -> Self:
        if self.checksum is None:
            raise InvalidValueError("invalid checksum: required (the MD5 of the bytes to upload)")
        if self.checksum_algo != "md5":
            raise InvalidValueError(
                f"invalid checksum_algo {self.checksum_algo!r}: uploads are checked by MD5, give md5"
            )
        return self


class UploadStarted(BaseModel):
    """What `POST /items` answers: the new item, and where to PUT its bytes (and until when)."""

    item: ItemPublic
    upload_url: str
    method: str = "PUT"
    headers: dict[str, str]  # to send with the PUT: the Content-MD5 the URL is signed for
    expires_in: int


def _s3(storage: Storage) -> S3Storage:
    backend = backend_for(storage)
    if storage.kind != StorageKind.S3 or not isinstance(backend, S3Storage):
        raise InvalidValueError(
            f"storage {storage.name!r} is {storage.kind}: uploads through the API need an S3 storage"
        )
    if storage.state != StorageState.ONLINE:
        raise ConflictError(f"storage {storage.name!r} is {storage.state}: uploads need an online storage")
    return backend


def begin_upload(
    data: UploadCreate,
    *,
    session: Session,
    actor: str,
    expires_s: int = DEFAULT_URL_LIFETIME_S,
    only_owner: str | None = None,
) -> UploadStarted:
    """Register the item INITIALISED with a PENDING copy; return a presigned PUT URL for it.
    With `only_owner` (a token that is not an admin's), a name that has a version of another
    owner (or of none) is refused: a new version of it would be what its name refers to.

    Raises StorageNotFoundError, InvalidValueError (not an S3 storage), ConflictError (the
    storage is not online, the object already exists, or the name is another owner's),
    CredentialsError, StorageError."""
    storage = get_storage(data.storage, session=session)
    backend = _s3(storage)
    if only_owner is not None:
        others = session.execute(
            select(col(Item.oid))
            .where(
                col(Item.name) == data.name,
                or_(col(Item.owner).is_(None), col(Item.owner) != only_owner),
            )
            .limit(1)
        ).first()
        if others is not None:
            raise ConflictError(f"the name {data.name!r} is another owner's: give another name")
    latest = session.execute(select(func.max(col(Item.version))).where(col(Item.name) == data.name)).scalar()
    version = int(latest or 0) + 1
    path = upload_path(data.name, version)
    taken = session.execute(
        select(col(Replica.uid)).where(
            col(Replica.storage_id) == storage.id,
            col(Replica.path) == path,
            col(Replica.state).in_(LIVE_REPLICA_STATES),
        )
    ).first()
    exists = taken is not None
    if not exists:
        try:
            backend.stat(path)
            exists = True
        except SourceNotFoundError:
            pass
    if exists:
        raise ConflictError(f"{path!r} already exists on storage {storage.name!r}: give another name")
    now = utcnow()
    item = Item(
        name=data.name,
        version=version,
        size=data.size,
        checksum=data.checksum,
        checksum_algo=data.checksum_algo,
        target_phase=data.phase,
        expires_at=data.expiry(now),
        owner=data.owner,
        meta=dict(data.metadata),
        parents=list(data.parents),
        state=ItemState.INITIALISED,
        created_at=now,
        updated_at=now,
    )
    replica = Replica(
        item_oid=item.oid,
        storage_id=storage.id,
        path=path,
        state=ReplicaState.PENDING,
        created_at=now,
        updated_at=now,
    )
    session.add(item)
    session.add(replica)
    try:
        session.flush()
    except IntegrityError as exc:
        text = str(exc.orig)
        if (
            not path_taken(exc)
            and "uq_item_name_version" not in text
            and "item.name, item.version" not in text
        ):
            raise
        raise ConflictError(
            f"{data.name} v{version} was registered by another request at the same time"
        ) from None
    audit.record(
        session,
        EventKind.ITEM_REGISTERED,
        item_oid=item.oid,
        replica_uid=replica.uid,
        storage_id=storage.id,
        actor=actor,
        details={
            "name": item.name,
            "version": version,
            "size": item.size,
            "storage": storage.name,
            "path": path,
        },
    )
    # valid for at most half the time after which recovery takes the PENDING copy for
    # abandoned, so a PUT started at the URL's last second still has that half to finish
    expires_s = max(1, min(expires_s, get_settings().transfer.stale_after_s // 2))
    url, headers = backend.upload_url(path, item.checksum or "", expires_s, size=item.size)
    return UploadStarted(item=ItemPublic.of(item), upload_url=url, headers=headers, expires_in=expires_s)


def finish_upload(item_oid: Any, *, session: Session, owner: str | None, actor: str) -> Item:
    """Check the uploaded object against the declared size and MD5; if both match, make the
    copy and the item READY. An item already READY is returned as it is.

    Raises ItemNotFoundError (also another owner's), ConflictError (no upload pending, nothing
    uploaded yet, or other bytes than declared: nothing changes), CredentialsError, StorageError."""
    item = visible_item(item_oid, session=session, owner=owner)
    session.refresh(item, with_for_update=True)  # one finisher at a time
    if item.state == ItemState.READY:
        return item
    found = session.execute(
        select(Replica, Storage)
        .join(Storage, col(Storage.id) == col(Replica.storage_id))
        .where(
            col(Replica.item_oid) == item.oid,
            col(Replica.state).in_([ReplicaState.PENDING.value, ReplicaState.READY.value]),
        )
        .order_by(col(Replica.state))  # PENDING first; READY: recovery already settled the copy
    ).first()
    if item.state != ItemState.INITIALISED or found is None:
        raise ConflictError(f"{item.name} v{item.version} is {item.state} with no upload pending")
    replica, storage = found
    backend = backend_for(storage)
    label = f"{item.name} v{item.version}"
    try:
        info = backend.stat(replica.path)
    except SourceNotFoundError:
        raise ConflictError(
            f"nothing uploaded yet for {label}: PUT its bytes to the upload URL first"
        ) from None
    if info.size != item.size:
        raise ConflictError(
            f"the upload of {label} holds {info.size} bytes, {item.size} were declared: "
            "it stays INITIALISED; PUT the right bytes and try again"
        )
    stored = info.checksum if info.checksum_algo == "md5" and info.checksum else None
    md5 = (stored or backend.checksum(replica.path, "md5")).lower()
    if md5 != (item.checksum or "").lower():
        raise ConflictError(
            f"the upload of {label} has MD5 {md5}, {item.checksum} was declared: "
            "it stays INITIALISED; PUT the right bytes and try again"
        )
    now = utcnow()
    settled = replica.state == ReplicaState.READY  # by recovery, which counted its bytes and event
    replica.state, replica.verified_at, replica.updated_at = ReplicaState.READY, now, now
    item.state, item.updated_at = ItemState.READY, now
    session.add(replica)
    session.add(item)
    if not settled:
        session.execute(
            update(Storage)
            .where(col(Storage.id) == storage.id)
            .values(used_bytes=col(Storage.used_bytes) + item.size)
        )
    created: list[audit.EventRow] = (
        []
        if settled
        else [
            {
                "kind": EventKind.REPLICA_CREATED,
                "item_oid": item.oid,
                "replica_uid": replica.uid,
                "storage_id": storage.id,
                "actor": actor,
                "details": {"path": replica.path, "uploaded": True},
            }
        ]
    )
    audit.record_many(
        session,
        [
            *created,
            {
                "kind": EventKind.ITEM_READY,
                "item_oid": item.oid,
                "actor": actor,
                "details": {
                    "name": item.name,
                    "version": item.version,
                    "size": item.size,
                    "checksum": f"md5:{md5}",
                    "storage": storage.name,
                },
            },
        ],
    )
    session.flush()
    return item


def intact_copies(item: Item, *, session: Session) -> list[tuple[Replica, Storage]]:
    """A READY item's READY copies on online (then draining) storages, S3 ones first within each.

    Raises ConflictError (the item is not READY, or has no intact copy on a storage in use)."""
    label = f"{item.name} v{item.version}"
    if item.state != ItemState.READY:
        raise ConflictError(f"{label} is {item.state}: only READY items can be downloaded")
    rows = session.execute(
        select(Replica, Storage)
        .join(Storage, col(Storage.id) == col(Replica.storage_id))
        .where(
            col(Replica.item_oid) == item.oid,
            col(Replica.state) == ReplicaState.READY.value,
            col(Storage.state).in_([StorageState.ONLINE.value, StorageState.DRAINING.value]),
        )
    ).all()
    if not rows:
        raise ConflictError(f"{label} has no intact copy on an online storage")
    return sorted(
        ((r, s) for r, s in rows),
        key=lambda rs: (rs[1].state != StorageState.ONLINE, rs[1].kind != StorageKind.S3, rs[1].name),
    )
