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


class EventKind(StrEnum):
    """What an audit Event records; docs/architecture.md ("Events") says when each is written
    and what its details hold. The database refuses any other kind (ck_event_kind): a new kind
    needs a migration that widens the constraint."""

    DATASET_CREATED = "dataset.created"
    DATASET_DELETED = "dataset.deleted"
    ITEM_REGISTERED = "item.registered"
    ITEM_READY = "item.ready"
    ITEM_PHASE_CHANGED = "item.phase_changed"
    ITEM_EXPIRY_CHANGED = "item.expiry_changed"
    ITEM_METADATA_CHANGED = "item.metadata_changed"
    ITEM_EXPIRED = "item.expired"
    ITEM_DELETED = "item.deleted"
    ITEM_CORRUPTED = "item.corrupted"
    ITEM_REPAIRED = "item.repaired"
    ITEM_CHECKED_OUT = "item.checked_out"
    ITEM_UPLOAD_ABORTED = "item.upload_aborted"
    REPLICA_CREATED = "replica.created"
    REPLICA_DELETED = "replica.deleted"
    REPLICA_DELETE_FAILED = "replica.delete_failed"
    REPLICA_CORRUPTED = "replica.corrupted"
    REPLICA_LOST = "replica.lost"
    REPLICA_REPAIRED = "replica.repaired"
    REPLICA_REPAIR_FAILED = "replica.repair_failed"
    REPLICA_RESTORED = "replica.restored"
    REPLICA_EXPIRY_CHANGED = "replica.expiry_changed"
    TRANSFER_FAILED = "transfer.failed"
    STORAGE_ADDED = "storage.added"
    STORAGE_ONLINE = "storage.online"
    STORAGE_DRAINING = "storage.draining"
    STORAGE_OFFLINE = "storage.offline"
    STORAGE_RETIRED = "storage.retired"
    STORAGE_DRAINED = "storage.drained"
    STORAGE_TEMP_REMOVED = "storage.temp_removed"
    STORAGE_CHANGED = "storage.changed"
    POLICY_REFUSED = "policy.refused"
    RECONCILE_LINK_SKIPPED = "reconcile.link_skipped"
    # Legacy: never emitted. Migration 0003 gives this kind to any event of a kind no DLM
    # version wrote (every kind DLM ever emitted is still a member above), keeping the old kind
    # in details["legacy_kind"], so upgrading never fails and never drops an audit record.
    LEGACY_UNKNOWN = "legacy.unknown"


# `dlm storage drain / offline / online / retire` write the event of the state they set
STORAGE_STATE_EVENTS: dict[StorageState, EventKind] = {
    StorageState.ONLINE: EventKind.STORAGE_ONLINE,
    StorageState.DRAINING: EventKind.STORAGE_DRAINING,
    StorageState.OFFLINE: EventKind.STORAGE_OFFLINE,
    StorageState.RETIRED: EventKind.STORAGE_RETIRED,
}

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
