"""/api/items: list (filter language, keyset pages), show, change, delete, copies, events, upload and
download."""

from __future__ import annotations

import threading
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from api import paging
from api.auth import Who, scope
from lifecycle.catalogue import access, catalog, public, uploads
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.inputs import ItemChange
from lifecycle.catalogue.models import Storage
from lifecycle.catalogue.public import ItemDetailPublic, ItemPublic, ReplicaPublic
from lifecycle.errors import InvalidValueError
from lifecycle.states import StorageKind
from lifecycle.storage.backends import backend_for
from lifecycle.storage.base import StorageBackend
from lifecycle.storage.s3 import S3Storage
from lifecycle.units import parse_duration

router = APIRouter(tags=["items"])
MAX_URL_LIFETIME_S = 7 * 86400  # the longest a SigV4 presigned URL may be valid

Where = Annotated[
    str | None,
    Query(description="a filter: name ~ 'run1/*' and size > 1GiB (see the README)", max_length=4096),
]
Limit = Annotated[int, Query(ge=1, le=access.MAX_PAGE, description="items per page")]
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page", max_length=4200)]
Oid = Annotated[str, Path(description="the item's oid, a UUID", json_schema_extra={"format": "uuid"})]
Since = Annotated[
    int, Query(ge=0, le=2**63 - 1, description="an event id: the events after it (next_since of a page)")
]


class ItemsPage(BaseModel):
    items: list[ItemPublic]
    next_cursor: str | None


class EventsPage(BaseModel):
    events: list[access.EventRowPublic]
    next_since: int


class DownloadLink(BaseModel):
    url: str
    presigned: bool
    storage: str
    expires_in: int | None


_BACKENDS: dict[tuple[Any, ...], StorageBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def cached_backend(storage: Storage) -> StorageBackend:
    """The backend of a storage row, made once per configuration in this process: an S3
    backend builds a boto3 client (about 20 ms), which a presigned URL then reuses."""
    key = (storage.id, storage.kind, storage.root, storage.endpoint, storage.region, storage.credentials_env)
    with _BACKENDS_LOCK:
        found = _BACKENDS.get(key)
        if found is None:
            if len(_BACKENDS) >= 64:
                _BACKENDS.clear()
            found = _BACKENDS[key] = backend_for(storage)
        return found


def oid_of(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise InvalidValueError(f"invalid item id {text[:80]!r}: a UUID, as listed under oid") from None


def items_page(who: Who, where: str | None, limit: int, cursor: str | None) -> ItemsPage:
    with session_scope() as s:
        page = access.items_page(
            session=s, owner=scope(who), where=where, after=paging.decode(cursor), limit=limit
        )
    return ItemsPage(items=page.items, next_cursor=paging.encode(page.last))


@router.get("/items", response_model=ItemsPage)
def list_items(who: Who, where: Where = None, limit: Limit = 100, cursor: Cursor = None) -> ItemsPage:
    """Items you may see, by name and version; follow next_cursor until it is null."""
    return items_page(who, where, limit, cursor)


@router.get("/items/{oid}", response_model=ItemDetailPublic)
def show_item(oid: Oid, who: Who) -> ItemDetailPublic:
    """An item with its copies and its latest events."""
    with session_scope() as s:
        item = access.visible_item(oid_of(oid), session=s, owner=scope(who))
        return public.item_detail(str(item.oid), session=s)


@router.get("/items/{oid}/replicas", response_model=list[ReplicaPublic])
def item_replicas(oid: Oid, who: Who) -> list[ReplicaPublic]:
    """An item's copies, oldest first."""
    with session_scope() as s:
        return access.item_replicas(oid_of(oid), session=s, owner=scope(who))


@router.get("/items/{oid}/events", response_model=EventsPage)
def item_events(oid: Oid, who: Who, since: Since = 0, limit: Limit = 100) -> EventsPage:
    """An item's audit events after event id `since`, oldest first."""
    with session_scope() as s:
        rows = access.events_page(session=s, owner=scope(who), since=since, limit=limit, item=oid_of(oid))
    return EventsPage(events=rows, next_since=rows[-1].id if rows else since)


@router.patch("/items/{oid}", response_model=ItemPublic)
def change_item(oid: Oid, who: Who, change: Annotated[ItemChange, Body()]) -> ItemPublic:
    """Change an item as `dlm items set-phase`, `set-expiry` and `set-meta` do: `phase`; one of
    `lifetime` (from now, e.g. 90d), `expires_at` (an ISO time) or `never: true`; `metadata`
    keys to set (a dotted key sets a nested one; the others stay). One event each, with your
    token's owner as actor; 409 for an expired or deleted item."""
    with session_scope() as s:
        item = access.visible_item(oid_of(oid), session=s, owner=scope(who))
        changed = catalog.change_item(str(item.oid), change, session=s, actor=who.owner)
        return ItemPublic.of(changed)


class ItemDeleted(BaseModel):
    """What `DELETE /items/{oid}` did: the item (DELETED once no copy is left), the copies
    deleted, and those that could not be (the next expire run deletes them)."""

    item: ItemPublic
    deleted: int
    failed: int


@router.delete("/items/{oid}", response_model=ItemDeleted)
def delete_item(oid: Oid, who: Who) -> ItemDeleted:
    """Delete an item now, as `dlm items delete --yes`: every copy goes, the item stays as a
    DELETED tombstone; 409 if it is already deleted."""
    from lifecycle.apply.records import delete_item_now
    from lifecycle.planning.pipelines import policy_from

    with session_scope() as s:
        item_oid = access.visible_item(oid_of(oid), session=s, owner=scope(who)).oid
    results = delete_item_now(item_oid, policy=policy_from(), actor=who.owner)
    with session_scope() as s:
        item = access.visible_item(item_oid, session=s, owner=scope(who))
        return ItemDeleted(
            item=ItemPublic.of(item),
            deleted=sum(r.done for r in results),
            failed=sum(r.failed for r in results),
        )


@router.post("/items", response_model=uploads.UploadStarted, status_code=201)
def create_upload(who: Who, body: Annotated[dict[str, Any], Body()]) -> uploads.UploadStarted:
    """Register a new item (name, size, checksum: its MD5, storage: an S3 storage, and optionally
    phase, lifetime or expires_at, metadata, parents) and get a presigned URL to PUT its bytes to;
    then call POST /items/{oid}/ready."""
    values = dict(body)
    owner = values.get("owner")
    if owner is not None and owner != who.owner and not who.admin:
        raise InvalidValueError("invalid owner: only an admin token may upload for another owner")
    if owner is None:  # absent or null: the token's owner (never an item nobody owns)
        values["owner"] = who.owner
    data = uploads.UploadCreate(**values)
    with session_scope() as s:
        return uploads.begin_upload(data, session=s, actor=who.owner, only_owner=scope(who))


@router.post("/items/{oid}/ready", response_model=ItemPublic)
def finish_upload(oid: Oid, who: Who) -> ItemPublic:
    """Check the uploaded bytes (size and MD5) and make the item READY; 409 if they differ."""
    with session_scope() as s:
        item = uploads.finish_upload(oid_of(oid), session=s, owner=scope(who), actor=who.owner)
        done = ItemPublic.of(item)
    _announce_ready([str(done.oid)])
    return done


def _announce_ready(oids: list[str]) -> None:
    """Tell a running `dlm serve` (if any) that items are READY, as `dlm ingest` does."""
    try:
        from flows.events import announce_items_ready
    except ImportError:
        return
    announce_items_ready(oids)


@router.get("/items/{oid}/download-url", response_model=DownloadLink)
def download_url(
    oid: Oid,
    who: Who,
    request: Request,
    expires: Annotated[
        str, Query(description="how long a presigned URL is valid, e.g. 1h (at most 7d)", max_length=40)
    ] = "1h",
) -> DownloadLink:
    """A presigned GET URL of an intact S3 copy; for an item with no S3 copy, the URL of
    GET /items/{oid}/content, which streams it through the API (with your token)."""
    seconds = int(parse_duration(expires).total_seconds())
    if seconds > MAX_URL_LIFETIME_S:  # S3 refuses a presigned URL signed for longer
        raise InvalidValueError(f"invalid expires {expires[:40]!r}: at most 7 days (7d)")
    with session_scope() as s:
        item = access.visible_item(oid_of(oid), session=s, owner=scope(who))
        replica, storage = uploads.intact_copies(item, session=s)[0]
        backend = cached_backend(storage)
        if storage.kind == StorageKind.S3 and isinstance(backend, S3Storage):
            return DownloadLink(
                url=backend.url(replica.path, seconds),
                presigned=True,
                storage=storage.name,
                expires_in=seconds,
            )
        url = str(request.url_for("item_content", oid=str(item.oid)))
        return DownloadLink(url=url, presigned=False, storage=storage.name, expires_in=None)


class OctetStream(StreamingResponse):
    media_type = "application/octet-stream"


BINARY = {"type": "string", "format": "binary"}


@router.get(
    "/items/{oid}/content",
    name="item_content",
    response_class=OctetStream,
    responses={200: {"content": {OctetStream.media_type: {"schema": BINARY}}}},
)
def item_content(oid: Oid, who: Who) -> OctetStream:
    """The item's bytes, streamed from its best intact copy."""
    with session_scope() as s:
        item = access.visible_item(oid_of(oid), session=s, owner=scope(who))
        replica, storage = uploads.intact_copies(item, session=s)[0]
        stream = cached_backend(storage).open(replica.path)
        size, name = item.size, item.name.rsplit("/", 1)[-1]

    def chunks() -> Any:
        try:
            while block := stream.read(1024 * 1024):
                yield block
        finally:
            stream.close()

    return OctetStream(
        chunks(),
        headers={
            "Content-Length": str(size),
            "Content-Disposition": f"attachment; filename*=UTF-8''{_quote(name)}",
        },
    )


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")
