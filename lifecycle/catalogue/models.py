"""The catalogue's tables (SQLModel) and their input/output models.

Table models do not validate on construction, so input is validated by the
`*Create` models first (`StorageCreate` here, the others in lifecycle.catalogue.inputs); output
goes through the `*Public` models (`StoragePublic` here, the others in lifecycle.catalogue.public).
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import field_validator, model_validator
from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    Index,
    Integer,
    String,
    UniqueConstraint,
)
from sqlalchemy import DateTime as SADateTime
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import AutoString, Field, SQLModel

from lifecycle.catalogue.inputs import OneLineErrors, field_label, parse_choice
from lifecycle.errors import InvalidValueError
from lifecycle.names import validate_endpoint, validate_slug
from lifecycle.states import (
    EventKind,
    ItemState,
    ItemType,
    Phase,
    ReplicaState,
    StorageKind,
    StorageState,
    Tier,
    TransferKind,
    TransferState,
    check_constraint,
)
from lifecycle.units import parse_size


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp on every backend (SQLite stores naive UTC)."""

    impl = SADateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")
BigIntType = BigInteger().with_variant(Integer(), "sqlite")


# --------------------------------------------------------------------------- Location


class Location(SQLModel, table=True):
    __tablename__ = "location"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(unique=True, max_length=128)
    description: str = ""


# --------------------------------------------------------------------------- Storage


class StorageBase(SQLModel):
    name: str = Field(max_length=64)
    kind: StorageKind = Field(sa_type=String(16))
    root: str
    tier: Tier = Field(default=Tier.HOT, sa_type=String(16))
    capacity_bytes: int | None = Field(default=None, sa_type=BigIntType)
    # S3: endpoint URL and region; credentials come from <credentials_env>_ACCESS_KEY_ID
    # and <credentials_env>_SECRET_ACCESS_KEY (default AWS_...), never from the DB.
    endpoint: str | None = None
    region: str | None = None
    credentials_env: str | None = None
    # Whether verify may trust a checksum the storage keeps (same algorithm only).
    trust_stored_checksums: bool = False


class StorageCreate(OneLineErrors, StorageBase):
    """A storage to register, as `dlm storage add` (or any edge) gives it: kind and tier in any
    letter case, a capacity in bytes or as text (`10GiB`). Refuses a bad value with
    InvalidValueError (or InvalidNameError), one line; see lifecycle.catalogue.inputs."""

    location: str | None = None

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        return validate_slug(value, what="storage name")

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, value: Any) -> StorageKind:
        kind = parse_choice(value, StorageKind, "storage kind")
        if kind is StorageKind.MEMORY:
            raise InvalidValueError("memory storages exist for unit tests only")
        return kind

    @field_validator("tier", mode="before")
    @classmethod
    def _tier(cls, value: Any) -> Tier:
        return parse_choice(value, Tier, "tier")

    @field_validator("capacity_bytes", mode="before")
    @classmethod
    def _capacity_text(cls, value: Any) -> Any:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("capacity_bytes")
    @classmethod
    def _capacity(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("capacity must be positive")
        return value

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return None if value is None else validate_endpoint(value)

    @field_validator("credentials_env")
    @classmethod
    def _credentials_env(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Z_][A-Z0-9_]*", value):
            raise InvalidValueError(
                f"invalid credentials env prefix {value!r}: use upper-case letters, digits, _"
            )
        return value

    @model_validator(mode="after")
    def _s3_only(self) -> StorageCreate:
        if self.kind is not StorageKind.S3 and (self.endpoint or self.region):
            endpoint, region = field_label("endpoint"), field_label("region")
            raise InvalidValueError(f"{endpoint} and {region} apply to s3 storages only")
        return self


class Storage(StorageBase, table=True):
    __tablename__ = "storage"
    __table_args__ = (
        UniqueConstraint("name", name="uq_storage_name"),
        CheckConstraint(check_constraint("kind", StorageKind), name="ck_storage_kind"),
        CheckConstraint(check_constraint("tier", Tier), name="ck_storage_tier"),
        CheckConstraint(check_constraint("state", StorageState), name="ck_storage_state"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    location_id: uuid.UUID | None = Field(default=None, foreign_key="location.id")
    used_bytes: int = Field(default=0, sa_type=BigIntType)
    state: StorageState = Field(default=StorageState.ONLINE, sa_type=String(16))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class StoragePublic(StorageBase):
    id: uuid.UUID
    location: str | None = None
    used_bytes: int
    state: StorageState
    created_at: datetime


# --------------------------------------------------------------------------- Item


class ItemBase(SQLModel):
    name: str
    version: int = 1
    size: int = Field(default=0, sa_type=BigIntType)
    checksum: str | None = None
    checksum_algo: str | None = None
    item_type: ItemType = Field(default=ItemType.FILE, sa_type=String(16))
    target_phase: Phase = Field(default=Phase.GAS, sa_type=String(16))
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    owner: str | None = None
    meta: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)
    parents: list[str] = Field(default_factory=list, sa_type=JSONType)


class Item(ItemBase, table=True):
    __tablename__ = "item"
    __table_args__ = (
        UniqueConstraint("name", "version", name="uq_item_name_version"),
        CheckConstraint(check_constraint("state", ItemState), name="ck_item_state"),
        CheckConstraint(check_constraint("target_phase", Phase), name="ck_item_phase"),
        CheckConstraint(check_constraint("item_type", ItemType), name="ck_item_type"),
        # partial: most items never expire, so bulk loads do not pay for this index
        Index(
            "ix_item_state_expires",
            "state",
            "expires_at",
            sqlite_where=Column("expires_at").isnot(None),
            postgresql_where=Column("expires_at").isnot(None),
        ),
        Index("ix_item_created", "created_at"),
        # PostgreSQL: `meta.KEY = 'text'` filters also ask `meta @> {...}`, which this serves
        Index(
            "ix_item_meta", "meta", postgresql_using="gin", postgresql_ops={"meta": "jsonb_path_ops"}
        ).ddl_if(dialect="postgresql"),
    )

    oid: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    state: ItemState = Field(default=ItemState.INITIALISED, sa_type=String(16))
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


# --------------------------------------------------------------------------- Replica


class Replica(SQLModel, table=True):
    __tablename__ = "replica"
    __table_args__ = (
        CheckConstraint(check_constraint("state", ReplicaState), name="ck_replica_state"),
        Index("ix_replica_item", "item_oid"),
        Index(
            "ix_replica_state_expires",
            "state",
            "expires_at",
            sqlite_where=Column("expires_at").isnot(None),
            postgresql_where=Column("expires_at").isnot(None),
        ),
        # verify's order (verified_at ASC NULLS FIRST, uid): SQLite walks this index for it; on
        # PostgreSQL an ascending index puts NULLs last and cannot serve it (migration 0007)
        Index("ix_replica_verified", "verified_at").ddl_if(dialect="sqlite"),
        # Every copy at a path, LOST and DELETED ones included (reconcile loads those too).
        Index("ix_replica_storage_path", "storage_id", "path"),
        # One owner per byte: a path on a storage is held by at most one live copy.
        Index(
            "uq_replica_storage_path_live",
            "storage_id",
            "path",
            unique=True,
            sqlite_where=Column("state").notin_(["DELETED", "LOST"]),
            postgresql_where=Column("state").notin_(["DELETED", "LOST"]),
        ),
        # At most one live copy of an item on a storage.
        Index(
            "uq_replica_live",
            "item_oid",
            "storage_id",
            unique=True,
            sqlite_where=Column("state").notin_(["DELETED", "LOST"]),
            postgresql_where=Column("state").notin_(["DELETED", "LOST"]),
        ),
    )

    uid: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    item_oid: uuid.UUID = Field(foreign_key="item.oid")
    storage_id: uuid.UUID = Field(foreign_key="storage.id")
    path: str
    state: ReplicaState = Field(default=ReplicaState.PENDING, sa_type=String(16))
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    verified_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # host:pid of the process that holds an in-flight row (PENDING/COPYING/DELETING), so the
    # next run can tell a dead claim from a live one.
    claimed_by: str | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


# --------------------------------------------------------------------------- Transfer


class Transfer(SQLModel, table=True):
    __tablename__ = "transfer"
    __table_args__ = (
        CheckConstraint(check_constraint("state", TransferState), name="ck_transfer_state"),
        CheckConstraint(check_constraint("kind", TransferKind), name="ck_transfer_kind"),
        Index("ix_transfer_item", "item_oid"),
        Index("ix_transfer_state", "state"),
    )

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    item_oid: uuid.UUID | None = Field(default=None, foreign_key="item.oid")
    replica_uid: uuid.UUID | None = None
    kind: TransferKind = Field(default=TransferKind.COPY, sa_type=String(16))
    src_storage_id: uuid.UUID | None = Field(default=None, foreign_key="storage.id")
    dst_storage_id: uuid.UUID | None = Field(default=None, foreign_key="storage.id")
    state: TransferState = Field(default=TransferState.PENDING, sa_type=String(16))
    bytes: int = Field(default=0, sa_type=BigIntType)
    duration_s: float = 0.0
    attempts: int = 0
    error: str | None = None
    flow_run_id: str | None = None
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


# --------------------------------------------------------------------------- Event


class Event(SQLModel, table=True):
    """Append-only audit record of one state change."""

    __tablename__ = "event"
    __table_args__ = (
        CheckConstraint(check_constraint("kind", EventKind), name="ck_event_kind"),
        Index("ix_event_item", "item_oid"),
        # no index on ts: events are read by item, storage or id, never by time (migration 0007)
        # storage-level events only (item events carry an item_oid), for "last state change"
        Index(
            "ix_event_storage",
            "storage_id",
            "id",
            sqlite_where=Column("item_oid").is_(None),
            postgresql_where=Column("item_oid").is_(None),
        ),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigIntType)
    ts: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    kind: EventKind = Field(sa_type=AutoString)
    item_oid: uuid.UUID | None = None
    replica_uid: uuid.UUID | None = None
    storage_id: uuid.UUID | None = None
    actor: str = "user"
    details: dict[str, Any] = Field(default_factory=dict, sa_type=JSONType)


# --------------------------------------------------------------------------- Dataset


class Dataset(SQLModel, table=True):
    """A named, saved filter; its members are computed when it is read."""

    __tablename__ = "dataset"
    __table_args__ = (UniqueConstraint("name", name="uq_dataset_name"),)

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    name: str = Field(max_length=128)
    where: str
    description: str = ""
    owner: str | None = None
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
