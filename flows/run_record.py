"""Every pipeline run that is not a dry run leaves one row in the catalogue's run log
(lifecycle.catalogue.run_log) when it ends: its duration, what it did, and its outcome (failed
when it raised or some of its copies or deletions failed, as `dlm run` exits 1; else completed),
for GET /metrics and the operator dashboard. A run killed outright writes nothing (its flow run
in Prefect says what happened). Writing the row never changes the run's own outcome: a
catalogue that cannot take it is logged and the run's result stands.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger
from prefect.runtime import flow_run
from sqlalchemy.exc import SQLAlchemyError

from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import utcnow
from lifecycle.catalogue.run_log import COMPLETED, FAILED, PipelineRun, record_run
from lifecycle.errors import DLMError
from lifecycle.redact import redact
from lifecycle.reports import RunFailedError
from lifecycle.runs import Pipeline


@dataclass
class RunRecord:
    """What the run did, filled in by the flow before it returns."""

    counters: dict[str, int] = field(default_factory=dict)

    def done(self, report: Any) -> Any:
        """Take the counts of a report (copied, deleted, failed, bytes_moved where it has them);
        returns the report."""
        for name in ("copied", "deleted", "failed", "bytes_moved"):
            value = getattr(report, name, None)
            if isinstance(value, int):
                self.counters[name] = value
        return report


@contextmanager
def recorded_run(
    pipeline: Pipeline, *, dry_run: bool, actor: str, part: tuple[int, int] | None = None
) -> Iterator[RunRecord]:
    """Record the run in the catalogue's run log when the block ends (not for a dry run)."""
    record = RunRecord()
    if dry_run:
        yield record
        return
    started, clock = utcnow(), time.monotonic()
    outcome, error = FAILED, None
    try:
        yield record
        # as `dlm run` answers (exit 1): a run in which some copy or deletion failed failed
        outcome = FAILED if record.counters.get("failed") else COMPLETED
    except BaseException as exc:
        if isinstance(exc, RunFailedError):
            record.done(exc.report)
        error = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
        raise
    finally:
        row = PipelineRun(
            pipeline=pipeline.value,
            partition=f"{part[1] + 1}/{part[0]}" if part else None,
            outcome=outcome,
            started_at=started,
            duration_s=round(time.monotonic() - clock, 3),
            flow_run_id=flow_run.get_id(),
            actor=actor,
            error=error[:1000] if error else None,
        )
        for name, value in record.counters.items():
            setattr(row, name, value)
        try:
            with session_scope() as s:
                record_run(s, row)
        except (DLMError, OSError, SQLAlchemyError) as exc:
            get_run_logger().warning("the run was not added to the run log: %s", exc)
