"""Output models: what every listing shows, built in the core so every edge shows the same.

The `dlm` CLI prints these as JSON (`--json`) and renders its tables from them; a REST API
returns them. The JSON keys are the ones the CLI has always printed. Times serialise as ISO 8601
with an explicit `+00:00` offset (StoragePublic, older, keeps pydantic's `Z`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, PlainSerializer
from sqlmodel import Session

from lifecycle.catalogue import catalog, storages
from lifecycle.catalogue.models import Dataset, Event, Item, Replica, StoragePublic
from lifecycle.errors import InvalidValueError
from lifecycle.states import ItemState, Phase, ReplicaState

IsoDateTime = Annotated[datetime, PlainSerializer(lambda v: v.isoformat(), return_type=str, when_used="json")]


class ItemPublic(BaseModel):
    """One item version, as listed."""

    oid: uuid.UUID
    name: str
    version: int
    size: int
    checksum: str | None
    checksum_algo: str | None
    state: ItemState
    target_phase: Phase
    owner: str | None
    created_at: IsoDateTime
    expires_at: IsoDateTime | None
    metadata: dict[str, Any]

    @classmethod
    def of(cls, item: Item) -> ItemPublic:
        return cls(
            oid=item.oid,
            name=item.name,
            version=item.version,
            size=item.size,
            checksum=item.checksum,
            checksum_algo=item.checksum_algo,
            state=ItemState(item.state),
            target_phase=Phase(item.target_phase),
            owner=item.owner,
            created_at=item.created_at,
            expires_at=item.expires_at,
            metadata=item.meta,
        )


class ReplicaPublic(BaseModel):
    """One copy of an item, with the name of its storage."""

    uid: uuid.UUID
    storage: str
    path: str
    state: ReplicaState
    expires_at: IsoDateTime | None
    verified_at: IsoDateTime | None

    @classmethod
    def of(cls, replica: Replica, storage: str) -> ReplicaPublic:
        return cls(
            uid=replica.uid,
            storage=storage,
            path=replica.path,
            state=ReplicaState(replica.state),
            expires_at=replica.expires_at,
            verified_at=replica.verified_at,
        )


class EventPublic(BaseModel):
    """One audit event."""

    ts: IsoDateTime
    kind: str
    actor: str
    details: dict[str, Any]

    @classmethod
    def of(cls, event: Event) -> EventPublic:
        return cls(ts=event.ts, kind=str(event.kind), actor=event.actor, details=event.details)


class ItemDetailPublic(ItemPublic):
    """An item with its parents, its copies and its latest events (`dlm items show`)."""

    parents: list[str]
    replicas: list[ReplicaPublic]
    events: list[EventPublic]


class DatasetPublic(BaseModel):
    """A dataset (a named, saved filter)."""

    name: str
    where: str
    description: str
    owner: str | None
    created_at: IsoDateTime

    @classmethod
    def of(cls, ds: Dataset) -> DatasetPublic:
        return cls(
            name=ds.name, where=ds.where, description=ds.description, owner=ds.owner, created_at=ds.created_at
        )


class DatasetDetailPublic(BaseModel):
    """A dataset's filter and its current members (`dlm datasets show`)."""

    name: str
    where: str
    members: list[ItemPublic]


class StorageDetailPublic(StoragePublic):
    """A storage with its free space and its copies by state (`dlm storage show`)."""

    free_bytes: int | None
    replicas: dict[str, int]


class StorageUsagePublic(BaseModel):
    """A storage's line in `dlm status`."""

    name: str
    kind: str
    tier: str
    location: str | None
    state: str
    used_bytes: int
    capacity_bytes: int | None
    replicas: int


class StatusPublic(BaseModel):
    """Storages with usage, items by state and by target phase, items below target, live bytes."""

    storages: list[StorageUsagePublic]
    items_by_state: dict[str, int]
    items_by_phase: dict[str, int]
    below_target: int
    bytes: int


class IngestedPublic(BaseModel):
    """An item `dlm ingest` registered."""

    name: str
    version: int
    size: int
    checksum: str | None
    oid: uuid.UUID

    @classmethod
    def of(cls, item: Item) -> IngestedPublic:
        return cls(name=item.name, version=item.version, size=item.size, checksum=item.checksum, oid=item.oid)


# --------------------------------------------------------------------------- builders


def list_items(
    *, session: Session, where: str | None = None, limit: int | None = 1000, offset: int = 0
) -> list[ItemPublic]:
    """Items matching a filter, by name and version (lifecycle.catalogue.catalog.list_items), at
    most `limit` (None: all) after skipping `offset`.

    Raises InvalidFilterError, InvalidValueError (a limit below 1, a negative offset, either
    past the database's integers)."""
    if limit is not None and limit < 1:
        raise InvalidValueError(f"invalid limit {limit}: must be at least 1")
    if offset < 0:
        raise InvalidValueError(f"invalid offset {offset}: must not be negative")
    for what, value in (("limit", limit or 0), ("offset", offset)):
        if value > catalog.MAX_VERSION:  # past the database's integers
            raise InvalidValueError(f"invalid {what} {value}: must be at most {catalog.MAX_VERSION}")
    rows = catalog.list_items(where=where, limit=limit, offset=offset, session=session)
    return [ItemPublic.of(i) for i in rows]


def item_detail(ref: str, *, session: Session, events: int = 50) -> ItemDetailPublic:
    """An item by oid, NAME or NAME@vN with its copies and latest events. Raises ItemNotFoundError."""
    d = catalog.item_detail(ref, session=session, events=events)
    return ItemDetailPublic(
        **dict(ItemPublic.of(d.item)),
        parents=list(d.item.parents),
        replicas=[ReplicaPublic.of(r, name) for r, name in d.replicas],
        events=[EventPublic.of(e) for e in d.events],
    )


def storage_detail(name: str, *, session: Session) -> StorageDetailPublic:
    """A storage with free space and its copies by state. Raises StorageNotFoundError."""
    st = storages.get_storage(name, session=session)
    pub = storages.storage_public(st, session=session)
    free = pub.capacity_bytes - pub.used_bytes if pub.capacity_bytes is not None else None
    counts = storages.storage_replica_counts(st.id, session=session)
    return StorageDetailPublic(**dict(pub), free_bytes=free, replicas=counts)


def list_datasets(*, session: Session) -> list[DatasetPublic]:
    return [DatasetPublic.of(d) for d in catalog.list_datasets(session=session)]


def dataset_detail(name: str, *, session: Session, limit: int | None = 1000) -> DatasetDetailPublic:
    """A dataset and its current members (at most `limit`). Raises DatasetNotFoundError."""
    ds = catalog.get_dataset(name, session=session)
    return DatasetDetailPublic(
        name=ds.name, where=ds.where, members=list_items(where=ds.where, limit=limit, session=session)
    )


def status(*, session: Session) -> StatusPublic:
    st = catalog.status(session=session)
    return StatusPublic(
        storages=[StorageUsagePublic(**vars(u)) for u in st.storages],
        items_by_state=st.items_by_state,
        items_by_phase=st.items_by_phase,
        below_target=st.below_target,
        bytes=st.bytes_total,
    )


def ingested(items: Iterable[Item]) -> list[IngestedPublic]:
    return [IngestedPublic.of(i) for i in items]
