"""Repair at the core (lifecycle.integrity.repair): a damaged copy gets the item's bytes back
from an intact copy on another storage; the source is only read."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from lifecycle.catalogue.db import session_scope
from lifecycle.integrity.repair import plan_repairs, repair_batch
from tests.factories import (
    Estate,
    copy_on,
    event_kinds,
    ingest_payloads,
    on_hot_and,
    payload,
    rot_and_lose,
    states_of,
    verify_copies,
)

pytestmark = [pytest.mark.s3, pytest.mark.rclone]

NAMES = ("rotten.dat", "gone.dat")


def damaged_after_verify() -> list[uuid.UUID]:
    """Verify every copy; the replica uids found damaged."""
    return [uid for result in verify_copies() for uid in result.damaged]


@pytest.mark.parametrize("damaged", ["warm", "cold"])
def test_a_corrupted_and_a_lost_copy_get_the_items_bytes_back(
    estate: Estate, tmp_path: Path, damaged: str
) -> None:
    rot_and_lose(estate, damaged, NAMES, staging=tmp_path / "staging")
    uids = damaged_after_verify()
    assert sorted(uids) == sorted(copy_on(n, damaged).uid for n in NAMES)
    with session_scope() as s:
        batches, skipped = plan_repairs(s, uids, max_files=100, max_bytes=10**9)
    assert skipped == {} and len(batches) == 1
    result = repair_batch(batches[0])
    assert (result.done, result.failed, result.bytes) == (2, 0, 6000), result.errors
    for name in NAMES:
        assert estate.read(damaged, name) == payload(name)
        assert estate.read("hot", name) == payload(name)  # the source is only read
        assert states_of(name) == sorted([("hot", "READY"), (damaged, "READY")])
        assert event_kinds(name)[-1] == "replica.repaired"
    assert damaged_after_verify() == []


def test_a_copy_with_no_intact_copy_elsewhere_is_not_repaired(estate: Estate, tmp_path: Path) -> None:
    """The only copy rotted: nothing to repair it from; its bytes are left for a human."""
    ingest_payloads("hot", {"rotten.dat": payload("rotten.dat")}, staging=tmp_path / "staging")
    estate.flip_byte("hot", "rotten.dat")
    rotten = estate.read("hot", "rotten.dat")
    uids = damaged_after_verify()
    with session_scope() as s:
        batches, skipped = plan_repairs(s, uids, max_files=100, max_bytes=10**9)
    assert batches == [] and list(skipped.values()) == ["no intact copy on another online storage"]
    assert estate.read("hot", "rotten.dat") == rotten
    assert states_of("rotten.dat") == [("hot", "CORRUPTED")]


def test_a_source_that_rotted_since_the_plan_repairs_nothing_with_its_bytes(
    estate: Estate, tmp_path: Path
) -> None:
    """The repair reads its result back: bytes that are not the item's are never marked READY."""
    on_hot_and("warm", ["gone.dat"], staging=tmp_path / "staging")
    estate.remove("warm", "gone.dat")
    uids = damaged_after_verify()
    with session_scope() as s:
        [batch], _ = plan_repairs(s, uids, max_files=100, max_bytes=10**9)
    estate.flip_byte("hot", "gone.dat")
    result = repair_batch(batch)
    assert (result.done, result.failed) == (0, 1) and "does not match" in result.errors["gone.dat"]
    assert estate.read("warm", "gone.dat") is None  # a LOST copy stays truthfully absent
    assert states_of("gone.dat") == [("hot", "READY"), ("warm", "LOST")]
    assert event_kinds("gone.dat")[-1] == "replica.repair_failed"
