"""The lifecycle policy: copies and placement per phase, aging rules, and whether copies meet a phase."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple
from uuid import UUID

from lifecycle.errors import InvalidValueError
from lifecycle.settings import PolicySettings, RebalanceSettings
from lifecycle.states import ItemState, Phase, ReplicaState, StorageKind, StorageState, Tier
from lifecycle.units import parse_duration

__all__ = [
    "COLD_TIERS",
    "INTACT_STORAGE_STATES",
    "PHASES",
    "AgingRule",
    "ItemView",
    "Policy",
    "ReplicaView",
    "StorageIndex",
    "StorageView",
    "current_phase",
    "phase_satisfied",
]

PHASES: tuple[Phase, ...] = (Phase.PLASMA, Phase.GAS, Phase.LIQUID, Phase.SOLID)
"""Phases from least to most resilient (index = Phase.rank)."""

COLD_TIERS = frozenset({Tier.COLD, Tier.ARCHIVE})
"""Tiers that satisfy SOLID's 'at least one cold copy' rule."""

INTACT_STORAGE_STATES = frozenset({StorageState.ONLINE, StorageState.DRAINING})
"""A READY replica is intact only on a storage in one of these states (draining still holds data)."""


# --------------------------------------------------------------------------- views


class StorageView(NamedTuple):
    """What planning needs to know about a storage."""

    id: UUID
    name: str
    kind: StorageKind
    tier: Tier
    location: str | None
    capacity_bytes: int | None
    used_bytes: int
    state: StorageState


class ItemView(NamedTuple):
    """What planning needs to know about an item."""

    oid: UUID
    name: str
    version: int
    size: int
    target_phase: Phase
    state: ItemState
    expires_at: datetime | None
    created_at: datetime
    checksum: str | None = None


class ReplicaView(NamedTuple):
    """What planning needs to know about one physical copy."""

    uid: UUID
    item_oid: UUID
    storage_id: UUID
    path: str
    state: ReplicaState
    expires_at: datetime | None = None
    created_at: datetime | None = None


# --------------------------------------------------------------------------- rules


_RULE_KEYS = ("where", "older_than", "phase", "drop_tiers")


def _parse_phase(value: object, what: str) -> Phase:
    if isinstance(value, Phase):
        return value
    if isinstance(value, str):
        try:
            return Phase(value.strip().upper())
        except ValueError:
            pass
    raise InvalidValueError(f"{what}: invalid phase {value!r}: use PLASMA, GAS, LIQUID or SOLID")


def _parse_tier(value: object, what: str) -> Tier:
    if isinstance(value, Tier):
        return value
    if isinstance(value, str):
        try:
            return Tier(value.strip().lower())
        except ValueError:
            pass
    raise InvalidValueError(f"{what}: invalid tier {value!r}: use hot, warm, cold or archive")


@dataclass(frozen=True, slots=True)
class AgingRule:
    """Items matching `where` and older than `older_than` go to `phase` and lose copies on `drop_tiers`.

    `where` is a catalogue filter; planners never evaluate it: the caller tells them
    which rules (by index in Policy.rules) each item matched.
    """

    where: str
    older_than: timedelta
    phase: Phase | None = None
    drop_tiers: frozenset[Tier] = frozenset()

    @classmethod
    def from_dict(cls, raw: Mapping[str, object], index: int = 0) -> AgingRule:
        """Parse one rule from settings, e.g. {"where": "...", "older_than": "30d", "phase": "SOLID"}.

        Raises InvalidValueError naming the rule (by its index) and the bad key or value.
        """
        what = f"aging rule [{index}]"
        if not isinstance(raw, Mapping):
            raise InvalidValueError(f"{what}: expected a mapping with keys {', '.join(_RULE_KEYS)}")
        unknown = sorted(str(k) for k in raw if k not in _RULE_KEYS)
        if unknown:
            raise InvalidValueError(f"{what}: unknown key {unknown[0]!r} (expected {', '.join(_RULE_KEYS)})")
        where = raw.get("where")
        if not isinstance(where, str) or not where.strip():
            raise InvalidValueError(f"{what}: 'where' must be a non-empty filter expression")
        older = raw.get("older_than")
        if isinstance(older, timedelta):
            if older < timedelta(0):
                raise InvalidValueError(f"{what}: 'older_than' must not be negative")
            older_than = older
        elif isinstance(older, str):
            try:
                older_than = parse_duration(older)
            except InvalidValueError as exc:
                raise InvalidValueError(f"{what}: 'older_than': {exc}") from None
        elif older is None:
            raise InvalidValueError(f"{what}: 'older_than' is required, e.g. '30d'")
        else:
            raise InvalidValueError(f"{what}: 'older_than' must be a duration like '30d', not {older!r}")
        raw_phase = raw.get("phase")
        phase = None if raw_phase is None else _parse_phase(raw_phase, what)
        raw_tiers = raw.get("drop_tiers", ())
        if raw_tiers is None:
            raw_tiers = ()
        if isinstance(raw_tiers, str):
            raw_tiers = (raw_tiers,)
        if not isinstance(raw_tiers, Iterable):
            raise InvalidValueError(f"{what}: 'drop_tiers' must be a list of tiers, not {raw_tiers!r}")
        drop_tiers = frozenset(_parse_tier(t, what) for t in raw_tiers)
        if phase is None and not drop_tiers:
            raise InvalidValueError(f"{what} does nothing: give a 'phase', 'drop_tiers' or both")
        return cls(where=where.strip(), older_than=older_than, phase=phase, drop_tiers=drop_tiers)

    def matured(self, created_at: datetime, now: datetime) -> bool:
        """Whether an item created at `created_at` is old enough for this rule at `now`."""
        return created_at + self.older_than <= now


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True, slots=True)
class Policy:
    """Copies per phase (indexed by Phase.rank), aging rules and the rebalance water marks."""

    copies: tuple[int, int, int, int] = (0, 1, 2, 3)
    rules: tuple[AgingRule, ...] = ()
    high_water: float = 0.85
    low_water: float = 0.70

    def __post_init__(self) -> None:
        if len(self.copies) != 4 or any(not isinstance(c, int) or c < 0 for c in self.copies):
            raise InvalidValueError(
                f"invalid copies per phase {self.copies!r}: need four whole numbers >= 0 "
                "(PLASMA, GAS, LIQUID, SOLID)"
            )
        if any(a > b for a, b in zip(self.copies, self.copies[1:], strict=False)):
            raise InvalidValueError(
                f"invalid copies per phase {self.copies!r}: a higher phase cannot need fewer copies"
            )
        if not 0.0 < self.low_water <= self.high_water <= 1.0:
            raise InvalidValueError(
                f"invalid water marks low={self.low_water} high={self.high_water}: "
                "need 0 < low_water <= high_water <= 1"
            )

    @classmethod
    def from_settings(
        cls, policy: PolicySettings | None = None, rebalance: RebalanceSettings | None = None
    ) -> Policy:
        """The policy described by settings; raises InvalidValueError on a bad rule or count."""
        policy = policy or PolicySettings()
        rebalance = rebalance or RebalanceSettings()
        rules = tuple(AgingRule.from_dict(raw, i) for i, raw in enumerate(policy.rules))
        return cls(
            copies=(policy.copies_plasma, policy.copies_gas, policy.copies_liquid, policy.copies_solid),
            rules=rules,
            high_water=rebalance.high_water,
            low_water=rebalance.low_water,
        )

    def copies_for(self, phase: Phase) -> int:
        """How many intact copies `phase` needs."""
        return self.copies[phase.rank]


# --------------------------------------------------------------------------- placement


class StorageIndex:
    """The storages of one planning run, with the facts every placement check needs precomputed.

    Planners work on storage *positions* (indexes into `storages`): sets of small ints
    hash far faster than sets of UUIDs. SOLID's conditional rules look only at ONLINE
    storages: 'two locations exist' and 'a cold or archive tier exists' mean among the
    storages that can receive a copy now.
    """

    __slots__ = (
        "cold",
        "has_cold",
        "intact",
        "location",
        "multi_location",
        "online",
        "online_positions",
        "pos",
        "storages",
    )

    def __init__(self, storages: Iterable[StorageView]) -> None:
        self.storages: tuple[StorageView, ...] = tuple(storages)
        self.pos: dict[UUID, int] = {s.id: i for i, s in enumerate(self.storages)}
        if len(self.pos) != len(self.storages):
            raise InvalidValueError("duplicate storage id in the storages given to a planner")
        self.intact: tuple[bool, ...] = tuple(s.state in INTACT_STORAGE_STATES for s in self.storages)
        self.online: tuple[bool, ...] = tuple(s.state == StorageState.ONLINE for s in self.storages)
        self.online_positions: tuple[int, ...] = tuple(i for i, ok in enumerate(self.online) if ok)
        self.cold: tuple[bool, ...] = tuple(s.tier in COLD_TIERS for s in self.storages)
        self.location: tuple[str | None, ...] = tuple(s.location for s in self.storages)
        online_locations = {self.location[i] for i in self.online_positions} - {None}
        self.multi_location: bool = len(online_locations) >= 2
        self.has_cold: bool = any(self.cold[i] for i in self.online_positions)

    def meets(self, policy: Policy, phase: Phase, positions: Collection[int]) -> bool:
        """Whether copies on these distinct storage positions satisfy `phase`."""
        need = policy.copies[phase.rank]
        if need == 0:
            return True
        if len(positions) < need:
            return False
        if phase == Phase.SOLID:
            if self.has_cold and not self.any_cold(positions):
                return False
            if self.multi_location and len(self.locations(positions)) < 2:
                return False
        return True

    def any_cold(self, positions: Iterable[int]) -> bool:
        """Whether one of these storages is on a cold or archive tier."""
        cold = self.cold
        return any(cold[p] for p in positions)

    def locations(self, positions: Iterable[int]) -> set[str]:
        """The known locations of these storages."""
        location = self.location
        return {loc for p in positions if (loc := location[p]) is not None}

    def intact_positions(self, replicas: Iterable[ReplicaView]) -> set[int]:
        """Positions of the distinct storages holding an intact copy (READY, on online or draining)."""
        pos_get, intact = self.pos.get, self.intact
        found: set[int] = set()
        for r in replicas:
            if r.state == ReplicaState.READY:
                p = pos_get(r.storage_id)
                if p is not None and intact[p]:
                    found.add(p)
        return found


def _index(storages: StorageIndex | Sequence[StorageView]) -> StorageIndex:
    return storages if isinstance(storages, StorageIndex) else StorageIndex(storages)


def phase_satisfied(
    item: ItemView,
    intact_replicas: Iterable[ReplicaView],
    storages: StorageIndex | Sequence[StorageView],
    policy: Policy,
    *,
    phase: Phase | None = None,
) -> bool:
    """Whether the item's intact copies satisfy `phase` (default: its target phase).

    Replicas that are not intact (not READY, or on an offline/retired/unknown storage)
    are ignored, so passing all of an item's replicas is fine.
    """
    index = _index(storages)
    return index.meets(policy, phase or item.target_phase, index.intact_positions(intact_replicas))


def current_phase(
    intact_replicas: Iterable[ReplicaView],
    storages: StorageIndex | Sequence[StorageView],
    policy: Policy,
) -> Phase:
    """The highest phase the intact copies satisfy (PLASMA is the floor, even if it needs copies)."""
    index = _index(storages)
    ids = index.intact_positions(intact_replicas)
    for phase in reversed(PHASES):
        if index.meets(policy, phase, ids):
            return phase
    return Phase.PLASMA
