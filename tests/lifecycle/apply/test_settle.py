"""Settling states at the core (lifecycle.apply.settle): replica changes apply only to the
state they were read in, and an item is CORRUPTED exactly while it has no READY copy."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update
from sqlmodel import col

from lifecycle.apply.settle import Check, ReplicaChange, apply_replica_changes, settle_items
from lifecycle.catalogue.catalog import get_item
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Replica, Storage, utcnow
from lifecycle.states import ReplicaState
from tests.factories import CopyRow, Estate, copy_on, event_kinds, ingest_payloads, payload, states_of

pytestmark = [pytest.mark.s3, pytest.mark.rclone]

NAME = "only.dat"


def change(row: CopyRow, was: ReplicaState, to: ReplicaState, kind: str, delta: int = 0) -> ReplicaChange:
    check = Check(row.uid, row.item_oid, row.storage_id, row.path, 3000, "", "md5", was)
    return ReplicaChange(check, to, kind, {"path": row.path}, delta)


def apply_and_settle(ch: ReplicaChange) -> tuple[int, tuple[int, int]]:
    """Apply one change and settle the items of what applied, as verify and reconcile do:
    (changes applied, (items corrupted, items repaired))."""
    with session_scope() as s:
        applied = apply_replica_changes(s, [ch], storage_id=ch.check.storage_id, actor="test", now=utcnow())
        return len(applied), settle_items(s, [a.check.item_oid for a in applied], actor="test")


def item_state() -> str:
    with session_scope() as s:
        return str(get_item(NAME, session=s).state)


def used(row: CopyRow) -> int:
    with session_scope() as s:
        return s.get_one(Storage, row.storage_id).used_bytes


def test_an_item_is_corrupted_while_it_has_no_ready_copy_and_ready_again_after(
    estate: Estate, tmp_path: Path
) -> None:
    ingest_payloads("hot", {NAME: payload(NAME)}, staging=tmp_path / "staging")
    row = copy_on(NAME, "hot")
    before = used(row)
    lost = change(row, ReplicaState.READY, ReplicaState.LOST, "replica.lost", -3000)
    assert apply_and_settle(lost) == (1, (1, 0))
    assert (states_of(NAME), item_state(), used(row)) == ([("hot", "LOST")], "CORRUPTED", before - 3000)
    back = change(row, ReplicaState.LOST, ReplicaState.READY, "replica.repaired", 3000)
    assert apply_and_settle(back) == (1, (0, 1))
    assert (states_of(NAME), item_state(), used(row)) == ([("hot", "READY")], "READY", before)
    assert event_kinds(NAME)[-4:] == ["replica.lost", "item.corrupted", "replica.repaired", "item.repaired"]
    assert estate.read("hot", NAME) == payload(NAME)  # settling touches rows, never bytes


def test_a_change_read_in_another_state_is_not_applied(estate: Estate, tmp_path: Path) -> None:
    """The copy was READY when read, another run has claimed it (DELETING) since: no LOST."""
    ingest_payloads("hot", {NAME: payload(NAME)}, staging=tmp_path / "staging")
    row = copy_on(NAME, "hot")
    with session_scope() as s:
        s.execute(
            update(Replica).where(col(Replica.uid) == row.uid).values(state=ReplicaState.DELETING.value)
        )
    stale = change(row, ReplicaState.READY, ReplicaState.LOST, "replica.lost", -3000)
    assert apply_and_settle(stale) == (0, (0, 0))
    assert states_of(NAME) == [("hot", "DELETING")]
    assert item_state() == "READY"
    assert "replica.lost" not in event_kinds(NAME)
