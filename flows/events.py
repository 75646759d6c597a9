"""Publishes DLM's audit events as Prefect events (`dlm.item.ready`, `dlm.replica.created`, ...)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lifecycle.catalogue import audit
from lifecycle.settings import get_settings
from lifecycle.states import EventKind

# Past this many events in one transaction, the rest are published as one `dlm.events.summary`
# per kind (a count and a sample of items): the event bus is for
# triggers and automations, and every Prefect event costs the server a few milliseconds
# (2,500 per-item events once doubled a 10,000-file replicate run). The audit table keeps every
# event either way.
MAX_PER_COMMIT = 25
SAMPLE = 20
# `dlm ingest` announces at most this many new items (one HTTP request; a burst starts one
# replicate run, which replicates every READY item, announced or not)
MAX_ANNOUNCED = 500


def api_url_file() -> Path:
    """Where `dlm serve` writes the URL of its Prefect server, for CLI commands to find it."""
    return get_settings().home / "prefect-api-url"


def _resource(e: dict[str, Any]) -> dict[str, str]:
    if e.get("item_oid"):
        res = {"prefect.resource.id": f"dlm.item.{e['item_oid']}", "dlm.item.oid": str(e["item_oid"])}
    elif e.get("storage_id"):
        res = {"prefect.resource.id": f"dlm.storage.{e['storage_id']}"}
    else:
        res = {"prefect.resource.id": "dlm.catalogue"}
    if e.get("replica_uid"):
        res["dlm.replica.uid"] = str(e["replica_uid"])
    return res


def publish(events: Sequence[dict[str, Any]]) -> None:
    """An audit publisher: emit each committed event to Prefect, or past MAX_PER_COMMIT in one
    transaction, the first ones and then a summary per kind."""
    from prefect.events import emit_event

    for e in events[:MAX_PER_COMMIT]:
        payload = json.loads(json.dumps(e.get("details") or {}, default=str))
        emit_event(event=f"dlm.{e['kind']}", resource=_resource(e), payload=payload)
    rest = events[MAX_PER_COMMIT:]
    if not rest:
        return
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for e in rest:
        by_kind.setdefault(e["kind"], []).append(e)
    for kind, group in by_kind.items():
        emit_event(
            event="dlm.events.summary",
            resource={"prefect.resource.id": "dlm.catalogue", "dlm.event.kind": kind},
            payload={
                "kind": kind,
                "count": len(group),
                "items": [str(e["item_oid"]) for e in group[:SAMPLE] if e.get("item_oid")],
                "not_published_singly": len(group),
            },
        )


def enable_publishing() -> None:
    """Send committed audit events to Prefect from now on (flows call this)."""
    audit.add_publisher(publish)


def announce_items_ready(oids: Sequence[str]) -> bool:
    """From the CLI: emit `dlm.item.ready` for new items to a running `dlm serve`, if any.

    Returns whether a server was told. Never raises: the items are READY either way and the
    scheduled replicate run will pick them up.
    """
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        try:
            url = api_url_file().read_text().strip()
        except OSError:
            return False
    if not url or not oids:
        return False
    try:
        import httpx
        from prefect.events import Event

        events = [
            Event(
                event=f"dlm.{EventKind.ITEM_READY}",
                resource={"prefect.resource.id": f"dlm.item.{oid}", "dlm.item.oid": oid},
            ).model_dump(mode="json")
            for oid in oids[:MAX_ANNOUNCED]
        ]
        # one HTTP request for all of them: the websocket events client needs seconds to drain
        response = httpx.post(f"{url.rstrip('/')}/events", json=events, timeout=10)
        return response.status_code < 300
    except Exception:
        return False
