"""Copy batches (lifecycle.apply.copy) on real posix dirs, SeaweedFS S3, rclone, SQLite and
PostgreSQL: a copy is READY only when the bytes at its destination are the item's."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import col

from lifecycle.apply.copy import apply_copy_batch
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Storage, Transfer
from tests.factories import Estate, copy_batch, event_kinds, ingest_payloads, payload, states_of

pytestmark = [pytest.mark.s3, pytest.mark.rclone]

NAMES = ("run1/a.dat", "run1/b.dat", "c.dat")


def transfer_states() -> list[str]:
    with session_scope() as s:
        return sorted(str(t) for t in s.scalars(select(col(Transfer.state))))


def used_bytes(storage: str) -> int:
    with session_scope() as s:
        return int(s.scalars(select(col(Storage.used_bytes)).where(col(Storage.name) == storage)).one())


@pytest.mark.parametrize("dst", ["warm", "cold"])
def test_a_copy_batch_lands_the_items_bytes_and_marks_them_ready(
    estate: Estate, tmp_path: Path, dst: str
) -> None:
    ingest_payloads("hot", {n: payload(n) for n in NAMES}, staging=tmp_path / "staging")
    result = apply_copy_batch(copy_batch(NAMES, "hot", dst))
    assert (result.done, result.failed, result.bytes) == (3, 0, 3 * 3000), result.errors
    for name in NAMES:
        assert estate.read(dst, name) == payload(name)
        assert estate.read("hot", name) == payload(name)  # the source is only read
        assert states_of(name) == sorted([("hot", "READY"), (dst, "READY")])
        assert event_kinds(name)[-1] == "replica.created"
    assert transfer_states() == ["DONE"] * 3
    assert used_bytes(dst) == 3 * 3000


def test_the_same_batch_applied_twice_copies_nothing_twice(estate: Estate, tmp_path: Path) -> None:
    ingest_payloads("hot", {n: payload(n) for n in NAMES}, staging=tmp_path / "staging")
    batch = copy_batch(NAMES, "hot", "cold")
    assert apply_copy_batch(batch).done == 3
    again = apply_copy_batch(batch)
    assert (again.done, again.skipped) == (0, 3)
    for name in NAMES:
        assert states_of(name) == [("cold", "READY"), ("hot", "READY")]
    assert transfer_states() == ["DONE"] * 3
    assert used_bytes("cold") == 3 * 3000


@pytest.mark.parametrize("dst", ["warm", "cold"])
def test_a_source_that_no_longer_holds_the_items_bytes_leaves_no_copy(
    estate: Estate, tmp_path: Path, dst: str
) -> None:
    """Bit rot on the source (same size): what lands is not the item's, so it is removed again,
    the claim is gone and the transfer FAILED; the other files of the batch land."""
    ingest_payloads("hot", {n: payload(n) for n in NAMES}, staging=tmp_path / "staging")
    estate.flip_byte("hot", "c.dat")
    result = apply_copy_batch(copy_batch(NAMES, "hot", dst))
    assert (result.done, result.failed) == (2, 1)
    assert "checksum mismatch" in result.errors["c.dat"]
    assert estate.read(dst, "c.dat") is None
    assert states_of("c.dat") == [("hot", "READY")]
    assert event_kinds("c.dat")[-1] == "transfer.failed"
    for name in NAMES[:2]:
        assert estate.read(dst, name) == payload(name)
    assert transfer_states() == ["DONE", "DONE", "FAILED"]
    assert used_bytes(dst) == 2 * 3000


@pytest.mark.parametrize("dst", ["warm", "cold"])
def test_a_copy_over_other_bytes_at_the_destination_fails_and_leaves_them(
    estate: Estate, tmp_path: Path, dst: str
) -> None:
    """Someone else's file already at the destination path: never written over."""
    ingest_payloads("hot", {n: payload(n) for n in NAMES}, staging=tmp_path / "staging")
    theirs = b"someone else's file, same name, not DLM's" * 10
    estate.write(dst, "run1/a.dat", theirs)
    result = apply_copy_batch(copy_batch(NAMES, "hot", dst))
    assert (result.done, result.failed) == (2, 1)
    assert estate.read(dst, "run1/a.dat") == theirs
    assert states_of("run1/a.dat") == [("hot", "READY")]
    assert estate.read(dst, "run1/b.dat") == payload("run1/b.dat")
