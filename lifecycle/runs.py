"""The pipelines DLM runs, in one registry: every list of pipelines elsewhere derives from it.

`Pipeline` names them; `PIPELINES` holds one frozen `PipelineSpec` per pipeline: what it does
in a line, whether it plans placement (plan, then apply in batches) or checks integrity, the
`ScheduleSettings` attribute holding its cron, and the run options it takes (each the
parameter of its flow of the same name). The CLI's `dlm run` choices, options and option
checks, the flow table (flows/registry.py), the served deployments (deployments/serve.py) and
prefect.yaml's test all read it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType

from lifecycle.errors import InvalidValueError


class Pipeline(StrEnum):
    REPLICATE = "replicate"
    MIGRATE = "migrate"
    EXPIRE = "expire"
    REBALANCE = "rebalance"
    VERIFY = "verify"
    RECONCILE = "reconcile"


class RunKind(StrEnum):
    PLACEMENT = "placement"  # plans from a snapshot (lifecycle.planning), applies in batches
    INTEGRITY = "integrity"  # reads copies or listings back (lifecycle.integrity)


class RunOption(StrEnum):
    """Options a run may take beyond `dry_run`; the value is the flow's parameter name."""

    STORAGE = "storage"
    BUDGET = "budget"
    ADOPT = "adopt"
    PARTITIONS = "partitions"  # split by item into K sub-runs (flows/partitions.py)


@dataclass(frozen=True)
class PipelineSpec:
    pipeline: Pipeline
    description: str
    kind: RunKind
    schedule: str  # the lifecycle.settings.ScheduleSettings attribute holding its cron
    options: frozenset[RunOption] = frozenset()

    @property
    def name(self) -> str:
        return self.pipeline.value

    @property
    def plans(self) -> bool:
        """Planned by lifecycle.planning.pipelines.make_plan (the placement pipelines)."""
        return self.kind is RunKind.PLACEMENT


_SPECS = (
    PipelineSpec(
        Pipeline.REPLICATE,
        "Add copies until each READY item meets its target phase.",
        RunKind.PLACEMENT,
        "replicate",
        frozenset({RunOption.PARTITIONS}),
    ),
    PipelineSpec(
        Pipeline.MIGRATE,
        "Bring placement to what phases and aging rules ask; drop surplus copies once safe.",
        RunKind.PLACEMENT,
        "migrate",
    ),
    PipelineSpec(
        Pipeline.EXPIRE,
        "Delete expired copies the policy can spare, and expired items (leaving tombstones).",
        RunKind.PLACEMENT,
        "expire",
    ),
    PipelineSpec(
        Pipeline.REBALANCE,
        "Move copies off storages above high water or draining, to storages below low water.",
        RunKind.PLACEMENT,
        "rebalance",
    ),
    PipelineSpec(
        Pipeline.VERIFY,
        "Re-read copies (oldest verified first, within a byte budget) and repair any that fail.",
        RunKind.INTEGRITY,
        "verify",
        frozenset({RunOption.STORAGE, RunOption.BUDGET, RunOption.PARTITIONS}),
    ),
    PipelineSpec(
        Pipeline.RECONCILE,
        "Compare storages with the catalogue: mark missing copies LOST, report unknown objects, repair.",
        RunKind.INTEGRITY,
        "reconcile",
        frozenset({RunOption.STORAGE, RunOption.ADOPT}),
    ),
)

PIPELINES: MappingProxyType[Pipeline, PipelineSpec] = MappingProxyType({s.pipeline: s for s in _SPECS})
PLACEMENT: tuple[Pipeline, ...] = tuple(p for p, s in PIPELINES.items() if s.plans)


def parse_pipeline(value: str | Pipeline, among: Iterable[Pipeline] = Pipeline) -> Pipeline:
    """The pipeline `value` names, if it is one of `among`.

    Raises InvalidValueError: "unknown pipeline 'x': use one of replicate, migrate, ...".
    """
    allowed = tuple(among)
    for p in allowed:
        if value == p.value:
            return p
    raise InvalidValueError(f"unknown pipeline {str(value)!r}: use one of {', '.join(allowed)}")


def accepting(option: RunOption) -> tuple[Pipeline, ...]:
    """The pipelines that take `option`."""
    return tuple(p for p, s in PIPELINES.items() if option in s.options)
