"""What a run reports: one typed model per kind of run, the JSON `dlm run --json` prints.

A placement pipeline (replicate, migrate, expire, rebalance) returns a `PipelineReport`,
verify a `VerifyReport`, reconcile a `ReconcileReport`; `RunReport` is any of them, told
apart by `pipeline`. The flows build them, the CLI renders them, the artifacts summarise
them, and `as_json()` is the JSON a script or an API reads (`parse_report` reads it back).

The JSON keys are those the reports always had, some with spaces (`first error`, `adopted
as`, `<stage> s`): the fields carry them as aliases. A field that does not apply to a run
(a dry run has nothing copied) is None and left out of the JSON (`as_json`, or
`exclude_none` where an API renders the model).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_serializer, model_validator
from pydantic_core.core_schema import SerializerFunctionWrapHandler

from lifecycle.errors import DLMError
from lifecycle.runs import Pipeline


class ReportModel(BaseModel):
    model_config = ConfigDict(
        validate_by_name=True, validate_by_alias=True, serialize_by_alias=True, extra="forbid"
    )

    def as_json(self) -> dict[str, Any]:
        """The JSON form: the documented keys, what does not apply (None) left out."""
        data: dict[str, Any] = self.model_dump(mode="json", exclude_none=True)
        return data


# --------------------------------------------------------------------------- rows


class PlannedAction(StrEnum):
    COPY = "copy"
    DELETE = "delete"
    EXPIRE = "expire"
    SET_PHASE = "set-phase"
    REFUSED = "refused"
    SHORTFALL = "shortfall"
    DRAINED = "drained"


class ActionRow(ReportModel):
    """One planned action (what a dry run shows): copy, delete, expire, set-phase, refused,
    shortfall or drained. `item` is empty for a drained storage."""

    action: PlannedAction
    item: str = ""
    from_: str = Field(default="", alias="from")
    to: str = ""
    path: str = ""
    bytes: int = 0
    reason: str = ""


class BatchRow(ReportModel):
    """What one copy, delete or repair batch did (one rclone process)."""

    kind: str
    from_: str = Field(default="-", alias="from")
    to: str = "-"
    planned: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    bytes: int = 0
    bytes_read_to_confirm: int | None = Field(default=None, alias="bytes read to confirm")  # deletes
    seconds: float = 0.0
    stages: dict[str, float] = Field(default_factory=dict)  # JSON: one `<stage> s` key each
    first_error: str = Field(default="", alias="first error")

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        stages = data.pop("stages", {})
        error_key = "first error" if "first error" in data else "first_error"
        error = data.pop(error_key, "")
        out = {k: v for k, v in data.items() if v is not None}
        out.update({f"{stage} s": seconds for stage, seconds in stages.items()})
        out[error_key] = error
        return out

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        if isinstance(data, dict) and "stages" not in data:
            stages = {k[:-2]: v for k, v in data.items() if isinstance(k, str) and k.endswith(" s")}
            if stages:
                data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.endswith(" s"))}
                data["stages"] = stages
        return data


class VerifyBatchRow(ReportModel):
    """A verify batch: planned (a dry run: storage, algo, planned, bytes) or done."""

    storage: str
    algo: str  # "md5", or "md5 (stored)" where the storage's own hashes were used
    planned: int
    intact: int | None = None
    corrupted: int | None = None
    lost: int | None = None
    recovered: int | None = None
    unreadable: int | None = None
    bytes: int = 0
    seconds: float | None = None
    first_error: str | None = Field(default=None, alias="first error")


class UnknownObjectRow(ReportModel):
    """An object on a storage that no catalogue copy tracks (and the item it was adopted as)."""

    storage: str = ""  # which one: a reconcile of every storage lists them together
    path: str
    size: int
    md5: str = ""
    adopted_as: str = Field(default="", alias="adopted as")
    note: str = ""


class TemporaryObjectRow(ReportModel):
    """A temporary file (DLM's or rclone's) an interrupted write left on a storage."""

    storage: str = ""  # which one: a reconcile of every storage lists them together
    path: str
    size: int
    modified: str = ""


# --------------------------------------------------------------------------- parts


class PlanSummary(ReportModel):
    """How many actions of each kind a plan holds."""

    copies: int = 0
    copy_bytes: int = 0
    deletes: int = 0
    expired_items: int = 0
    phase_changes: int = 0
    refusals: int = 0
    shortfalls: int = 0
    drained: int = 0
    # actions beyond the run's bounds (copies; deletions, expiries and phase changes of items
    # past max_items_per_run), left for the next run
    deferred: int = 0


class Recovered(ReportModel):
    """What settling the rows a dead run left in flight did (before planning)."""

    completed: int = 0
    rolled_back: int = 0
    deleted: int = 0
    restored: int = 0
    skipped_live: int = 0
    temp_removed: int = 0
    temp_removed_bytes: int = 0
    temp_kept_live: int = 0
    errors: dict[str, str] = Field(default_factory=dict)


class AbandonedUploads(ReportModel):
    """Uploads nobody finished within DLM_UPLOAD__TIMEOUT, settled by an expire run
    (lifecycle.integrity.abandoned)."""

    aborted: int = 0  # nothing, or other bytes, uploaded: the item is a DELETED tombstone
    finished: int = 0  # the declared bytes were there: READY
    removed: int = 0  # objects that were not the declared bytes, deleted
    left: int = 0  # left for a later run (a storage offline or unreadable)
    errors: dict[str, str] = Field(default_factory=dict)


class Settled(ReportModel):
    """The catalogue-only actions a run applied: before its deletions, then after them."""

    expired: int = 0
    phase_changes: int = 0
    deleted_items: int = 0
    refusals: int = 0
    drained: list[str] = Field(default_factory=list)  # storages found empty: can be retired


class Repairs(ReportModel):
    """Damaged copies copied over from intact ones (verify and reconcile)."""

    repairs: list[BatchRow] = Field(default_factory=list)
    repaired: int = 0
    repair_failed: int = 0
    unrepairable: dict[str, str] = Field(default_factory=dict)  # replica uid -> why not now


# --------------------------------------------------------------------------- reports


class PipelineReport(ReportModel):
    """A placement run: the plan, then (unless a dry run) its batches and totals."""

    pipeline: Literal[Pipeline.REPLICATE, Pipeline.MIGRATE, Pipeline.EXPIRE, Pipeline.REBALANCE]
    dry_run: bool
    plan: PlanSummary
    counters: dict[str, int] = Field(default_factory=dict)
    batches: list[BatchRow] = Field(default_factory=list)
    actions: list[ActionRow] = Field(default_factory=list)  # the first 200 of each kind
    recovered: Recovered | None = None  # what crash recovery settled first; None in a dry run
    uploads: AbandonedUploads | None = None  # expire: unfinished uploads settled; None otherwise
    stages: dict[str, float] = Field(default_factory=dict)  # seconds per stage of the run
    # None in a dry run:
    settled: Settled | None = None
    copied: int | None = None
    deleted: int | None = None
    failed: int | None = None
    bytes_moved: int | None = None
    bytes_read_to_confirm: int | None = None
    below_target_after: int | None = None
    # True when the run found nothing to recover, apply or settle and so started no flow run
    # (`dlm run` checks first, without Prefect); None otherwise
    nothing_to_do: bool | None = None

    @property
    def has_failures(self) -> bool:
        """Some copy or deletion failed (the next run retries it)."""
        return bool(self.failed)


class VerifyReport(ReportModel):
    """A verify run: what it selected within its budget, then what it read and repaired."""

    pipeline: Literal[Pipeline.VERIFY] = Pipeline.VERIFY
    dry_run: bool
    budget_bytes: int
    selected: int
    selected_bytes: int
    budget_reached: bool
    recovered: int = 0  # CORRUPTED or LOST copies found intact again
    unsupported: int = 0
    batches: list[VerifyBatchRow] = Field(default_factory=list)
    # None in a dry run:
    intact: int | None = None
    corrupted: int | None = None
    lost: int | None = None
    unreadable: int | None = None
    bytes_read: int | None = None
    bytes_trusted: int | None = None
    items_corrupted: int | None = None
    items_repaired: int | None = None
    damaged: int | None = None
    # None in a dry run or without repair:
    repairs: list[BatchRow] | None = None
    repaired: int | None = None
    repair_failed: int | None = None
    unrepairable: dict[str, str] | None = None
    below_target_after: int | None = None
    failures: list[str] | None = None

    @property
    def has_failures(self) -> bool:
        """A repair failed or a copy could not be read."""
        return bool(self.repair_failed or self.unreadable)


class ReconcileReport(ReportModel):
    """A reconcile run: one storage's listing (or several, summed) against the catalogue."""

    pipeline: Literal[Pipeline.RECONCILE] = Pipeline.RECONCILE
    storage: str  # its name; the names, comma-separated, when the run took every storage
    dry_run: bool = False
    adopt: bool = False
    listed: int = 0
    listed_bytes: int = 0
    matched: int = 0  # tracked copies found with the right size
    in_flight: int = 0  # objects of rows being copied or deleted
    reappeared: int = 0  # objects back at LOST copies' paths (verify checks them)
    ignored: int = 0  # temporary files: not judged
    temporary_bytes: int = 0
    unknown: int = 0
    unknown_bytes: int = 0
    links: int = 0  # symbolic links found (never followed nor adopted)
    link_paths: list[str] = Field(default_factory=list)
    adopted: int = 0
    lost: int = 0
    corrupted: int = 0
    items_corrupted: int = 0
    missing: int = 0  # tracked copies absent (dry run: would be LOST)
    resized: int = 0  # tracked copies of another size (dry run: would be CORRUPTED)
    duration_s: float = 0.0
    recovered: Recovered | None = None  # what crash recovery settled first; None in a dry run
    unknown_objects: list[UnknownObjectRow] = Field(default_factory=list)
    temporary_objects: list[TemporaryObjectRow] = Field(default_factory=list)
    # None in a dry run or without repair:
    repairs: list[BatchRow] | None = None
    repaired: int | None = None
    repair_failed: int | None = None
    unrepairable: dict[str, str] | None = None
    below_target_after: int | None = None
    failures: list[str] = Field(default_factory=list)

    @property
    def has_failures(self) -> bool:
        """A repair failed."""
        return bool(self.repair_failed)


class PartitionRun(ReportModel):
    """One partition of a fanned-out run: the sub-run that did it (a deployment run), or, run
    in this process in turn, its own report."""

    partition: int
    flow_run: str | None = None
    name: str | None = None
    state: str | None = None
    report: Annotated[PipelineReport | VerifyReport, Field(discriminator="pipeline")] | None = None


class PartitionedReport(ReportModel):
    """A run split into `partitions` sub-runs by item (oid mod partitions), one per partition."""

    pipeline: Pipeline
    partitions: int
    runs: list[PartitionRun] = Field(default_factory=list)

    @property
    def has_failures(self) -> bool:
        """A partition run in this process had failures (deployment sub-runs that did not
        complete raise instead)."""
        return any(r.report is not None and r.report.has_failures for r in self.runs)


class RunFailedError(DLMError):
    """A verify or reconcile run in which some batch or storage failed: the message names them,
    `report` is what the run did elsewhere (a reconcile of every storage adopted on the ones it
    could list; the other partitions of a partitioned verify), for the edge to show before the
    error."""

    def __init__(self, message: str, report: VerifyReport | ReconcileReport | PartitionedReport) -> None:
        super().__init__(message)
        self.report = report


RunReport = Annotated[PipelineReport | VerifyReport | ReconcileReport, Field(discriminator="pipeline")]
_REPORT: TypeAdapter[PipelineReport | VerifyReport | ReconcileReport] = TypeAdapter(RunReport)
_OBJECT: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


def parse_report(
    data: str | bytes | dict[str, Any],
) -> PipelineReport | VerifyReport | ReconcileReport | PartitionedReport:
    """A report from its JSON (as `as_json()` gave it, or as text): a partitioned run's (it has
    `partitions`) or one run's. Raises pydantic's ValidationError."""
    if not isinstance(data, dict):
        data = _OBJECT.validate_json(data)
    if "partitions" in data:
        return PartitionedReport.model_validate(data)
    return _REPORT.validate_python(data)
