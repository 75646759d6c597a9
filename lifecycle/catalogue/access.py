"""Reads scoped to an owner, in pages: what the REST API shows a token's owner.

`owner=None` means an administrator: everything. Otherwise only the owner's items and datasets
exist: another owner's item is ItemNotFoundError, exactly as an item that does not exist, so a
caller learns nothing about what it may not see. Pages are keyset pages (by name and version
for items, by id for events): a page after another never repeats or skips a row that existed
when the first page was read, whatever is inserted in between.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select, text, tuple_
from sqlalchemy.orm import aliased
from sqlmodel import Session, col

from lifecycle.catalogue.metadata import unstorable
from lifecycle.catalogue.models import Dataset, Event, Item, Replica, Storage
from lifecycle.catalogue.public import (
    DatasetPublic,
    EventPublic,
    ItemPublic,
    ReplicaPublic,
)
from lifecycle.catalogue.query_sql import compile_filter, index_documents
from lifecycle.errors import DatasetNotFoundError, InvalidValueError, ItemNotFoundError

MAX_PAGE = 1000


class EventRowPublic(EventPublic):
    """An audit event with its id (to page with `since`) and its item, if any."""

    id: int
    item_oid: uuid.UUID | None

    @classmethod
    def of_row(cls, event: Event) -> EventRowPublic:
        return cls(
            id=int(event.id or 0),
            item_oid=event.item_oid,
            ts=event.ts,
            kind=str(event.kind),
            actor=event.actor,
            details=event.details,
        )


class ItemPage(BaseModel):
    items: list[ItemPublic]
    last: tuple[str, int] | None  # (name, version) of the last row, when more may follow


def check_limit(limit: int) -> int:
    """A page size from 1 to MAX_PAGE. Raises InvalidValueError."""
    if limit < 1 or limit > MAX_PAGE:
        raise InvalidValueError(f"invalid limit {limit}: must be 1 to {MAX_PAGE}")
    return limit


def _scope(owner: str | None) -> Any:
    return True if owner is None else col(Item.owner) == owner


def items_page(
    *,
    session: Session,
    owner: str | None,
    where: str | None = None,
    after: tuple[str, int] | None = None,
    limit: int = 100,
) -> ItemPage:
    """The items matching `where` that `owner` may see, by name and version, after `after`.

    Raises InvalidFilterError, InvalidValueError (a limit out of range)."""
    check_limit(limit)
    stmt = select(Item).where(_scope(owner))
    if where is not None:
        stmt = stmt.where(compile_filter(where))
    if after is not None:
        name, version = after
        # a row comparison, which the (name, version) index answers as a range: a late page
        # starts at its cursor instead of reading every earlier row
        stmt = stmt.where(tuple_(col(Item.name), col(Item.version)) > tuple_(name, version))
    rows = _from_index(session, stmt, where, limit + 1)
    if rows is None:
        ordered = stmt.order_by(col(Item.name), col(Item.version)).limit(limit + 1)
        rows = list(session.execute(ordered).scalars().all())
    more = len(rows) > limit
    rows = rows[:limit]
    last = (rows[-1].name, rows[-1].version) if more and rows else None
    return ItemPage(items=[ItemPublic.of(i) for i in rows], last=last)


# A metadata filter matching at most this many items is answered from the GIN index (then
# sorted); one matching more walks the items in name order until the page is full. The two
# plans cost the same, for a million items whose matches are spread evenly in name order, at
# about sqrt(100 x 1,000,000) = 10,000 matches; matches that cluster in name order (a run's
# items share a prefix) make the walk much longer, so the index is kept up to twice that.
INDEX_ROWS = 20_000
SAMPLE_FROM_ROWS = 100_000  # smaller catalogues: no sample, the capped index read decides
_SAMPLE_PERCENT = 1


def _from_index(session: Session, stmt: Any, where: str | None, n: int) -> list[Item] | None:
    """On PostgreSQL, for a filter with a metadata equality (`meta.KEY = 'x'`), the first `n`
    rows of `stmt` by name and version read through the GIN index ix_item_meta, when few items
    match; None otherwise (and elsewhere): then the items are walked in name order.

    PostgreSQL cannot estimate how many items a JSON value matches (it guesses about 0.5%), so
    left alone it may walk a million items in name order for a value ten items hold. Here a 1%
    sample of the table's pages estimates the matches; at most INDEX_ROWS: they are read from
    the index (at most INDEX_ROWS + 1 of them) and sorted, and their count says whether that
    was all of them (else the walk, after all)."""
    docs = [] if where is None else index_documents(where)
    if not docs or session.get_bind().dialect.name != "postgresql":
        return None
    params = {f"doc{i}": doc for i, doc in enumerate(docs)}
    contains = " AND ".join(f"meta @> CAST(:doc{i} AS JSONB)" for i in range(len(docs)))
    total = session.execute(text("SELECT reltuples FROM pg_class WHERE oid = 'item'::regclass")).scalar()
    if total is not None and total >= SAMPLE_FROM_ROWS:
        hits, seen = session.execute(
            text(
                f"SELECT count(*) FILTER (WHERE {contains}), count(*) "
                f"FROM item TABLESAMPLE SYSTEM ({_SAMPLE_PERCENT})"
            ),
            params,
        ).one()
        if seen and hits / seen * total > INDEX_ROWS:
            return None
    # the planner may use the index only, for this transaction (a failure rolls it back)
    saved = session.execute(
        text(
            "SELECT current_setting('enable_seqscan'), current_setting('enable_indexscan'), "
            "set_config('enable_seqscan', 'off', true), set_config('enable_indexscan', 'off', true)"
        )
    ).one()
    matches = stmt.limit(INDEX_ROWS + 1).subquery()  # `stmt` holds the containments already
    item = aliased(Item, matches)
    page = select(item, func.count().over()).order_by(col(item.name), col(item.version)).limit(n)
    rows = session.execute(page).all()
    session.execute(
        text("SELECT set_config('enable_seqscan', :seq, true), set_config('enable_indexscan', :idx, true)"),
        {"seq": saved[0], "idx": saved[1]},
    )
    if rows and rows[0][1] > INDEX_ROWS:
        return None
    return [r[0] for r in rows]


def visible_item(oid: uuid.UUID, *, session: Session, owner: str | None) -> Item:
    """An item by oid that `owner` may see. Raises ItemNotFoundError (also for another owner's)."""
    item = session.get(Item, oid)
    if item is None or (owner is not None and item.owner != owner):
        raise ItemNotFoundError(f"no item {str(oid)!r}")
    return item


def item_replicas(oid: uuid.UUID, *, session: Session, owner: str | None) -> list[ReplicaPublic]:
    """An item's copies, oldest first. Raises ItemNotFoundError."""
    item = visible_item(oid, session=session, owner=owner)
    rows = session.execute(
        select(Replica, col(Storage.name))
        .join(Storage, col(Storage.id) == col(Replica.storage_id))
        .where(col(Replica.item_oid) == item.oid)
        .order_by(col(Replica.created_at))
    ).all()
    return [ReplicaPublic.of(r, n) for r, n in rows]


def events_page(
    *,
    session: Session,
    owner: str | None,
    since: int = 0,
    limit: int = 100,
    item: uuid.UUID | None = None,
) -> list[EventRowPublic]:
    """Events with an id above `since`, oldest first: for an owner only its items' events.

    Raises InvalidValueError (a limit out of range, a negative `since`), ItemNotFoundError."""
    check_limit(limit)
    if since < 0:
        raise InvalidValueError(f"invalid since {since}: must not be negative")
    stmt = select(Event).where(col(Event.id) > since)
    if item is not None:
        visible_item(item, session=session, owner=owner)
        stmt = stmt.where(col(Event.item_oid) == item)
    elif owner is not None:
        mine = select(col(Item.oid)).where(col(Item.owner) == owner)
        stmt = stmt.where(col(Event.item_oid).in_(mine))
    rows = session.execute(stmt.order_by(col(Event.id)).limit(limit)).scalars().all()
    return [EventRowPublic.of_row(e) for e in rows]


def datasets(*, session: Session, owner: str | None) -> list[DatasetPublic]:
    """The datasets `owner` may see, by name."""
    stmt = select(Dataset)
    if owner is not None:
        stmt = stmt.where(col(Dataset.owner) == owner)
    return [DatasetPublic.of(d) for d in session.scalars(stmt.order_by(col(Dataset.name))).all()]


def visible_dataset(name: str, *, session: Session, owner: str | None) -> Dataset:
    """A dataset `owner` may see. Raises DatasetNotFoundError (also for another owner's)."""
    ds = (
        None
        if unstorable(name)
        else session.scalars(select(Dataset).where(col(Dataset.name) == name)).first()
    )
    if ds is None or (owner is not None and ds.owner != owner):
        raise DatasetNotFoundError(f"unknown dataset {name[:140]!r}")
    return ds
