"""Item and dataset operations and the catalogue's status: the core the CLI calls.

Every function takes a keyword-only `session`; the caller owns the transaction, so a failure
anywhere leaves the catalogue unchanged. Every state change writes an Event (lifecycle.catalogue.audit).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from lifecycle.catalogue import audit
from lifecycle.catalogue.inputs import DatasetCreate, ExpiryChange, ItemChange, MetadataUpdate, PhaseChange
from lifecycle.catalogue.models import (
    Dataset,
    Event,
    Item,
    Location,
    Replica,
    Storage,
    Transfer,
    utcnow,
)
from lifecycle.catalogue.query_sql import compile_filter
from lifecycle.catalogue.storages import get_storage
from lifecycle.errors import (
    ConflictError,
    DatasetNotFoundError,
    ItemNotFoundError,
    NotFoundError,
    PolicyViolationError,
)
from lifecycle.settings import get_settings
from lifecycle.states import (
    LIVE_ITEM_STATES,
    LIVE_REPLICA_STATES,
    EventKind,
    ItemState,
    Phase,
    ReplicaState,
    StorageState,
)

# --------------------------------------------------------------------------- items


MAX_VERSION = 2**63 - 1  # the largest version (and row count) the database's integers hold


def _parse_ref(ref: str) -> tuple[str, int | None]:
    if "@v" in ref:
        base, _, ver = ref.rpartition("@v")
        if ver.isdigit():
            return base, int(ver)
    return ref, None


def get_item(ref: str, *, session: Session) -> Item:
    """An item by oid, NAME (newest version) or NAME@vN. Raises ItemNotFoundError."""
    try:
        oid = uuid.UUID(ref)
    except ValueError:
        oid = None
    if oid is not None:
        item = session.get(Item, oid)
        if item is not None:
            return item
    name, version = _parse_ref(ref)
    if version is not None and not 1 <= version <= MAX_VERSION:
        # versions start at 1: NAME@v0 is no item (not the newest version), nor is a number
        # too large for the database's integer
        raise ItemNotFoundError(f"no item {ref!r}")
    stmt = select(Item).where(col(Item.name) == name)
    if version is None:
        stmt = stmt.order_by(col(Item.version).desc())
    else:
        stmt = stmt.where(col(Item.version) == version)
    found = session.scalars(stmt).first()
    if found is None:
        raise ItemNotFoundError(f"no item {ref!r}")
    return found


def list_items(
    *, session: Session, where: str | None = None, limit: int | None = 1000, offset: int = 0
) -> list[Item]:
    """Items matching a filter expression (lifecycle.catalogue.query), newest first by name and version.

    Raises InvalidFilterError.
    """
    stmt = select(Item)
    if where is not None:  # "" is an empty filter (an error), not "no filter"
        stmt = stmt.where(compile_filter(where))
    stmt = stmt.order_by(col(Item.name), col(Item.version)).offset(offset)
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.execute(stmt).scalars().all())


def iter_items(*, session: Session, where: str | None = None, chunk: int = 5000) -> Iterator[Item]:
    """Every matching item, streamed. Raises InvalidFilterError."""
    stmt = select(Item)
    if where is not None:
        stmt = stmt.where(compile_filter(where))
    stmt = stmt.order_by(col(Item.name), col(Item.version)).execution_options(yield_per=chunk)
    yield from session.execute(stmt).scalars()


@dataclass
class ItemDetail:
    item: Item
    replicas: list[tuple[Replica, str]]  # replica, storage name
    events: list[Event]


def item_detail(ref: str, *, session: Session, events: int = 50) -> ItemDetail:
    item = get_item(ref, session=session)
    reps = session.execute(
        select(Replica, col(Storage.name))
        .join(Storage, col(Storage.id) == col(Replica.storage_id))
        .where(col(Replica.item_oid) == item.oid)
        .order_by(col(Replica.created_at))
    ).all()
    evs = (
        session.execute(
            select(Event).where(col(Event.item_oid) == item.oid).order_by(col(Event.id).desc()).limit(events)
        )
        .scalars()
        .all()
    )
    return ItemDetail(item, [(r, n) for r, n in reps], list(reversed(evs)))


def set_phase(ref: str, phase: Phase | str, *, session: Session, actor: str = "user") -> Item:
    """Change an item's target phase (the pipelines then converge placement to it).

    `phase` is validated through PhaseChange (any letter case). Raises InvalidValueError,
    ItemNotFoundError, PolicyViolationError (an expired or deleted item)."""
    phase = PhaseChange(phase=phase).phase
    item = get_item(ref, session=session)
    if item.state in (ItemState.EXPIRED, ItemState.DELETED):
        raise PolicyViolationError(f"item {item.name} v{item.version} is {item.state}: its phase is final")
    old = item.target_phase
    item.target_phase = phase
    item.updated_at = utcnow()
    session.add(item)
    audit.record(
        session,
        EventKind.ITEM_PHASE_CHANGED,
        item_oid=item.oid,
        actor=actor,
        details={"from": str(old), "to": phase.value},
    )
    return item


def set_expiry(
    ref: str, expires_at: datetime | ExpiryChange | None, *, session: Session, actor: str = "user"
) -> Item:
    """Set or clear an item's expiry time (an ExpiryChange counts a lifetime from now).

    Raises ItemNotFoundError, PolicyViolationError (an expired or deleted item)."""
    if isinstance(expires_at, ExpiryChange):
        expires_at = expires_at.expires_at(utcnow())
    item = get_item(ref, session=session)
    if item.state in (ItemState.EXPIRED, ItemState.DELETED):
        raise PolicyViolationError(f"item {item.name} v{item.version} is already {item.state}")
    old = item.expires_at
    item.expires_at = expires_at
    item.updated_at = utcnow()
    session.add(item)
    audit.record(
        session,
        EventKind.ITEM_EXPIRY_CHANGED,
        item_oid=item.oid,
        actor=actor,
        details={
            "from": old.isoformat() if old else None,
            "to": expires_at.isoformat() if expires_at else None,
        },
    )
    return item


def set_metadata(ref: str, update: MetadataUpdate, *, session: Session, actor: str = "user") -> Item:
    """Set metadata keys on an item (MetadataUpdate: a dotted key sets a nested one; the keys
    not given stay). The row is locked while it is read and written, so two updates of
    different keys both land.

    Raises ItemNotFoundError, PolicyViolationError (an expired or deleted item),
    InvalidMetadataError (a key through a value that is not an object, metadata too large)."""
    item = get_item(ref, session=session)
    session.flush()  # a refresh would drop this transaction's pending changes to the row
    session.refresh(item, with_for_update=True)
    if item.state in (ItemState.EXPIRED, ItemState.DELETED):
        raise PolicyViolationError(f"item {item.name} v{item.version} is {item.state}: its metadata is final")
    item.meta = update.applied(dict(item.meta or {}))
    item.updated_at = utcnow()
    session.add(item)
    audit.record(
        session,
        EventKind.ITEM_METADATA_CHANGED,
        item_oid=item.oid,
        actor=actor,
        details={"set": update.values},
    )
    return item


def change_item(ref: str, change: ItemChange, *, session: Session, actor: str = "user") -> Item:
    """Apply an ItemChange (phase, expiry, metadata) in the caller's transaction: each part as
    its own operation does it (set_phase, set_expiry, set_metadata), one event each; a refusal
    of any part changes nothing once the caller rolls back.

    Raises what those raise."""
    item = get_item(ref, session=session)
    ref = str(item.oid)
    if change.phase is not None:
        item = set_phase(ref, change.phase, session=session, actor=actor)
    expiry = change.expiry
    if expiry is not None:
        item = set_expiry(ref, expiry, session=session, actor=actor)
    update = change.metadata_update
    if update is not None:
        item = set_metadata(ref, update, session=session, actor=actor)
    return item


@dataclass
class CopyExpiry:
    """A copy whose expiry was set: the item, the copy, its storage's name, how many intact
    copies the item has and how many its phase needs (at least 1): the expire pipeline keeps an
    intact copy whose deletion would leave fewer."""

    item: Item
    replica: Replica
    storage: str
    intact: int
    needed: int

    @property
    def kept_by_policy(self) -> bool:
        """Whether expire would keep this copy now (it is intact and the item needs it)."""
        return self.replica.state == ReplicaState.READY and self.intact - 1 < self.needed


def set_replica_expiry(
    ref: str, storage: str, change: ExpiryChange, *, session: Session, actor: str = "user"
) -> CopyExpiry:
    """Set or clear when one copy of an item expires (the copy on `storage`); the expire
    pipeline then deletes it if the item keeps its target phase and another intact copy
    without it, else records a `policy.refused` event and keeps it.

    Raises ItemNotFoundError, StorageNotFoundError, NotFoundError (no live copy there),
    PolicyViolationError (an expired or deleted item), ConflictError (the copy is being deleted)."""
    expires_at = change.expires_at(utcnow())
    item = get_item(ref, session=session)
    if item.state in (ItemState.EXPIRED, ItemState.DELETED):
        raise PolicyViolationError(f"item {item.name} v{item.version} is already {item.state}")
    st = get_storage(storage, session=session)
    replica = session.scalars(
        select(Replica)
        .where(
            col(Replica.item_oid) == item.oid,
            col(Replica.storage_id) == st.id,
            col(Replica.state).notin_([ReplicaState.DELETED.value, ReplicaState.LOST.value]),
        )
        .with_for_update()
    ).first()
    label = f"{item.name} v{item.version}"
    if replica is None:
        raise NotFoundError(f"{label} has no copy on storage {st.name!r}")
    if replica.state == ReplicaState.DELETING:
        raise ConflictError(f"the copy of {label} on storage {st.name!r} is being deleted")
    old = replica.expires_at
    replica.expires_at = expires_at
    replica.updated_at = utcnow()
    session.add(replica)
    audit.record(
        session,
        EventKind.REPLICA_EXPIRY_CHANGED,
        item_oid=item.oid,
        replica_uid=replica.uid,
        storage_id=st.id,
        actor=actor,
        details={
            "storage": st.name,
            "path": replica.path,
            "from": old.isoformat() if old else None,
            "to": expires_at.isoformat() if expires_at else None,
        },
    )
    intact = session.execute(
        select(func.count())
        .select_from(Replica)
        .join(Storage, col(Storage.id) == col(Replica.storage_id))
        .where(
            col(Replica.item_oid) == item.oid,
            col(Replica.state) == ReplicaState.READY.value,
            col(Storage.state).in_([StorageState.ONLINE.value, StorageState.DRAINING.value]),
        )
    ).one()[0]
    p = get_settings().policy
    copies = {Phase.PLASMA: p.copies_plasma, Phase.GAS: p.copies_gas, Phase.LIQUID: p.copies_liquid}
    needed = max(1, copies.get(Phase(item.target_phase), p.copies_solid))
    return CopyExpiry(item, replica, st.name, int(intact), needed)


# --------------------------------------------------------------------------- datasets


def create_dataset(data: DatasetCreate, *, session: Session, actor: str = "user") -> Dataset:
    """Save a named filter (validated when `data` was built: InvalidNameError, InvalidFilterError).
    Raises ConflictError (the name is taken)."""
    name, where = data.name, data.where
    if session.execute(select(col(Dataset.id)).where(col(Dataset.name) == name)).first() is not None:
        raise ConflictError(f"dataset {name!r} already exists")
    ds = Dataset(name=name, where=where, description=data.description, owner=data.owner)
    session.add(ds)
    try:
        session.flush()
    except IntegrityError as exc:  # created by another request since the check above
        if "uq_dataset_name" not in str(exc.orig) and "dataset.name" not in str(exc.orig):
            raise
        raise ConflictError(f"dataset {name!r} already exists") from None
    audit.record(session, EventKind.DATASET_CREATED, actor=actor, details={"name": name, "where": where})
    return ds


def get_dataset(name: str, *, session: Session) -> Dataset:
    ds = session.scalars(select(Dataset).where(col(Dataset.name) == name)).first()
    if ds is None:
        raise DatasetNotFoundError(f"unknown dataset {name!r}")
    return ds


def list_datasets(*, session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(col(Dataset.name))).all())


def delete_dataset(name: str, *, session: Session, actor: str = "user") -> None:
    ds = get_dataset(name, session=session)
    session.delete(ds)
    audit.record(session, EventKind.DATASET_DELETED, actor=actor, details={"name": name})


# --------------------------------------------------------------------------- status


def required_copies_expr() -> Any:
    """SQL CASE giving the copies an item's target phase needs (from the policy settings)."""
    p = get_settings().policy
    return case(
        (col(Item.target_phase) == Phase.SOLID.value, p.copies_solid),
        (col(Item.target_phase) == Phase.LIQUID.value, p.copies_liquid),
        (col(Item.target_phase) == Phase.GAS.value, p.copies_gas),
        else_=p.copies_plasma,
    )


def intact_counts_subquery() -> Any:
    """Per item, the number of READY replicas on storages that are not offline or retired."""
    return (
        select(col(Replica.item_oid).label("item_oid"), func.count().label("n"))
        .join(Storage, col(Storage.id) == col(Replica.storage_id))
        .where(
            col(Replica.state) == ReplicaState.READY.value,
            col(Storage.state).in_([StorageState.ONLINE.value, StorageState.DRAINING.value]),
        )
        .group_by(col(Replica.item_oid))
        .subquery()
    )


@dataclass
class StorageUsage:
    name: str
    kind: str
    tier: str
    location: str | None
    state: str
    used_bytes: int
    capacity_bytes: int | None
    replicas: int


@dataclass
class Status:
    storages: list[StorageUsage]
    items_by_state: dict[str, int]
    items_by_phase: dict[str, int]
    below_target: int
    bytes_total: int


def _live_items() -> Any:
    return col(Item.state).in_([s.value for s in LIVE_ITEM_STATES])


def below_target_subquery() -> Any:
    """The live items with fewer intact copies than their target phase needs: columns `oid`,
    `name`, `version`, `target_phase`, `intact` (READY copies on online or draining storages)
    and `required`. `status` counts it; the dashboard lists the first few."""
    counts = intact_counts_subquery()
    intact = func.coalesce(counts.c.n, 0)
    required = required_copies_expr()
    return (
        select(
            col(Item.oid).label("oid"),
            col(Item.name).label("name"),
            col(Item.version).label("version"),
            col(Item.target_phase).label("target_phase"),
            intact.label("intact"),
            required.label("required"),
        )
        .outerjoin(counts, counts.c.item_oid == col(Item.oid))
        .where(_live_items(), intact < required)
        .subquery()
    )


def status(*, session: Session) -> Status:
    """Storages with usage, items by state and by target phase, items below their target:
    a fixed number of statements (GROUP BY), whatever the number of items."""
    rep_counts: dict[uuid.UUID, int] = {
        sid: int(n)
        for sid, n in session.execute(
            select(col(Replica.storage_id), func.count())
            .where(col(Replica.state).in_(LIVE_REPLICA_STATES))
            .group_by(col(Replica.storage_id))
        ).all()
    }
    rows = session.execute(
        select(Storage, col(Location.name))
        .outerjoin(Location, col(Location.id) == col(Storage.location_id))
        .order_by(col(Storage.name))
    ).all()
    storages = [
        StorageUsage(
            s.name,
            str(s.kind),
            str(s.tier),
            loc,
            str(s.state),
            int(s.used_bytes),
            s.capacity_bytes,
            int(rep_counts.get(s.id, 0)),
        )
        for s, loc in rows
    ]
    by_state = {
        str(k): int(v)
        for k, v in session.execute(select(col(Item.state), func.count()).group_by(col(Item.state))).all()
    }
    by_phase = {
        str(k): int(v)
        for k, v in session.execute(
            select(col(Item.target_phase), func.count()).where(_live_items()).group_by(col(Item.target_phase))
        ).all()
    }
    below = session.execute(select(func.count()).select_from(below_target_subquery())).one()[0]
    total = session.execute(select(func.coalesce(func.sum(col(Item.size)), 0)).where(_live_items())).one()[0]
    return Status(storages, by_state, by_phase, int(below), int(total))


def table_counts(*, session: Session) -> Mapping[str, int]:
    """Rows per catalogue table (used by tests and `dlm status --json`)."""
    out: dict[str, int] = {}
    for model in (Location, Storage, Item, Replica, Transfer, Event, Dataset):
        out[model.__tablename__] = int(session.execute(select(func.count()).select_from(model)).one()[0])
    return out


def current_actor() -> str:
    """Who acts: DLM_OWNER, else the login name."""
    return get_settings().owner or os.environ.get("USER") or "user"
