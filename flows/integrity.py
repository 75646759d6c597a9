"""The integrity flows: verify (re-read copies, repair damaged ones) and reconcile (storage vs catalogue).

Both write Events through the lifecycle core, emit them as Prefect events, publish a table
artifact and a markdown summary, and return their report (lifecycle.reports). A batch that
still fails after its retries is reported, the others finish, and the run then fails naming it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from sqlalchemy import select
from sqlmodel import col

from flows.events import enable_publishing
from flows.partitions import fan_out
from flows.pipelines import quiet_dlm_errors, run_actor
from flows.plan_report import storage_names
from flows.run_record import recorded_run
from lifecycle.apply.result import BatchResult
from lifecycle.catalogue.catalog import status
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Storage
from lifecycle.errors import InvalidValueError
from lifecycle.integrity.reconcile import ReconcileResult
from lifecycle.integrity.verify import VerifyResult, default_budget_bytes
from lifecycle.planning.partition import check_partition
from lifecycle.reports import (
    PartitionedReport,
    ReconcileReport,
    Repairs,
    RunFailedError,
    TemporaryObjectRow,
    UnknownObjectRow,
    VerifyBatchRow,
    VerifyReport,
)
from lifecycle.runs import PIPELINES, Pipeline
from lifecycle.settings import get_settings
from lifecycle.states import StorageState
from lifecycle.units import format_size, parse_size
from tasks.batches import settle_in_flight
from tasks.integrity import (
    plan_repairs,
    reconcile_storage,
    repair_replicas,
    select_replicas,
    verify_replicas,
)
from tasks.orphans import tracked_run


def _enable_publishing() -> None:
    enable_publishing()
    quiet_dlm_errors()


def _budget(budget: int | str | None) -> int:
    """Bytes from an int or a size such as '10GiB'; None: the configured default.
    Raises InvalidValueError."""
    if budget is None:
        return default_budget_bytes()
    value = budget if isinstance(budget, int) else parse_size(budget)
    if value <= 0:
        raise InvalidValueError(f"invalid budget {budget!r}: must be positive")
    return value


def _results(futures: Sequence[Any], what: Sequence[str], failures: list[str]) -> list[Any]:
    """Each future's result; a failed one becomes a line in `failures` instead."""
    out = []
    for future, label in zip(futures, what, strict=True):
        value = future.result(raise_on_failure=False)
        if isinstance(value, BaseException):
            failures.append(f"{label}: {value}")
        else:
            out.append(value)
    return out


def _repair(uids: Sequence[uuid.UUID], actor: str, names: dict[Any, str], failures: list[str]) -> Repairs:
    """Repair damaged copies from intact ones, one rclone process per (source, destination) batch."""
    t = get_settings().transfer
    if not uids:
        return Repairs()
    batches, skipped = plan_repairs(list(uids), t.batch_files, t.batch_bytes)
    futures = [
        repair_replicas.submit(
            b,
            (names.get(b.src_storage_id, "?"), names.get(b.dst_storage_id, "?")),
            actor,
            str(flow_run.get_id() or ""),
            t.transfers,
            t.checkers,
        )
        for b in batches
    ]
    labels = [
        f"repair {names.get(b.src_storage_id, '?')} -> {names.get(b.dst_storage_id, '?')}" for b in batches
    ]
    results: list[BatchResult] = _results(futures, labels, failures)
    return Repairs(
        repairs=[r.row() for r in results],
        repaired=sum(r.done for r in results),
        repair_failed=sum(r.failed for r in results),
        unrepairable={str(u): why for u, why in skipped.items()},
    )


def _below_target() -> int:
    with session_scope() as s:
        return status(session=s).below_target


def _fail_if(failures: list[str], report: VerifyReport | ReconcileReport | PartitionedReport) -> None:
    """Fail the run (so Prefect marks it failed), the report with the error for `dlm run` to show."""
    if failures:
        raise RunFailedError(
            f"{report.pipeline}: {len(failures)} batch(es) failed: " + "; ".join(failures)[:1000], report
        )


@flow(name="verify", description=PIPELINES[Pipeline.VERIFY].description, log_prints=True)
def verify(
    storage: str | None = None,
    budget: int | str | None = None,
    repair: bool = True,
    dry_run: bool = False,
    partitions: int = 1,
    partition: int | None = None,
) -> VerifyReport | PartitionedReport:
    """Re-read copies, oldest-verified first, up to `budget` bytes (an int or '10GiB'; default
    the verify budget setting), on one storage or all; mark corrupt and lost copies and, with
    `repair`, copy intact bytes over them. `dry_run` only says what would be read.

    `partitions` K > 1 fans the run out into K sub-runs of its deployment, one per `partition`
    (items by oid mod K; flows/partitions.py): each reads the copies of its own items, within
    its share of the budget (budget / K), so no copy is read by two of them."""
    _enable_publishing()
    budget_bytes = _budget(budget)
    check_partition(partitions, partition)
    with tracked_run():
        return _verify_run(storage, budget_bytes, repair, dry_run, partitions, partition, budget)


def _verify_run(
    storage: str | None,
    budget_bytes: int,
    repair: bool,
    dry_run: bool,
    partitions: int,
    partition: int | None,
    budget: int | str | None,
) -> VerifyReport | PartitionedReport:
    if partitions > 1 and partition is None:
        report = fan_out(
            Pipeline.VERIFY,
            partitions,
            {"storage": storage, "budget": budget, "repair": repair, "dry_run": dry_run},
            lambda i: _verify(storage, budget_bytes, repair, dry_run, part=(partitions, i)),
        )
        failures = [
            f"partition {r.partition + 1}: {f}"
            for r in report.runs
            if isinstance(r.report, VerifyReport)
            for f in r.report.failures or []
        ]
        _fail_if(failures, report)
        return report
    part = (partitions, partition) if partitions > 1 and partition is not None else None
    with recorded_run(Pipeline.VERIFY, dry_run=dry_run, actor=run_actor(), part=part) as rec:
        report = rec.done(_verify(storage, budget_bytes, repair, dry_run, part=part))
        _fail_if(report.failures or [], report)
    return report


def _verify(
    storage: str | None,
    budget_bytes: int,
    repair: bool,
    dry_run: bool,
    part: tuple[int, int] | None = None,
) -> VerifyReport:
    """One verify run (or one partition's: `part`, with its share of the budget); failed
    batches are in the report's `failures`, for the caller to fail the run on."""
    logger = get_run_logger()
    actor = run_actor()
    if part is not None:
        budget_bytes = max(1, budget_bytes // part[0])
    t = get_settings().transfer
    if not dry_run:
        settle_in_flight(actor)
    names = storage_names()
    selection, batches = select_replicas(
        budget_bytes, [storage] if storage else None, t.batch_files, t.batch_bytes, part
    )
    selected = {
        "budget_bytes": budget_bytes,
        "selected": len(selection.checks),
        "selected_bytes": selection.bytes,
        "budget_reached": selection.budget_reached,
        "unsupported": selection.unsupported,
    }
    logger.info(
        "verify: %s copies (%s of a %s budget) in %s batches",
        len(selection.checks),
        format_size(selection.bytes),
        format_size(budget_bytes),
        len(batches),
    )
    if dry_run:
        planned = VerifyReport(
            dry_run=True,
            **selected,
            batches=[
                VerifyBatchRow(
                    storage=names.get(b.storage_id, "?"), algo=b.algo, planned=len(b.checks), bytes=b.bytes
                )
                for b in batches
            ],
        )
        _publish_verify(planned)
        return planned
    failures: list[str] = []
    futures = [verify_replicas.submit(b, names.get(b.storage_id, "?"), actor) for b in batches]
    results: list[VerifyResult] = _results(
        futures, [f"verify on {names.get(b.storage_id, '?')}" for b in batches], failures
    )
    damaged = [u for r in results for u in r.damaged]
    repairs = _repair(damaged, actor, names, failures) if repair else None
    report = VerifyReport(
        dry_run=False,
        **selected,
        recovered=sum(r.recovered for r in results),
        batches=[r.row() for r in results],
        intact=sum(r.matched for r in results),
        corrupted=sum(r.corrupted for r in results),
        lost=sum(r.lost for r in results),
        unreadable=sum(r.unreadable for r in results),
        bytes_read=sum(r.bytes for r in results if not r.trusted),
        bytes_trusted=sum(r.bytes for r in results if r.trusted),
        items_corrupted=sum(r.items_corrupted for r in results),
        items_repaired=sum(r.items_repaired for r in results),
        damaged=len(damaged),
        **(dict(repairs) if repairs is not None else {}),
        below_target_after=_below_target(),
        failures=failures,
    )
    logger.info(
        "verify: %s intact, %s corrupted, %s lost, %s recovered, %s repaired; %s items below target",
        report.intact,
        report.corrupted,
        report.lost,
        report.recovered,
        report.repaired or 0,
        report.below_target_after,
    )
    _publish_verify(report)
    return report


def _publish_verify(report: VerifyReport) -> None:
    rows = [r.as_json() for r in report.batches] + [r.as_json() for r in report.repairs or []]
    if rows:
        create_table_artifact(rows, key="dlm-verify-batches", description="verify batches and repairs")
    lines = [
        f"# verify{' (dry run)' if report.dry_run else ''}",
        "",
        f"- selected: {report.selected} copies ({format_size(report.selected_bytes)} of a "
        f"{format_size(report.budget_bytes)} budget"
        + ("; more are due" if report.budget_reached else "")
        + ")",
    ]
    if not report.dry_run:
        lines += [
            f"- intact: {report.intact}; corrupted: {report.corrupted}; lost: {report.lost}; "
            f"found intact again: {report.recovered}; unreadable: {report.unreadable}",
            f"- repaired: {report.repaired or 0}; repairs failed: {report.repair_failed or 0}; "
            f"cannot repair now: {len(report.unrepairable or {})}",
            f"- items with no intact copy left: {report.items_corrupted}; "
            f"items below their target phase: {report.below_target_after}",
        ]
    create_markdown_artifact("\n".join(lines), key="dlm-verify-summary", description="verify summary")


def reconcilable_storages() -> list[str]:
    """The storages a reconcile of all takes: those that can be listed (online or draining)."""
    with session_scope() as s:
        rows = s.execute(
            select(col(Storage.name))
            .where(col(Storage.state).in_([StorageState.ONLINE.value, StorageState.DRAINING.value]))
            .order_by(col(Storage.name))
        )
        return [name for (name,) in rows]


def _merged(found: Sequence[ReconcileResult], names: Sequence[str]) -> dict[str, Any]:
    """The report fields of one or more storages' reconcile results: counts summed, lists joined."""
    out: dict[str, Any] = {"storage": ", ".join(names)}
    for f in fields(ReconcileResult):
        values = [getattr(r, f.name) for r in found]
        if f.name in ("storage", "dry_run", "adopt", "damaged", "unknown_objects", "temporary_objects"):
            continue
        if f.name == "link_paths":
            out[f.name] = [p for v in values for p in v]
        else:
            out[f.name] = sum(values)
    out["unknown_objects"] = [
        UnknownObjectRow.model_validate({"storage": r.storage, **o.row()})
        for r in found
        for o in r.unknown_objects
    ]
    out["temporary_objects"] = [
        TemporaryObjectRow.model_validate({"storage": r.storage, **o.row()})
        for r in found
        for o in r.temporary_objects
    ]
    return out


@flow(name="reconcile", description=PIPELINES[Pipeline.RECONCILE].description, log_prints=True)
def reconcile(
    storage: str | None = None, adopt: bool = False, repair: bool = True, dry_run: bool = False
) -> ReconcileReport:
    """Compare storage `storage` (default: every online or draining storage, one listing each)
    with the catalogue: report unknown objects (and with `adopt` register them as items with
    their object metadata), mark missing copies LOST and resized ones CORRUPTED, and with
    `repair` copy intact bytes back over them. `dry_run` changes nothing."""
    _enable_publishing()
    with tracked_run(), recorded_run(Pipeline.RECONCILE, dry_run=dry_run, actor=run_actor()) as rec:
        return rec.done(_reconcile(storage, adopt, repair, dry_run))


def _reconcile(storage: str | None, adopt: bool, repair: bool, dry_run: bool) -> ReconcileReport:
    logger = get_run_logger()
    actor = run_actor()
    names = storage_names()
    # like every pipeline, settle what dead runs left in flight first (their rows are then
    # judged as what they became, their temporary files are gone)
    recovered = settle_in_flight(actor) if not dry_run else None
    failures: list[str] = []
    if storage:
        chosen = [storage]
        found = [reconcile_storage(storage, actor, adopt, dry_run)]
    else:
        # one storage after the other: adopting on two at once could race for the same name
        chosen = reconcilable_storages()
        found = []
        for name in chosen:
            future = reconcile_storage.submit(name, actor, adopt, dry_run)
            found += _results([future], [f"reconcile {name}"], failures)
    damaged = [u for r in found for u in r.damaged]
    repairs = _repair(damaged, actor, names, failures) if repair and not dry_run else None
    report = ReconcileReport(
        **_merged(found, chosen),
        dry_run=dry_run,
        adopt=adopt,
        recovered=recovered,
        **(dict(repairs) if repairs is not None else {}),
        below_target_after=_below_target(),
        failures=failures,
    )
    logger.info(
        "reconcile %s: %s objects, %s unknown (%s adopted), %s lost, %s corrupted, %s repaired",
        report.storage,
        report.listed,
        report.unknown,
        report.adopted,
        report.lost,
        report.corrupted,
        report.repaired or 0,
    )
    if report.ignored:
        logger.warning(
            "reconcile %s: %s stray temporary files (%s) left by interrupted writes",
            report.storage,
            report.ignored,
            format_size(report.temporary_bytes),
        )
    _publish_reconcile(report)
    _fail_if(failures, report)
    return report


def _publish_reconcile(report: ReconcileReport) -> None:
    if report.unknown_objects:
        create_table_artifact(
            [o.as_json() for o in report.unknown_objects],
            key="dlm-reconcile-unknown",
            description=f"objects on {report.storage} that the catalogue does not track",
        )
    if report.repairs:
        create_table_artifact(
            [r.as_json() for r in report.repairs],
            key="dlm-reconcile-repairs",
            description="reconcile repairs",
        )
    if report.temporary_objects:
        create_table_artifact(
            [o.as_json() for o in report.temporary_objects],
            key="dlm-reconcile-temporary",
            description=f"temporary files on {report.storage} (interrupted writes)",
        )
    shown = len(report.unknown_objects)
    lines = [
        f"# reconcile {report.storage}{' (dry run)' if report.dry_run else ''}",
        "",
        f"- listed: {report.listed} objects ({format_size(report.listed_bytes)}); "
        f"tracked and intact in size: {report.matched}; stray temporary files: {report.ignored} "
        f"({format_size(report.temporary_bytes)})",
        f"- unknown: {report.unknown} ({format_size(report.unknown_bytes)})"
        + (f", first {shown} listed" if shown < report.unknown else "")
        + f"; adopted: {report.adopted}",
        f"- missing copies: {report.missing} (LOST: {report.lost}); size mismatches: "
        f"{report.resized} (CORRUPTED: {report.corrupted}); repaired: {report.repaired or 0}",
        f"- items with no intact copy left: {report.items_corrupted}; "
        f"items below their target phase: {report.below_target_after}",
    ]
    create_markdown_artifact(
        "\n".join(lines), key="dlm-reconcile-summary", description=f"reconcile {report.storage}"
    )
