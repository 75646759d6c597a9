"""/api/storages, /api/datasets and /api/events."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body

from api.auth import Admin, Who, scope
from api.routes_items import Cursor, EventsPage, ItemsPage, Limit, Since, items_page
from lifecycle.catalogue import access, catalog, public, storages
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.inputs import DatasetCreate, StorageChange
from lifecycle.catalogue.models import StoragePublic
from lifecycle.catalogue.public import DatasetPublic, StorageDetailPublic
from lifecycle.errors import InvalidValueError

router = APIRouter()


@router.get("/storages", response_model=list[StoragePublic], tags=["storages"])
def list_storages(who: Who) -> list[StoragePublic]:
    """Every storage with its usage (no credentials: those stay in the server's environment)."""
    with session_scope() as s:
        return storages.list_storages(session=s)


@router.patch("/storages/{name}", response_model=StorageDetailPublic, tags=["storages"])
def change_storage(name: str, who: Admin, change: Annotated[StorageChange, Body()]) -> StorageDetailPublic:
    """Change a storage (an admin token), as `dlm storage set` does: `state` (online,
    draining, offline, retired, as `dlm storage online|drain|offline|retire`; or the switches
    `online` and `draining`), `tier`, `capacity_bytes` (null clears it). Only the fields given
    change; the rebalance pipeline then moves copies off a draining storage."""
    with session_scope() as s:
        storages.change_storage(name, change, session=s, actor=who.owner)
    with session_scope() as s:
        return public.storage_detail(name, session=s)


@router.get("/datasets", response_model=list[DatasetPublic], tags=["datasets"])
def list_datasets(who: Who) -> list[DatasetPublic]:
    """Your datasets (an admin: every one), by name."""
    with session_scope() as s:
        return access.datasets(session=s, owner=scope(who))


@router.post("/datasets", response_model=DatasetPublic, status_code=201, tags=["datasets"])
def create_dataset(who: Who, data: Annotated[DatasetCreate, Body()]) -> DatasetPublic:
    """Save a named filter (`name`, `where`, optionally `description`), as `dlm datasets
    create`; it is yours (an admin may give `owner`). 409 if the name is taken."""
    if data.owner is not None and data.owner != who.owner and not who.admin:
        raise InvalidValueError("invalid owner: only an admin token may create for another owner")
    owned = data.model_copy(update={"owner": data.owner or who.owner})
    with session_scope() as s:
        return DatasetPublic.of(catalog.create_dataset(owned, session=s, actor=who.owner))


@router.delete("/datasets/{name}", status_code=204, tags=["datasets"])
def delete_dataset(name: str, who: Who) -> None:
    """Delete one of your datasets (the filter only: its items stay), as `dlm datasets delete`."""
    with session_scope() as s:
        ds = access.visible_dataset(name, session=s, owner=scope(who))
        catalog.delete_dataset(ds.name, session=s, actor=who.owner)


@router.get("/datasets/{name}/items", response_model=ItemsPage, tags=["datasets"])
def dataset_items(name: str, who: Who, limit: Limit = 100, cursor: Cursor = None) -> ItemsPage:
    """A dataset's current members you may see, paged as GET /items."""
    with session_scope() as s:
        where = access.visible_dataset(name, session=s, owner=scope(who)).where
    return items_page(who, where, limit, cursor)


@router.get("/events", response_model=EventsPage, tags=["events"])
def list_events(who: Who, since: Since = 0, limit: Limit = 100) -> EventsPage:
    """Audit events after event id `since`, oldest first (an owner: its items' events); poll
    with the next_since of the previous answer."""
    with session_scope() as s:
        rows = access.events_page(session=s, owner=scope(who), since=since, limit=limit)
    return EventsPage(events=rows, next_since=rows[-1].id if rows else since)
