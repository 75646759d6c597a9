"""DLM's configuration: one Settings object read from DLM_* environment variables, loaded once."""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydantic_settings.exceptions import SettingsError

from lifecycle.errors import InvalidNameError, InvalidValueError
from lifecycle.names import validate_owner
from lifecycle.units import parse_duration


class PolicySettings(BaseModel):
    """How many copies each phase needs, and the aging rules (see lifecycle.planning.policy)."""

    copies_plasma: int = 0
    copies_gas: int = 1
    copies_liquid: int = 2
    copies_solid: int = 3
    # Aging rules, e.g. [{"where": "meta.kind = 'raw'", "older_than": "30d",
    #                     "phase": "SOLID", "drop_tiers": ["hot"]}]
    rules: list[dict[str, object]] = Field(default_factory=list)


class TransferSettings(BaseModel):
    transfers: int = 8  # rclone --transfers
    checkers: int = 8  # rclone --checkers
    # files per batch (one task, one rclone process): few enough batches that a batch's fixed
    # costs (its task run, storage slots, rclone start and listing) stay small beside its files
    batch_files: int = 5000
    batch_bytes: int = 8 * 1024**3
    # copy batches in flight at once in one run (each is one rclone process with `transfers`
    # transfers); the rclone processes of batches between the same two storages take turns,
    # so two keep rclone busy while the other batch claims, verifies and settles
    parallel_batches: int = Field(default=2, ge=1)
    max_items_per_run: int = 100_000
    max_bytes_per_run: int = 1024**4
    retries: int = Field(default=2, ge=0)  # batch task retries after a transient error (tasks/common.py)
    # An in-flight row (COPYING, DELETING) untouched this long is taken as left by a dead run
    # on another host; on this host a dead claimer's pid is noticed at once.
    stale_after_s: int = 3600
    # Bounded waits (lifecycle.transfer, lifecycle.storage.s3): a storage that stops answering
    # fails the batch instead of hanging the run. Connect and stall (no bytes moving)
    # timeouts of every rclone and S3 call, and retries of one request:
    contimeout_s: float = Field(default=10, gt=0)
    stall_timeout_s: float = Field(default=60, gt=0)
    low_level_retries: int = Field(default=3, ge=1)
    # Each rclone batch must finish within base + files * per_file + bytes / min_rate
    # seconds, or its process group is killed and its unfinished files fail.
    deadline_base_s: float = Field(default=300, gt=0)
    deadline_per_file_s: float = Field(default=1.0, ge=0)
    min_rate_bytes_s: int = Field(default=1024**2, gt=0)
    # Per-storage limits (tasks/slots.py): a batch holds one slot of the Prefect global
    # concurrency limit `storage:NAME` of each storage it touches. storage_slots is the limit
    # a missing one is created with (change it later in the UI or with `prefect gcl update`);
    # slot_lease_s how long a slot stays held by a holder that stopped renewing it (a killed
    # run; Prefect's minimum is 60 s); slot_wait_s how long a batch waits for its slots.
    storage_slots: int = Field(default=4, ge=1)
    slot_lease_s: float = Field(default=60, ge=60, le=86400)
    slot_wait_s: float = Field(default=3600, gt=0)


class RebalanceSettings(BaseModel):
    high_water: float = 0.85
    low_water: float = 0.70


class VerifySettings(BaseModel):
    budget_bytes: int = 100 * 1024**3  # bytes re-read per verify run


class UploadSettings(BaseModel):
    """Uploads through the API (lifecycle.catalogue.uploads): an item whose upload was not
    finished (`POST /items/{oid}/ready`) this long after it was registered is settled by the
    next expire run (lifecycle.integrity.abandoned). DLM_UPLOAD__TIMEOUT: `24h`, `3d`, or
    seconds; at least an hour, the longest an upload URL is valid."""

    timeout: timedelta = timedelta(hours=24)

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        if value.strip().isdigit():
            return int(value.strip())  # seconds
        try:
            return parse_duration(value.strip())
        except InvalidValueError as exc:
            raise ValueError(str(exc).replace("lifetime", "timeout")) from None

    @field_validator("timeout")
    @classmethod
    def _at_least_an_hour(cls, value: timedelta) -> timedelta:
        if value < timedelta(hours=1):
            raise ValueError("must be at least 1h (an upload URL is valid up to an hour)")
        return value


class ScheduleSettings(BaseModel):
    """The cron (UTC) of each pipeline's served deployment (lifecycle.runs.PipelineSpec.schedule)."""

    replicate: str = "*/5 * * * *"
    expire: str = "0 * * * *"
    rebalance: str = "30 * * * *"
    migrate: str = "0 3 * * *"
    verify: str = "0 4 * * *"
    reconcile: str = "0 5 * * *"  # every online or draining storage, one listing each


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DLM_", env_nested_delimiter="__", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".local" / "share" / "dlm")
    database_url: str | None = None
    checksum_algo: str = "md5"
    owner: str | None = None
    # How long a pipeline run on a SQLite catalogue waits for another run's writer lock.
    writer_lock_timeout_s: float = Field(default=300, ge=0)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    transfer: TransferSettings = Field(default_factory=TransferSettings)
    rebalance: RebalanceSettings = Field(default_factory=RebalanceSettings)
    schedules: ScheduleSettings = Field(default_factory=ScheduleSettings)
    verify: VerifySettings = Field(default_factory=VerifySettings)
    upload: UploadSettings = Field(default_factory=UploadSettings)

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return validate_owner(value)
        except InvalidNameError as exc:
            raise ValueError(str(exc)) from None

    @property
    def db_url(self) -> str:
        """The catalogue's URL: DLM_DATABASE_URL, or a SQLite file under DLM_HOME."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home / 'dlm.db'}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment.

    Raises InvalidValueError naming the DLM_* variable that is invalid (never its value, which
    may be a secret).
    """
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        var = "DLM_" + "__".join(str(p) for p in first.get("loc", ())).upper()
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        raise InvalidValueError(f"invalid setting {var}: {msg}") from None
    except SettingsError as exc:  # a nested section that is not valid JSON
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else "?"
        raise InvalidValueError(f"invalid setting DLM_{field.upper()}: not valid JSON") from None


def reset_settings() -> None:
    """Forget the cached settings (tests and `dlm` options that change the environment)."""
    get_settings.cache_clear()
