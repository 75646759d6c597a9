"""Delete batches (lifecycle.apply.delete) at the core: a deletion that relies on another copy
first confirms it on its storage; none removes the last intact copy of a live item. Every test
reads the bytes left on the storages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lifecycle.apply.delete import apply_delete_batch
from lifecycle.planning.pipelines import policy_from
from lifecycle.states import Phase
from tests.factories import Estate, delete_batch, events_of, ingest_payloads, on_hot_and, payload, states_of

pytestmark = [pytest.mark.s3, pytest.mark.rclone]

NAME = "obs/frame.fits"
DATA = payload(NAME)
DAMAGE: dict[str, Callable[[Estate, str, str], None]] = {"LOST": Estate.remove, "CORRUPTED": Estate.flip_byte}


@pytest.mark.parametrize(("survivor", "hashed"), [("warm", 3000), ("cold", 0)])
def test_a_deletion_goes_once_the_surviving_copy_is_confirmed(
    estate: Estate, tmp_path: Path, survivor: str, hashed: int
) -> None:
    """A posix survivor is re-read (its bytes hashed); S3 keeps the MD5, so none is read."""
    on_hot_and(survivor, [NAME], staging=tmp_path / "staging")
    result = apply_delete_batch(delete_batch(NAME, "hot"), policy=policy_from())
    assert (result.done, result.failed, result.skipped) == (1, 0, 0), result.errors
    assert result.read_bytes == hashed
    assert estate.read("hot", NAME) is None
    assert estate.read(survivor, NAME) == DATA
    assert states_of(NAME) == [(survivor, "READY")]
    assert events_of(NAME)[-1][0] == "replica.deleted"


@pytest.mark.parametrize("survivor", ["warm", "cold"])
@pytest.mark.parametrize("found", ["LOST", "CORRUPTED"])
def test_a_deletion_relying_on_a_damaged_copy_is_refused_and_the_file_stays(
    estate: Estate, tmp_path: Path, survivor: str, found: str
) -> None:
    """The survivor vanished (LOST), or holds the same size of other bytes (CORRUPTED: found by
    re-reading a posix file, by S3's stored MD5)."""
    on_hot_and(survivor, [NAME], staging=tmp_path / "staging")
    DAMAGE[found](estate, survivor, NAME)
    result = apply_delete_batch(delete_batch(NAME, "hot"), policy=policy_from())
    assert (result.done, result.skipped) == (0, 1)
    assert "last intact copy" in result.errors[NAME] and f"{survivor} is {found}" in result.errors[NAME]
    assert estate.read("hot", NAME) == DATA
    assert states_of(NAME) == sorted([("hot", "READY"), (survivor, found)])
    assert [kind for kind, _ in events_of(NAME)[-2:]] == [f"replica.{found.lower()}", "policy.refused"]


def test_an_unmounted_survivor_storage_refuses_the_deletion_and_marks_nothing(
    estate: Estate, tmp_path: Path
) -> None:
    on_hot_and("warm", [NAME], staging=tmp_path / "staging")
    (estate.root / "warm").rename(estate.root / "warm-unmounted")
    result = apply_delete_batch(delete_batch(NAME, "hot"), policy=policy_from())
    assert result.done == 0 and "could not be listed" in result.errors[NAME]
    assert estate.read("hot", NAME) == DATA
    assert states_of(NAME) == [("hot", "READY"), ("warm", "READY")]  # not LOST: nothing was seen


def test_a_deletion_that_would_break_the_phase_is_refused(estate: Estate, tmp_path: Path) -> None:
    on_hot_and("cold", [NAME], staging=tmp_path / "staging", phase=Phase.LIQUID)
    result = apply_delete_batch(delete_batch(NAME, "cold"), policy=policy_from())
    assert (result.done, result.skipped) == (0, 1)
    assert estate.read("hot", NAME) == DATA and estate.read("cold", NAME) == DATA
    assert states_of(NAME) == [("cold", "READY"), ("hot", "READY")]
    kind, details = events_of(NAME)[-1]
    assert kind == "policy.refused" and "below its target phase LIQUID" in details["reason"]


def test_the_last_copy_of_a_live_item_is_never_deleted(estate: Estate, tmp_path: Path) -> None:
    ingest_payloads("hot", {NAME: DATA}, staging=tmp_path / "staging")
    result = apply_delete_batch(delete_batch(NAME, "hot"), policy=policy_from())
    assert (result.done, result.skipped) == (0, 1)
    assert estate.read("hot", NAME) == DATA
    assert states_of(NAME) == [("hot", "READY")]
    kind, details = events_of(NAME)[-1]
    assert kind == "policy.refused" and "last intact copy" in details["reason"]


def test_an_expiring_items_last_copy_is_deleted(estate: Estate, tmp_path: Path) -> None:
    ingest_payloads("hot", {NAME: DATA}, staging=tmp_path / "staging")
    result = apply_delete_batch(delete_batch(NAME, "hot", expiring=True), policy=policy_from())
    assert (result.done, result.read_bytes) == (1, 0)  # relies on no other copy: nothing to confirm
    assert estate.read("hot", NAME) is None
    assert states_of(NAME) == []
