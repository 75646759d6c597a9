"""Publishes DLM's audit events as Prefect events (`dlm.item.ready`, `dlm.replica.created`, ...)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lifecycle import audit
from lifecycle.settings import get_settings

# More than this many events in one transaction become one summary event (a bulk run must
# not flood the event bus; the audit table keeps every one).
MAX_PER_COMMIT = 500


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
    """An audit publisher: emit each committed event to Prefect (capped per transaction)."""
    from prefect.events import emit_event

    for e in events[:MAX_PER_COMMIT]:
        payload = json.loads(json.dumps(e.get("details") or {}, default=str))
        emit_event(event=f"dlm.{e['kind']}", resource=_resource(e), payload=payload)
    if len(events) > MAX_PER_COMMIT:
        kinds: dict[str, int] = {}
        for e in events:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        emit_event(
            event="dlm.events.summary",
            resource={"prefect.resource.id": "dlm.catalogue"},
            payload={"counts": kinds, "published": MAX_PER_COMMIT},
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
                event="dlm.item.ready",
                resource={"prefect.resource.id": f"dlm.item.{oid}", "dlm.item.oid": oid},
            ).model_dump(mode="json")
            for oid in oids[:MAX_PER_COMMIT]
        ]
        # one HTTP request for all of them: the websocket events client needs seconds to drain
        response = httpx.post(f"{url.rstrip('/')}/events", json=events, timeout=10)
        return response.status_code < 300
    except Exception:
        return False
