"""Verify at the core (lifecycle.integrity.verify): copies are re-read from their bytes; a
flipped byte is CORRUPTED, a missing copy LOST, and verify itself never deletes a byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifecycle.catalogue.catalog import get_item
from lifecycle.catalogue.db import session_scope
from lifecycle.integrity.verify import VerifyResult, batch_checks, select_checks, verify_batch
from tests.factories import (
    Estate,
    event_kinds,
    ingest_payloads,
    on_hot_and,
    payload,
    rot_and_lose,
    states_of,
)

pytestmark = [pytest.mark.s3, pytest.mark.rclone]

NAMES = ("intact.dat", "rotten.dat", "gone.dat")


def verify(storage: str) -> VerifyResult:
    """Select every copy on STORAGE and verify them in one batch."""
    with session_scope() as s:
        sel = select_checks(s, budget_bytes=10**9, storages=[storage])
    [batch] = batch_checks(sel.checks, max_files=100, max_bytes=10**9)
    return verify_batch(batch)


def item_state(name: str) -> str:
    with session_scope() as s:
        return str(get_item(name, session=s).state)


@pytest.mark.parametrize("storage", ["warm", "cold"])
def test_a_flipped_byte_is_corrupted_and_a_missing_copy_lost(
    estate: Estate, tmp_path: Path, storage: str
) -> None:
    rot_and_lose(estate, storage, NAMES, staging=tmp_path / "staging")
    result = verify(storage)
    assert (result.matched, result.corrupted, result.lost, result.unreadable) == (1, 1, 1, 0), result.errors
    assert not result.trusted  # the bytes were read, not the stored hashes
    assert states_of("intact.dat") == sorted([("hot", "READY"), (storage, "READY")])
    assert states_of("rotten.dat") == sorted([("hot", "READY"), (storage, "CORRUPTED")])
    assert states_of("gone.dat") == sorted([("hot", "READY"), (storage, "LOST")])
    assert len(result.damaged) == 2  # handed to repair
    for name in NAMES:
        assert item_state(name) == "READY"  # the copy on hot still counts
        assert estate.read("hot", name) == payload(name)
    assert estate.read(storage, "rotten.dat") is not None  # verify only reads
    assert event_kinds("rotten.dat")[-1] == "replica.corrupted"
    assert event_kinds("gone.dat")[-1] == "replica.lost"


def test_an_item_whose_only_copy_rots_is_corrupted_until_its_bytes_are_back(
    estate: Estate, tmp_path: Path
) -> None:
    ingest_payloads("hot", {"rotten.dat": payload("rotten.dat")}, staging=tmp_path / "staging")
    estate.flip_byte("hot", "rotten.dat")
    result = verify("hot")
    assert (result.corrupted, result.items_corrupted) == (1, 1)
    assert item_state("rotten.dat") == "CORRUPTED"
    assert states_of("rotten.dat") == [("hot", "CORRUPTED")]
    estate.flip_byte("hot", "rotten.dat")  # the same byte back: the item's bytes again
    again = verify("hot")
    assert (again.recovered, again.items_repaired) == (1, 1)
    assert item_state("rotten.dat") == "READY" and states_of("rotten.dat") == [("hot", "READY")]
    assert event_kinds("rotten.dat")[-2:] == ["replica.repaired", "item.repaired"]


def test_the_budget_reads_the_oldest_verified_copies_first(estate: Estate, tmp_path: Path) -> None:
    ingest_payloads("hot", {n: payload(n) for n in NAMES}, staging=tmp_path / "staging")
    with session_scope() as s:
        first = select_checks(s, budget_bytes=2 * 3000)
    assert (len(first.checks), first.bytes, first.budget_reached) == (2, 6000, True)
    [batch] = batch_checks(first.checks, max_files=100, max_bytes=10**9)
    assert verify_batch(batch).matched == 2
    with session_scope() as s:
        second = select_checks(s, budget_bytes=3000)
    assert [c.path for c in second.checks] == sorted(set(NAMES) - {c.path for c in first.checks})


@pytest.mark.parametrize("k", [2, 3])
def test_partitions_share_the_copies_by_item_each_once(estate: Estate, tmp_path: Path, k: int) -> None:
    from lifecycle.planning.partition import in_partition

    names = [f"p{i:02d}.dat" for i in range(12)]
    on_hot_and("warm", names, staging=tmp_path / "staging")
    with session_scope() as s:
        whole = select_checks(s, budget_bytes=10**9)
        parts = [select_checks(s, budget_bytes=10**9, part=(k, i)) for i in range(k)]

    assert len(whole.checks) == 24  # two copies of each item
    uids = [c.replica_uid for p in parts for c in p.checks]
    assert sorted(uids) == sorted(c.replica_uid for c in whole.checks)  # none left out, none twice
    for i, p in enumerate(parts):  # an item's copies stay together, in the item's partition
        assert all(in_partition(c.item_oid, k, i) for c in p.checks)
        assert len(p.checks) == 2 * len({c.item_oid for c in p.checks})


def test_a_partitions_budget_counts_only_its_own_copies(estate: Estate, tmp_path: Path) -> None:
    names = [f"b{i:02d}.dat" for i in range(40)]
    ingest_payloads("hot", {n: payload(n) for n in names}, staging=tmp_path / "staging")
    with session_scope() as s:
        mine = select_checks(s, budget_bytes=10**9, part=(2, 0))
        capped = select_checks(s, budget_bytes=2 * 3000, part=(2, 0))
    assert len(mine.checks) >= 3  # (40 items: fewer than 3 in it at odds of 1 in a billion)
    assert [c.replica_uid for c in capped.checks] == [c.replica_uid for c in mine.checks[:2]]
    assert capped.budget_reached
