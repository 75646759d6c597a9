"""Input models: what a user may ask the catalogue to create or change, validated in one place.

Every edge (the `dlm` CLI, a REST API) hands raw values (text as typed, or JSON) to these models,
and the catalogue operations validate through them, so every edge gets the same rules. A model
refuses a bad value with InvalidValueError or one of its subclasses (InvalidNameError,
InvalidMetadataError, InvalidFilterError): one line naming the field and the problem, never
pydantic's multi-line ValidationError.

An edge may name a field its own way in messages (the CLI says `--owner` where the field is
`owner`): `Model.build(labels={"owner": "--owner"}, ...)`. `StorageCreate` lives with the
storage tables in lifecycle.catalogue.models and follows the same rules.

Long because every input model is here, so one module is the whole of what an edge may ask.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from lifecycle.catalogue.metadata import (
    MAX_META_KEY_LENGTH,
    is_meta_key,
    set_meta_key,
    unstorable,
    validate_metadata,
)
from lifecycle.catalogue.query_parse import parse
from lifecycle.checksum import ALGORITHMS
from lifecycle.errors import InvalidMetadataError, InvalidValueError
from lifecycle.names import validate_name, validate_owner, validate_slug
from lifecycle.states import Phase, StorageState, Tier
from lifecycle.units import MAX_BYTES, MAX_LIFETIME, parse_duration, parse_size, parse_timestamp

E = TypeVar("E", bound=Enum)
DEFAULT_ALGO = "md5"  # a listed checksum without its algorithm
HEX_DIGITS = {algo: hashlib.new(algo).digest_size * 2 for algo in ALGORITHMS}
_HEX = frozenset("0123456789abcdef")


def invalid_value(exc: ValidationError) -> InvalidValueError:
    """pydantic's ValidationError as one line: `invalid FIELD: PROBLEM` (its first error)."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or exc.title
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return InvalidValueError(f"invalid {field}: {msg}")


def parse_choice(value: Any, enum: type[E], what: str) -> E:
    """A member of `enum` by its value, in any letter case; raises InvalidValueError naming the choices."""
    if isinstance(value, enum):
        return value
    text = str(value)
    for member in enum:
        if text.lower() == str(member.value).lower():
            return member
    choices = ", ".join(str(m.value) for m in enum)
    raise InvalidValueError(f"invalid {what} {text!r}: use one of {choices}")


# How the edge building a model names its fields in messages (InputModel.build).
_LABELS: ContextVar[Mapping[str, str] | None] = ContextVar("input_labels", default=None)


def field_label(field: str) -> str:
    """How the edge now building a model names `field` (`labelled`), else the field's name."""
    return (_LABELS.get() or {}).get(field, field)


@contextmanager
def labelled(labels: Mapping[str, str] | None) -> Iterator[None]:
    """Models built inside name their fields in messages as `labels` says (e.g. owner: --owner)."""
    token = _LABELS.set(labels)
    try:
        yield
    finally:
        _LABELS.reset(token)


class OneLineErrors:
    """Mixin of every input model (also StorageCreate): a refused value is InvalidValueError
    with one line, and `build` names fields the edge's way."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise invalid_value(exc) from None

    @classmethod
    def build(cls, labels: Mapping[str, str] | None = None, **values: Any) -> Self:
        """The model from raw values; `labels` names fields in messages the edge's way."""
        with labelled(labels):
            return cls(**values)


class InputModel(OneLineErrors, BaseModel):
    """Base of the input models: unknown fields refused, errors as InvalidValueError."""

    model_config = ConfigDict(extra="forbid")


def lifetime_value(value: Any) -> Any:
    """A lifetime field's raw value: text parsed (`90d`), a timedelta checked."""
    if isinstance(value, str):
        return parse_duration(value)
    return check_lifetime(value) if isinstance(value, timedelta) else value


def timestamp_value(value: Any) -> Any:
    """A time field's raw value: ISO text parsed."""
    return parse_timestamp(value) if isinstance(value, str) else value


# --------------------------------------------------------------------------- items


def check_lifetime(value: timedelta) -> timedelta:
    """A lifetime as parse_duration allows: positive, at most 1000 years."""
    if value <= timedelta(0):
        raise InvalidValueError(f"invalid lifetime {value}: must be greater than zero")
    if value > MAX_LIFETIME:
        raise InvalidValueError(f"invalid lifetime {value}: longer than 1000 years")
    return value


def valid_size(value: Any) -> int:
    """An item's size: a whole number of bytes, 0 to 2**63-1 (not a bool, not text)."""
    if type(value) is not int or value < 0 or value > MAX_BYTES:
        raise InvalidValueError(f"invalid size {value!r}: must be a non-negative integer")
    return value


def valid_algo(algo: str) -> str:
    """A checksum algorithm DLM knows (lifecycle.checksum.ALGORITHMS)."""
    if algo not in HEX_DIGITS:
        raise InvalidValueError(f"unknown checksum algorithm {algo!r}: use one of {', '.join(ALGORITHMS)}")
    return algo


def valid_checksum(checksum: str, algo: str | None) -> tuple[str, str]:
    """A hex digest (lower-cased) and its algorithm (default md5), the digest as long as the
    algorithm's. Raises InvalidValueError."""
    algo = valid_algo(algo or DEFAULT_ALGO)
    value = checksum.lower()
    if len(value) != HEX_DIGITS[algo] or not _HEX.issuperset(value):
        raise InvalidValueError(
            f"invalid {algo} checksum {value[:140]!r}: must be {HEX_DIGITS[algo]} hex digits"
        )
    return value, algo


class ItemOptions(InputModel):
    """What a user sets on new items (ingest, or the defaults of a bulk list): the target phase,
    when they expire (a lifetime from now, or a time), the owner, metadata and parents."""

    phase: Phase = Phase.GAS
    lifetime: timedelta | None = None
    expires_at: datetime | None = None
    metadata: dict[str, Any] = {}
    owner: str | None = None
    parents: list[str] = []

    @field_validator("phase", mode="before")
    @classmethod
    def _phase(cls, value: Any) -> Phase:
        return parse_choice(value, Phase, "phase")

    @field_validator("lifetime", mode="before")
    @classmethod
    def _lifetime(cls, value: Any) -> Any:
        return lifetime_value(value)

    @field_validator("expires_at", mode="before")
    @classmethod
    def _expires_at(cls, value: Any) -> Any:
        return timestamp_value(value)

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise InvalidMetadataError("invalid metadata: must be a JSON object")
        return validate_metadata(value)

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str | None) -> str | None:
        return None if value is None else validate_owner(value, what=field_label("owner"))

    @field_validator("parents")
    @classmethod
    def _parents(cls, value: list[str]) -> list[str]:
        return [validate_name(p, what="parent name") for p in value]

    @model_validator(mode="after")
    def _one_expiry(self) -> Self:
        if self.lifetime is not None and self.expires_at is not None:
            raise InvalidValueError("give a lifetime or an expiry time, not both")
        return self

    def expiry(self, now: datetime) -> datetime | None:
        """When items created `now` expire (None: never)."""
        return self.expires_at if self.lifetime is None else now + self.lifetime


class ItemCreate(ItemOptions):
    """One new item: its name, size and checksum, and the options above."""

    name: str
    size: int
    checksum: str | None = None
    checksum_algo: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name(value)

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return valid_size(value)

    @field_validator("checksum_algo")
    @classmethod
    def _algo(cls, value: str | None) -> str | None:
        return None if value is None else valid_algo(value)

    @model_validator(mode="after")
    def _checksum(self) -> Self:
        if self.checksum is not None:
            self.checksum, self.checksum_algo = valid_checksum(self.checksum, self.checksum_algo)
        return self


class PhaseChange(InputModel):
    """A new target phase for an item."""

    phase: Phase

    @field_validator("phase", mode="before")
    @classmethod
    def _phase(cls, value: Any) -> Phase:
        return parse_choice(value, Phase, "phase")


class ExpiryChange(InputModel):
    """When an item expires from now on: exactly one of a lifetime from now, a time, or never."""

    lifetime: timedelta | None = None
    at: datetime | None = None
    never: bool = False

    @field_validator("lifetime", mode="before")
    @classmethod
    def _lifetime(cls, value: Any) -> Any:
        return lifetime_value(value)

    @field_validator("at", mode="before")
    @classmethod
    def _at(cls, value: Any) -> Any:
        return timestamp_value(value)

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data: Any) -> Any:
        if isinstance(data, dict):
            given = [data.get("lifetime") is not None, data.get("at") is not None, bool(data.get("never"))]
            if sum(given) != 1:
                names = [field_label(f) for f in ("lifetime", "at", "never")]
                raise InvalidValueError(f"give exactly one of {names[0]}, {names[1]} or {names[2]}")
        return data

    def expires_at(self, now: datetime) -> datetime | None:
        """The new expiry time (None: never)."""
        if self.never:
            return None
        return self.at if self.lifetime is None else now + self.lifetime


# --------------------------------------------------------------------------- storages


class StorageChange(InputModel):
    """What may change on a registered storage, as `dlm storage set` and `PATCH
    /api/storages/{name}` give it: its state (directly, or as the `online` and `draining`
    switches), its tier and its capacity (bytes or text such as `10GiB`; `none` or null clears
    it). Only the fields given change; giving none is refused. Refuses a bad value with
    InvalidValueError, one line, naming the field as the edge does (`--tier`)."""

    state: StorageState | None = None
    online: bool | None = None
    draining: bool | None = None
    tier: Tier | None = None
    capacity_bytes: int | None = None

    @field_validator("state", mode="before")
    @classmethod
    def _state(cls, value: Any) -> StorageState | None:
        return None if value is None else parse_choice(value, StorageState, "storage state")

    @field_validator("tier", mode="before")
    @classmethod
    def _tier(cls, value: Any) -> Tier | None:
        return None if value is None else parse_choice(value, Tier, "tier")

    @field_validator("online", "draining", mode="before")
    @classmethod
    def _switch(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not isinstance(value, bool):
            what = field_label(info.field_name or "value")
            raise InvalidValueError(f"invalid {what} {str(value)[:40]!r}: must be true or false")
        return value

    @field_validator("capacity_bytes", mode="before")
    @classmethod
    def _capacity_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return None if value.strip().lower() in ("none", "unlimited") else parse_size(value)
        if value is not None and type(value) is not int:
            raise InvalidValueError(
                f"invalid {field_label('capacity_bytes')} {str(value)[:40]!r}: a size such as 10GiB"
            )
        return value

    @field_validator("capacity_bytes")
    @classmethod
    def _capacity(cls, value: int | None) -> int | None:
        if value is not None and not 0 < value <= MAX_BYTES:
            raise InvalidValueError(
                f"invalid {field_label('capacity_bytes')} {value}: must be positive (none clears it)"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        label = field_label
        if not self.model_fields_set:
            every = (_LABELS.get() or {}).get("changes", "state, online, draining, tier or capacity_bytes")
            raise InvalidValueError(f"nothing to change: give {every}")
        if self.state is not None and (self.online is not None or self.draining is not None):
            raise InvalidValueError(
                f"give {label('state')} or {label('online')}/{label('draining')}, not both"
            )
        if self.online is False and self.draining is True:
            labels = _LABELS.get() or {}
            draining, offline = labels.get("draining_on", "draining"), labels.get("offline", "online=false")
            raise InvalidValueError(
                f"{draining} and {offline} contradict: a draining storage is still read from "
                "while its copies move elsewhere"
            )
        return self

    @property
    def clears_capacity(self) -> bool:
        return "capacity_bytes" in self.model_fields_set and self.capacity_bytes is None

    def target_state(self, current: StorageState) -> StorageState | None:
        """The state to set (None: leave the state as it is)."""
        if self.state is not None:
            return self.state
        if self.draining:
            return StorageState.DRAINING
        if self.online is True:
            return StorageState.ONLINE
        if self.online is False:
            return StorageState.OFFLINE
        if self.draining is False and current == StorageState.DRAINING:
            return StorageState.ONLINE
        return None


# --------------------------------------------------------------------------- metadata


class MetadataUpdate(InputModel):
    """Metadata keys to set, as `--meta KEY=VALUE` sets them: a dotted key sets a nested one
    (`obs.band` is {"obs": {"band": ...}}), exactly the keys the filter language reads as
    `meta.KEY` (lifecycle.catalogue.metadata.META_KEY)."""

    values: dict[str, Any]

    @field_validator("values", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise InvalidMetadataError("invalid metadata: must be a JSON object")
        for key in value:
            if not isinstance(key, str) or not is_meta_key(key):
                raise InvalidMetadataError(
                    f"invalid metadata key {str(key)[:80]!r}: use letters, digits, _ and -, dots for "
                    f"nested keys (obs.band), at most {MAX_META_KEY_LENGTH} characters"
                )
        # {"a.b": 2, "a": 1} would drop a.b, whichever comes first
        for inner in value:
            parts = inner.split(".")
            above = (".".join(parts[:i]) for i in range(1, len(parts)))
            outer = next((key for key in above if key in value), None)
            if outer is not None:
                raise InvalidMetadataError(
                    f"invalid metadata keys {outer[:80]!r} and {inner[:80]!r}: one would replace the other"
                )
        return value

    def applied(self, meta: dict[str, Any]) -> dict[str, Any]:
        """A copy of `meta` with these keys set, validated (raises InvalidMetadataError); `meta`
        itself, nested objects included, is left as it was."""
        out = copy.deepcopy(meta)
        for key, value in self.values.items():
            set_meta_key(out, key, value)
        return validate_metadata(out)


# --------------------------------------------------------------------------- item changes


class ItemChange(InputModel):
    """Changes to one item in one request (`PATCH /api/items/{oid}`): a new target phase
    (PhaseChange), a new expiry (ExpiryChange: `lifetime` from now, `expires_at`, or `never`),
    metadata keys to set (MetadataUpdate: dotted keys set nested ones, the others stay). Each
    part is validated by the model the CLI's command for it uses; at least one is required."""

    phase: Phase | None = None
    lifetime: timedelta | None = None
    expires_at: datetime | None = None
    never: bool | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("phase", mode="before")
    @classmethod
    def _phase(cls, value: Any) -> Phase | None:
        return None if value is None else PhaseChange(phase=value).phase

    @field_validator("lifetime", mode="before")
    @classmethod
    def _lifetime(cls, value: Any) -> Any:
        return lifetime_value(value)

    @field_validator("expires_at", mode="before")
    @classmethod
    def _expires_at(cls, value: Any) -> Any:
        return timestamp_value(value)

    @field_validator("never", mode="before")
    @classmethod
    def _never(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, bool):
            what = field_label("never")
            raise InvalidValueError(f"invalid {what} {str(value)[:40]!r}: must be true or false")
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> Any:
        return None if value is None else MetadataUpdate(values=value).values

    @model_validator(mode="after")
    def _something(self) -> Self:
        given = (self.phase, self.lifetime, self.expires_at, self.never or None, self.metadata)
        if all(v is None for v in given):
            fields = ("phase", "lifetime", "expires_at", "never", "metadata")
            names = ", ".join(field_label(f) for f in fields)
            raise InvalidValueError(f"nothing to change: give one of {names}")
        _ = self.expiry  # exactly one of lifetime, expires_at, never (when any is given)
        return self

    @property
    def expiry(self) -> ExpiryChange | None:
        """The expiry to set, if one was given."""
        if self.lifetime is None and self.expires_at is None and not self.never:
            return None  # (never: false is no change)
        labels = {f: field_label(f) for f in ("lifetime", "never")} | {"at": field_label("expires_at")}
        with labelled(labels):
            return ExpiryChange(lifetime=self.lifetime, at=self.expires_at, never=bool(self.never))

    @property
    def metadata_update(self) -> MetadataUpdate | None:
        return None if self.metadata is None else MetadataUpdate(values=self.metadata)


# --------------------------------------------------------------------------- datasets


class DatasetCreate(InputModel):
    """A named, saved filter: a slug name and a filter expression that compiles."""

    name: str
    where: str
    description: str = ""
    owner: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_slug(value, what="dataset name")

    @field_validator("description")
    @classmethod
    def _storable(cls, value: str, info: ValidationInfo) -> str:
        why = unstorable(value)
        if why is not None:
            raise InvalidValueError(f"invalid {info.field_name} {value[:40]!r}: contains {why}")
        return value

    @field_validator("where")
    @classmethod
    def _where(cls, value: str) -> str:
        parse(value)  # raises InvalidFilterError; what parses compiles (lifecycle.catalogue.query_sql)
        return value

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str | None) -> str | None:
        return None if value is None else validate_owner(value)
