"""Every state and enumerated kind of the catalogue; the values are the strings stored in the DB."""

from enum import StrEnum


class ItemState(StrEnum):
    INITIALISED = "INITIALISED"
    READY = "READY"
    EXPIRED = "EXPIRED"
    DELETED = "DELETED"
    CORRUPTED = "CORRUPTED"


class ReplicaState(StrEnum):
    PENDING = "PENDING"
    COPYING = "COPYING"
    READY = "READY"
    DELETING = "DELETING"
    DELETED = "DELETED"
    CORRUPTED = "CORRUPTED"
    LOST = "LOST"


class StorageState(StrEnum):
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"
    RETIRED = "retired"


class StorageKind(StrEnum):
    POSIX = "posix"
    S3 = "s3"
    RCLONE = "rclone"
    MEMORY = "memory"


class Tier(StrEnum):
    HOT = "hot"
    WARM = "warm"
    COLD = "cold"
    ARCHIVE = "archive"


class Phase(StrEnum):
    PLASMA = "PLASMA"
    GAS = "GAS"
    LIQUID = "LIQUID"
    SOLID = "SOLID"

    @property
    def rank(self) -> int:
        return _PHASE_RANK[self]


_PHASE_RANK = {Phase.PLASMA: 0, Phase.GAS: 1, Phase.LIQUID: 2, Phase.SOLID: 3}


class ItemType(StrEnum):
    FILE = "file"
    CONTAINER = "container"


class TransferState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"


class TransferKind(StrEnum):
    COPY = "copy"
    MOVE = "move"
    UPLOAD = "upload"
    CHECKOUT = "checkout"


LIVE_ITEM_STATES = (ItemState.INITIALISED, ItemState.READY, ItemState.CORRUPTED)
LIVE_REPLICA_STATES = (
    ReplicaState.PENDING,
    ReplicaState.COPYING,
    ReplicaState.READY,
    ReplicaState.DELETING,
)


def check_constraint(column: str, enum: type[StrEnum]) -> str:
    """SQL text of a CHECK constraint that admits only the enum's values."""
    values = ", ".join(f"'{member.value}'" for member in enum)
    return f"{column} IN ({values})"
