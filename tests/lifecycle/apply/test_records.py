"""The catalogue-only actions at the core (lifecycle.apply.records): expiry, phase changes,
drained storages, and an explicit delete that removes every copy's bytes."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlmodel import col

from lifecycle.apply.records import (
    apply_phase_changes,
    delete_item_now,
    finish_expired,
    mark_expired,
    record_drained,
)
from lifecycle.catalogue.catalog import get_item
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Event
from lifecycle.catalogue.storages import get_storage, set_storage_state
from lifecycle.errors import PolicyViolationError
from lifecycle.planning.actions import Drained, ExpireItem, SetPhase
from lifecycle.planning.pipelines import policy_from
from lifecycle.states import Phase, StorageState
from tests.factories import Estate, event_kinds, ingest_payloads, on_hot_and, payload, states_of

pytestmark = [pytest.mark.s3, pytest.mark.rclone]

NAME = "obs/x.dat"


def item_state(name: str = NAME) -> tuple[str, str]:
    with session_scope() as s:
        item = get_item(name, session=s)
        return str(item.state), str(item.target_phase)


def test_an_explicit_delete_removes_every_copys_bytes_and_leaves_a_tombstone(
    estate: Estate, tmp_path: Path
) -> None:
    oids = on_hot_and("cold", [NAME], staging=tmp_path / "staging", phase=Phase.LIQUID)
    results = delete_item_now(oids[NAME], policy=policy_from())
    assert sum(r.done for r in results) == 2 and not any(r.errors for r in results)
    assert estate.read("hot", NAME) is None and estate.read("cold", NAME) is None
    assert states_of(NAME) == [] and item_state()[0] == "DELETED"
    assert event_kinds(NAME)[-1] == "item.deleted"
    with pytest.raises(PolicyViolationError, match="already deleted"):
        delete_item_now(oids[NAME], policy=policy_from())


def test_an_expired_item_is_a_tombstone_only_once_no_copy_is_left(estate: Estate, tmp_path: Path) -> None:
    oids = ingest_payloads(
        "hot", {NAME: payload(NAME)}, staging=tmp_path / "staging", lifetime=timedelta(days=1)
    )
    with session_scope() as s:
        assert mark_expired(s, [ExpireItem(oids[NAME], "expired")], actor="test") == 1
        assert mark_expired(s, [ExpireItem(oids[NAME], "expired")], actor="test") == 0  # once
        assert finish_expired(s, actor="test") == 0  # its copy is still there
    assert item_state()[0] == "EXPIRED" and estate.read("hot", NAME) == payload(NAME)
    assert states_of(NAME) == [("hot", "READY")]


def test_phase_changes_raise_a_target_and_never_lower_it(estate: Estate, tmp_path: Path) -> None:
    oids = ingest_payloads("hot", {NAME: payload(NAME)}, staging=tmp_path / "staging", phase=Phase.LIQUID)
    with session_scope() as s:
        assert apply_phase_changes(s, [SetPhase(oids[NAME], Phase.GAS, "rule 1")], actor="test") == 0
    assert item_state() == ("READY", "LIQUID")
    with session_scope() as s:
        assert apply_phase_changes(s, [SetPhase(oids[NAME], Phase.SOLID, "rule 2")], actor="test") == 1
    assert item_state() == ("READY", "SOLID")
    assert event_kinds(NAME)[-1] == "item.phase_changed"


def test_a_drained_storage_is_announced_once(estate: Estate) -> None:
    with session_scope() as s:
        warm = set_storage_state("warm", StorageState.DRAINING, session=s)
        hot = get_storage("hot", session=s)
        drained = [Drained(warm.id), Drained(hot.id)]  # hot is online: not drained
        assert record_drained(s, drained, actor="test") == ["warm"]
        assert record_drained(s, drained, actor="test") == ["warm"]
    with session_scope() as s:
        count = s.execute(select(func.count()).where(col(Event.kind) == "storage.drained")).scalar_one()
    assert count == 1
