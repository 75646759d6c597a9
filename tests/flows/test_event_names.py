"""The Prefect events DLM publishes keep their names now that kinds are an enum: `dlm.<kind>`
for each committed event, and past MAX_PER_COMMIT one `dlm.events.summary` per kind; the
item-ready trigger listens for one of them. Read back from a real Prefect server."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from lifecycle.catalogue import audit
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import utcnow
from lifecycle.states import EventKind

pytestmark = [pytest.mark.prefect]

ROOT = Path(__file__).resolve().parents[2]


def _dlm_events(since: Any, done: Any, timeout: float = 60.0) -> list[Any]:
    """The server's `dlm.*` events since `since`, once `done(events)` holds (or the timeout)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            # `until` defaults to the filter's creation: a new filter per look
            flt = EventFilter(
                occurred=EventOccurredFilter(since=since), event=EventNameFilter(prefix=["dlm."])
            )
            page = client.read_events(filter=flt, limit=50)
            events = list(page.events)
            while page.next_page:
                page = client.read_events_page(page.next_page)
                events += page.events
            if done(events) or time.monotonic() > deadline:
                return events
            time.sleep(0.5)


def test_published_prefect_events_are_named_after_the_kinds(prefect_harness: None, db_url: str) -> None:
    from prefect.events.worker import EventsWorker

    from flows import events as flow_events

    since = utcnow() - timedelta(seconds=5)
    oid, uid = uuid.uuid4(), uuid.uuid4()
    many = [uuid.uuid4() for _ in range(flow_events.MAX_PER_COMMIT + 3)]
    flow_events.enable_publishing()
    try:
        with session_scope() as s:
            audit.record(s, EventKind.ITEM_READY, item_oid=oid)
            audit.record(s, EventKind.REPLICA_LOST, item_oid=oid, replica_uid=uid, details={"path": "p"})
            audit.record(s, EventKind.DATASET_CREATED, details={"name": "kept in the catalogue only"})
        with session_scope() as s:
            audit.record_many(s, [{"kind": EventKind.REPLICA_CREATED, "item_oid": o} for o in many])
    finally:
        audit.remove_publisher(flow_events.publish)
    EventsWorker.drain_all()
    mine = {f"dlm.item.{o}" for o in [oid, *many]}

    def summary(events: list[Any]) -> list[Any]:
        return [
            e
            for e in events
            if e.event == "dlm.events.summary" and set(e.payload.get("items", [])) <= {str(o) for o in many}
        ]

    def done(events: list[Any]) -> bool:
        return len([e for e in events if e.resource.id in mine]) >= 2 + flow_events.MAX_PER_COMMIT and bool(
            summary(events)
        )

    events = _dlm_events(since, done)

    about_item = sorted(e.event for e in events if e.resource.id == f"dlm.item.{oid}")
    assert about_item == ["dlm.item.ready", "dlm.replica.lost"]
    [lost] = [e for e in events if e.event == "dlm.replica.lost" and e.resource.id == f"dlm.item.{oid}"]
    assert lost.resource["dlm.replica.uid"] == str(uid) and lost.payload == {"path": "p"}
    singly = [e for e in events if e.resource.id in {f"dlm.item.{o}" for o in many}]
    assert {e.event for e in singly} == {"dlm.replica.created"}
    assert len(singly) == flow_events.MAX_PER_COMMIT
    [summed] = summary(events)
    assert summed.resource["dlm.event.kind"] == "replica.created"
    assert summed.payload["kind"] == "replica.created" and summed.payload["count"] == 3
    assert not [e for e in events if e.event.startswith("dlm.dataset.")]


def test_the_cli_announces_ready_items_under_the_kind_name(
    prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL

    from flows.events import announce_items_ready

    since = utcnow() - timedelta(seconds=5)
    oid = str(uuid.uuid4())
    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))

    assert announce_items_ready([oid]) is True

    events = _dlm_events(since, lambda evs: any(e.resource.id == f"dlm.item.{oid}" for e in evs))
    assert [e.event for e in events if e.resource.id == f"dlm.item.{oid}"] == ["dlm.item.ready"]


def test_the_ready_trigger_listens_for_an_event_dlm_publishes() -> None:
    from deployments.serve import READY_EVENT, ready_trigger

    published = {f"dlm.{k}" for k in audit.PUBLISHED_KINDS}
    assert f"dlm.{EventKind.ITEM_READY}" == READY_EVENT
    assert ready_trigger().expect <= published
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    expected = [
        name
        for deployment in config["deployments"]
        for trigger in deployment.get("triggers") or []
        for name in trigger["expect"]
    ]
    assert expected and set(expected) <= published
