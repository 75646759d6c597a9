"""Rendering for the CLI: rich tables for people, JSON for scripts, and run reports."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from enum import Enum
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lifecycle.redact import redact
from lifecycle.reports import (
    PartitionedReport,
    PipelineReport,
    ReconcileReport,
    ReportModel,
    VerifyReport,
)
from lifecycle.units import format_size

# No markup by default: names, paths and messages hold '[' (a name 'a[/x]b' is valid) and must
# print as they are; the few styled lines ask for markup and escape what they interpolate.
out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Enum):
        return str(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def print_json(data: Any) -> None:
    """JSON on stdout, with the password of any URL in it redacted."""
    sys.stdout.write(redact(json.dumps(data, default=_default, indent=2, ensure_ascii=False)) + "\n")


def when(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def size(n: int | None) -> str:
    return format_size(n)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*("-" if v is None else redact(str(v)) for v in r))
    out.print(t)


# --------------------------------------------------------------------------- run reports


def run_report(report: PipelineReport | VerifyReport | ReconcileReport | PartitionedReport) -> None:
    """A run's report for people: its counts, then its batches (a dry run: its planned actions);
    a partitioned run's, partition by partition."""
    if isinstance(report, PartitionedReport):
        _partitioned_report(report)
    elif isinstance(report, PipelineReport):
        _pipeline_report(report)
    else:
        _integrity_report(report)


def _dry(report: PipelineReport | VerifyReport | ReconcileReport) -> str:
    return f"{report.pipeline}" + (" (dry run: nothing changed)" if report.dry_run else "")


def _rows_table(heading: str, rows: Sequence[ReportModel]) -> None:
    """Rows of one kind; a column per key any row has, `first error` last."""
    data = [r.as_json() for r in rows]
    if not data:
        return
    keys = [k for k in dict.fromkeys(k for d in data for k in d) if k != "first error"]
    if any("first error" in d for d in data):
        keys.append("first error")
    table(heading, keys, [tuple(d.get(k, "") for k in keys) for d in data])


def _pipeline_report(report: PipelineReport) -> None:
    p = report.plan
    out.print(
        f"[bold]{_dry(report)}[/]: planned {p.copies} copies ({size(p.copy_bytes)}), "
        f"{p.deletes} deletions, {p.expired_items} item expiries, {p.phase_changes} phase changes, "
        f"{p.refusals} refused, {p.shortfalls} shortfalls"
        + (f", {p.drained} storages drained (can be retired)" if p.drained else ""),
        markup=True,
    )
    if report.dry_run:
        table(
            "Plan",
            ["action", "item", "from", "to", "path", "bytes", "reason"],
            [(a.action, a.item[:8], a.from_, a.to, a.path, a.bytes, a.reason) for a in report.actions],
        )
        return
    # copy and delete rows carry different stage columns: one column per key, the error last
    _rows_table("Batches", report.batches)
    out.print(
        f"copied {report.copied} ({size(report.bytes_moved)}), deleted {report.deleted}, "
        f"failed {report.failed}; items below target now: {report.below_target_after}"
    )
    up = report.uploads
    if up is not None and (up.aborted or up.finished or up.left):
        out.print(
            f"unfinished uploads: {up.aborted} aborted ({up.removed} partial objects removed), "
            f"{up.finished} finished (their bytes were complete), {up.left} left for a later run"
            + (f": {'; '.join(up.errors.values())}" if up.errors else ""),
            markup=False,
        )
    if report.nothing_to_do:
        out.print("nothing to do: no flow run started", markup=False)


def _partitioned_report(report: PartitionedReport) -> None:
    """One line per partition (a sub-run: its name and final state), then its own report."""
    out.print(f"[bold]{report.pipeline} in {report.partitions} partitions[/]", markup=True)
    for run in report.runs:
        head = f"partition {run.partition + 1} of {report.partitions}"
        if run.flow_run:
            head += f": sub-run {run.name} ({run.flow_run}) {run.state}"
        out.print(head, markup=False)
        if run.report is not None:
            run_report(run.report)


_ROW_FIELDS = ("batches", "repairs", "unknown_objects", "temporary_objects")


def _integrity_report(report: VerifyReport | ReconcileReport) -> None:
    """Counters, batches, repairs and unknown objects of a verify or reconcile run."""
    data = report.as_json()
    skip = {*_ROW_FIELDS, "pipeline", "dry_run"}
    counters = {k: v for k, v in data.items() if k not in skip and isinstance(v, int | float | str | bool)}
    shown = escape(", ".join(f"{k} {v}" for k, v in counters.items()))
    out.print(f"[bold]{_dry(report)}[/]: {shown}", markup=True)
    tables: list[tuple[str, Sequence[ReportModel]]] = [("Repairs", report.repairs or [])]
    if isinstance(report, VerifyReport):
        tables.insert(0, ("Batches", report.batches))
    else:
        tables += [
            ("Unknown objects", report.unknown_objects),
            ("Temporary files (left by interrupted writes)", report.temporary_objects),
        ]
    for heading, rows in tables:
        _rows_table(heading, rows)
