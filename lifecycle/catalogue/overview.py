"""The operator's overview, which the dashboard of `dlm api` shows: the catalogue's status (the
same `public.status` as `dlm status` and GET /metrics), the items below their phase's target,
transfers by state, the latest transfers and failures, and the latest events.

Bulk by design: a fixed number of statements (GROUP BY, LIMIT), whatever the size of the
catalogue. Error messages and event details are redacted (no URL password is ever shown).
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import aliased
from sqlmodel import Session, col

from lifecycle.catalogue import public
from lifecycle.catalogue.access import EventRowPublic
from lifecycle.catalogue.catalog import below_target_subquery
from lifecycle.catalogue.models import Event, Item, Storage, Transfer
from lifecycle.catalogue.public import IsoDateTime, StatusPublic
from lifecycle.catalogue.run_log import recent_runs
from lifecycle.redact import redact, redact_value
from lifecycle.states import Phase, TransferState

MAX_ERROR_CHARS = 300  # a transfer's error as shown: one line, at most this long


class BelowTargetPublic(BaseModel):
    """A live item with fewer intact copies than its target phase needs."""

    oid: uuid.UUID
    name: str
    version: int
    target_phase: Phase
    intact: int
    required: int


class TransferLinePublic(BaseModel):
    """One transfer: which item, from which storage to which, how it went."""

    id: uuid.UUID
    kind: str
    state: TransferState
    item: str | None  # NAME@vN
    src: str | None
    dst: str | None
    bytes: int
    started_at: IsoDateTime
    finished_at: IsoDateTime | None
    error: str | None  # redacted, one line, at most MAX_ERROR_CHARS
    flow_run_id: str | None


class EventLinePublic(EventRowPublic):
    """An audit event with the names of its item (NAME@vN) and storage, where it has them."""

    item: str | None
    storage: str | None


class RunLinePublic(BaseModel):
    """One finished pipeline run of the run log (lifecycle.catalogue.run_log)."""

    pipeline: str
    partition: str | None
    outcome: str
    finished_at: IsoDateTime
    duration_s: float
    copied: int
    deleted: int
    failed: int
    bytes_moved: int
    error: str | None  # redacted, one line
    flow_run_id: str | None


class OverviewPublic(BaseModel):
    status: StatusPublic
    runs: list[RunLinePublic]  # the latest `limit` finished runs, newest first
    below_target: list[BelowTargetPublic]  # the first `limit`, by name and version
    transfers_by_state: dict[str, int]
    transfers: list[TransferLinePublic]  # the latest `limit`, newest first
    failures: list[TransferLinePublic]  # the latest `limit` FAILED ones, newest first
    events: list[EventLinePublic]  # the latest `limit`, newest first


def one_line_error(error: str | None) -> str | None:
    """A stored error as shown: redacted, its white space folded, cut at MAX_ERROR_CHARS."""
    if not error:
        return None
    text = " ".join(redact(error).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _ref(name: str | None, version: int | None) -> str | None:
    return None if name is None else f"{name}@v{version}"


def below_target(*, session: Session, limit: int) -> list[BelowTargetPublic]:
    """The first `limit` live items below their target, by name and version."""
    sq = below_target_subquery()
    rows = session.execute(select(sq).order_by(sq.c.name, sq.c.version).limit(limit)).all()
    return [
        BelowTargetPublic(
            oid=r.oid,
            name=r.name,
            version=r.version,
            target_phase=Phase(r.target_phase),
            intact=int(r.intact),
            required=int(r.required),
        )
        for r in rows
    ]


def _transfers(session: Session, *, limit: int, failed_only: bool) -> list[TransferLinePublic]:
    src, dst = aliased(Storage), aliased(Storage)
    stmt: Any = (
        select(Transfer, col(Item.name), col(Item.version), col(src.name), col(dst.name))
        .outerjoin(Item, col(Item.oid) == col(Transfer.item_oid))
        .outerjoin(src, col(src.id) == col(Transfer.src_storage_id))
        .outerjoin(dst, col(dst.id) == col(Transfer.dst_storage_id))
    )
    if failed_only:
        stmt = stmt.where(col(Transfer.state) == TransferState.FAILED.value)
    rows = session.execute(stmt.order_by(col(Transfer.started_at).desc()).limit(limit)).all()
    return [
        TransferLinePublic(
            id=t.id,
            kind=str(t.kind),
            state=TransferState(t.state),
            item=_ref(name, version),
            src=src_name,
            dst=dst_name,
            bytes=int(t.bytes),
            started_at=t.started_at,
            finished_at=t.finished_at,
            error=one_line_error(t.error),
            flow_run_id=t.flow_run_id,
        )
        for t, name, version, src_name, dst_name in rows
    ]


def latest_events(*, session: Session, limit: int) -> list[EventLinePublic]:
    """The latest `limit` events, newest first, with their item's and storage's names."""
    rows = session.execute(
        select(Event, col(Item.name), col(Item.version), col(Storage.name))
        .outerjoin(Item, col(Item.oid) == col(Event.item_oid))
        .outerjoin(Storage, col(Storage.id) == col(Event.storage_id))
        .order_by(col(Event.id).desc())
        .limit(limit)
    ).all()
    out = []
    for event, name, version, storage in rows:
        row = EventRowPublic.of_row(event)
        out.append(
            EventLinePublic(
                **{**dict(row), "details": redact_value(row.details)},
                item=_ref(name, version),
                storage=storage,
            )
        )
    return out


def overview(*, session: Session, limit: int = 20) -> OverviewPublic:
    """Everything the dashboard shows; lists hold at most `limit` rows each."""
    by_state = {
        str(k): int(v)
        for k, v in session.execute(
            select(col(Transfer.state), func.count()).group_by(col(Transfer.state))
        ).all()
    }
    return OverviewPublic(
        status=public.status(session=session),
        runs=[
            RunLinePublic.model_validate(
                {**r.model_dump(), "error": one_line_error(r.error)}, from_attributes=False
            )
            for r in recent_runs(session, limit)
        ],
        below_target=below_target(session=session, limit=limit),
        transfers_by_state=by_state,
        transfers=_transfers(session, limit=limit, failed_only=False),
        failures=_transfers(session, limit=limit, failed_only=True),
        events=latest_events(session=session, limit=limit),
    )


class TransferTotalsPublic(BaseModel):
    """Transfers between one pair of storages, of one kind, that ended (or stand) in one state."""

    src: str | None
    dst: str | None
    kind: str
    state: TransferState
    transfers: int
    bytes: int


def transfer_totals(*, session: Session) -> list[TransferTotalsPublic]:
    """Transfers counted per (source, destination, kind, state), with their bytes: one GROUP BY."""
    src, dst = aliased(Storage), aliased(Storage)
    rows = session.execute(
        select(
            col(src.name),
            col(dst.name),
            col(Transfer.kind),
            col(Transfer.state),
            func.count(),
            func.coalesce(func.sum(col(Transfer.bytes)), 0),
        )
        .outerjoin(src, col(src.id) == col(Transfer.src_storage_id))
        .outerjoin(dst, col(dst.id) == col(Transfer.dst_storage_id))
        .group_by(col(src.name), col(dst.name), col(Transfer.kind), col(Transfer.state))
    ).all()
    return [
        TransferTotalsPublic(
            src=s, dst=d, kind=str(k), state=TransferState(st), transfers=int(n), bytes=int(b)
        )
        for s, d, k, st, n, b in rows
    ]
