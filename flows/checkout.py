"""The checkout flow: fetch items (or a dataset) to a local directory or an rclone remote, verified."""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from lifecycle.apply.checkout import checkout
from lifecycle.catalogue.catalog import get_dataset, get_item, list_items
from lifecycle.catalogue.db import session_scope
from lifecycle.errors import InvalidValueError
from lifecycle.settings import get_settings
from lifecycle.units import format_size


def checkout_now(items: list[str] | None, dataset: str | None, dest: str, actor: str) -> dict[str, Any]:
    """Resolve the items, then check them out (the core of the flow; also used by the CLI).

    Raises ItemNotFoundError, DatasetNotFoundError, PolicyViolationError, InvalidValueError.
    """
    if bool(items) == bool(dataset):
        raise InvalidValueError("give item names or --dataset, not both and not neither")
    with session_scope() as s:
        if dataset:
            chosen = list_items(where=get_dataset(dataset, session=s).where, limit=None, session=s)
        else:
            chosen = [get_item(ref, session=s) for ref in items or []]
        if not chosen:
            raise InvalidValueError(f"dataset {dataset!r} has no members")
        rep = checkout(s, chosen, dest, actor=actor, transfers=get_settings().transfer.transfers)
    return {
        "destination": rep.destination,
        "files": rep.files,
        "bytes": rep.bytes,
        "failed": rep.failed,
        "seconds": round(rep.duration_s, 2),
        "rclone_processes": rep.rclone_processes,
    }


@task(name="checkout-items", cache_policy=NO_CACHE)
def checkout_items(items: list[str] | None, dataset: str | None, dest: str, actor: str) -> dict[str, Any]:
    return checkout_now(items, dataset, dest, actor)


@flow(name="checkout", log_prints=True)
def checkout_flow(dest: str, items: list[str] | None = None, dataset: str | None = None) -> dict[str, Any]:
    """Copy the best intact copy of each item to DEST (a directory or remote:path), verified."""
    result = checkout_items(items, dataset, dest, "flow:checkout")
    create_markdown_artifact(
        f"# checkout to {dest}\n\n- files: {result['files']} ({format_size(result['bytes'])})\n"
        f"- failed: {len(result['failed'])}",
        key="dlm-checkout-summary",
    )
    return result
