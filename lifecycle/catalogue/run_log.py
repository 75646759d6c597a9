"""The log of pipeline runs: one row per finished run of a pipeline that was not a dry run
(which pipeline, which partition, how it ended, when, how long it took, what it did).

The flows write it when a run ends, whatever its outcome (flows/run_record.py); `GET /metrics`
and the operator dashboard read it (run counts and durations per pipeline and outcome). A run
that was killed writes nothing: the Prefect server keeps the record of that one. A run with
nothing to do that `dlm run` answered without starting a flow writes nothing either.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import CheckConstraint, Index, String, func, select
from sqlmodel import Field, Session, SQLModel, col

from lifecycle.catalogue.models import BigIntType, UTCDateTime, utcnow

COMPLETED = "completed"
FAILED = "failed"
OUTCOMES = (COMPLETED, FAILED)
_RECENT = 20


class PipelineRun(SQLModel, table=True):
    """One finished run (or one partition's sub-run) of a pipeline."""

    __tablename__ = "pipeline_run"
    __table_args__ = (
        CheckConstraint("outcome IN ('completed', 'failed')", name="ck_pipeline_run_outcome"),
        Index("ix_pipeline_run_finished", "finished_at"),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=BigIntType)
    pipeline: str = Field(sa_type=String(32))
    partition: str | None = Field(default=None, sa_type=String(32))  # "2/4" for a sub-run
    outcome: str = Field(sa_type=String(16))
    started_at: datetime = Field(sa_type=UTCDateTime)
    finished_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    duration_s: float = 0.0
    copied: int = 0
    deleted: int = 0
    failed: int = 0
    bytes_moved: int = Field(default=0, sa_type=BigIntType)
    flow_run_id: str | None = Field(default=None, sa_type=String(64))
    actor: str = "dlm"
    error: str | None = None


@dataclass(frozen=True)
class RunTotals:
    """Runs of one pipeline that ended one way: how many, their summed and their last duration."""

    pipeline: str
    outcome: str
    runs: int
    seconds: float
    last_seconds: float
    last_finished: datetime


def record_run(session: Session, run: PipelineRun) -> None:
    """Add a finished run to the log (in the caller's transaction)."""
    if run.outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}")
    session.add(run)


def run_totals(session: Session) -> list[RunTotals]:
    """Per pipeline and outcome: runs, summed seconds, and the newest run's seconds (two
    statements, whatever the log's length)."""
    grouped = session.execute(
        select(
            col(PipelineRun.pipeline),
            col(PipelineRun.outcome),
            func.count(),
            func.coalesce(func.sum(col(PipelineRun.duration_s)), 0.0),
            func.max(col(PipelineRun.id)),
        ).group_by(col(PipelineRun.pipeline), col(PipelineRun.outcome))
    ).all()
    newest = {r[4] for r in grouped}
    last = {
        r.id: r for r in session.execute(select(PipelineRun).where(col(PipelineRun.id).in_(newest))).scalars()
    }
    return [
        RunTotals(
            pipeline=p,
            outcome=o,
            runs=int(n),
            seconds=float(total),
            last_seconds=last[i].duration_s,
            last_finished=last[i].finished_at,
        )
        for p, o, n, total, i in sorted(grouped, key=lambda r: (r[0], r[1]))
    ]


def recent_runs(session: Session, limit: int = _RECENT) -> list[PipelineRun]:
    """The newest finished runs, newest first."""
    stmt = select(PipelineRun).order_by(col(PipelineRun.id).desc()).limit(limit)
    return list(session.execute(stmt).scalars())
