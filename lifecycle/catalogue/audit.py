"""The audit trail: one Event row per state change, written in the caller's transaction,
then handed to registered publishers (e.g. Prefect events) once that transaction commits."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Required, TypedDict

from sqlalchemy import event as sa_event
from sqlalchemy import insert
from sqlmodel import Session

from lifecycle.catalogue.models import Event, utcnow
from lifecycle.redact import redact_value
from lifecycle.states import EventKind

log = logging.getLogger(__name__)

Publisher = Callable[[Sequence[dict[str, Any]]], None]
_publishers: list[Publisher] = []
_PENDING = "dlm_pending_events"
# Kinds that are announced to publishers (others stay in the audit table only).
PUBLISHED_KINDS = frozenset(
    {
        EventKind.ITEM_READY,
        EventKind.ITEM_EXPIRED,
        EventKind.ITEM_DELETED,
        EventKind.ITEM_CORRUPTED,
        EventKind.REPLICA_CREATED,
        EventKind.REPLICA_DELETED,
        EventKind.REPLICA_CORRUPTED,
        EventKind.REPLICA_LOST,
        EventKind.REPLICA_REPAIRED,
        EventKind.ITEM_REPAIRED,
        EventKind.TRANSFER_FAILED,
        EventKind.STORAGE_DRAINED,
    }
)


class EventRow(TypedDict, total=False):
    """One event for record_many: its kind, and whichever of the rest apply."""

    kind: Required[EventKind]
    item_oid: uuid.UUID | None
    replica_uid: uuid.UUID | None
    storage_id: uuid.UUID | None
    actor: str
    details: dict[str, Any]


def add_publisher(publisher: Publisher) -> None:
    """Call `publisher` with the events of every committed transaction."""
    if publisher not in _publishers:
        _publishers.append(publisher)


def remove_publisher(publisher: Publisher) -> None:
    if publisher in _publishers:
        _publishers.remove(publisher)


def record(
    session: Session,
    kind: EventKind,
    *,
    item_oid: uuid.UUID | None = None,
    replica_uid: uuid.UUID | None = None,
    storage_id: uuid.UUID | None = None,
    actor: str = "user",
    details: dict[str, Any] | None = None,
) -> None:
    """Add one Event to the session's transaction."""
    record_many(
        session,
        [
            {
                "kind": kind,
                "item_oid": item_oid,
                "replica_uid": replica_uid,
                "storage_id": storage_id,
                "actor": actor,
                "details": details or {},
            }
        ],
    )


def record_many(session: Session, rows: Iterable[EventRow]) -> int:
    """Bulk-insert Events (dicts with kind, item_oid, replica_uid, storage_id, actor, details).

    Raises ValueError for a kind that is not an EventKind (the database would refuse it too).
    """
    now = utcnow()
    batch = [
        {
            "ts": now,
            "kind": EventKind(r["kind"]).value,  # publishers get the plain string
            "item_oid": r.get("item_oid"),
            "replica_uid": r.get("replica_uid"),
            "storage_id": r.get("storage_id"),
            "actor": r.get("actor", "user"),
            "details": redact_value(r.get("details") or {}),  # error texts may quote a URL
        }
        for r in rows
    ]
    if not batch:
        return 0
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        # one statement over arrays: no per-row parameters to render or convert
        conn.exec_driver_sql(
            "INSERT INTO event (ts, kind, item_oid, replica_uid, storage_id, actor, details) "
            "SELECT %(ts)s, k, i, r, s, a, d::jsonb FROM unnest(%(kinds)s::text[], %(items)s::uuid[], "
            "%(replicas)s::uuid[], %(storages)s::uuid[], %(actors)s::text[], %(details)s::text[]) "
            "AS t(k, i, r, s, a, d)",
            {
                "ts": now,
                "kinds": [b["kind"] for b in batch],
                "items": [b["item_oid"] for b in batch],
                "replicas": [b["replica_uid"] for b in batch],
                "storages": [b["storage_id"] for b in batch],
                "actors": [b["actor"] for b in batch],
                "details": [json.dumps(b["details"]) for b in batch],
            },
        )
    else:
        # Core executemany: pages of VALUES, no per-row ORM bookkeeping
        conn.execute(insert(Event.__table__), batch)  # type: ignore[attr-defined]
    if _publishers:
        pending = session.info.setdefault(_PENDING, [])
        pending.extend(b for b in batch if b["kind"] in PUBLISHED_KINDS)
    return len(batch)


@sa_event.listens_for(Session, "after_commit")
def _publish_after_commit(session: Session) -> None:
    pending = session.info.pop(_PENDING, None)
    if not pending:
        return
    for publisher in list(_publishers):
        try:
            publisher(pending)
        except Exception:  # a publisher must never undo a committed change
            log.exception("event publisher %r failed", publisher)


@sa_event.listens_for(Session, "after_rollback")
def _drop_after_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)
