"""Checkout at the core (lifecycle.apply.checkout): the best intact copy of each item lands in
the user's directory, verified against the catalogue, and never over a file of the user's."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifecycle.apply.checkout import best_sources, checkout
from lifecycle.catalogue.catalog import get_item
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.storages import set_storage_state
from lifecycle.errors import InvalidValueError
from lifecycle.states import StorageState
from tests.factories import Estate, event_kinds, ingest_payloads, on_hot_and, payload

pytestmark = [pytest.mark.s3, pytest.mark.rclone]

NAMES = ("run1/a.dat", "b.dat")
MINE = b"the user's own work, not DLM's"


def check_out(names: tuple[str, ...], dest: Path) -> tuple[int, dict[str, str]]:
    """Check NAMES out to DEST: (files landed, failures)."""
    with session_scope() as s:
        report = checkout(s, [get_item(n, session=s) for n in names], str(dest))
    return report.files, report.failed


def test_the_best_copy_lands_verified_and_an_offline_storage_is_not_used(
    estate: Estate, tmp_path: Path
) -> None:
    on_hot_and("cold", NAMES, staging=tmp_path / "staging")
    with session_scope() as s:
        first = best_sources(s, [get_item(n, session=s) for n in NAMES])
        assert {src.storage.name for src in first} == {"hot"}  # the fastest tier first
        set_storage_state("hot", StorageState.OFFLINE, session=s)
    assert check_out(NAMES, tmp_path / "out") == (2, {})  # from S3
    for name in NAMES:
        assert (tmp_path / "out" / name).read_bytes() == payload(name)
        assert event_kinds(name)[-1] == "item.checked_out"


def test_a_users_different_file_is_never_replaced(estate: Estate, tmp_path: Path) -> None:
    """The same bytes count as checked out; other bytes stay and the item is reported. Also
    for a later version, whose copy lives under another path and is renamed on landing."""
    ingest_payloads("hot", {n: payload(n) for n in NAMES}, staging=tmp_path / "staging")
    ingest_payloads("hot", {"b.dat": payload("b.dat v2")}, staging=tmp_path / "staging2")  # b.dat~v2
    out = tmp_path / "out"
    (out / "run1").mkdir(parents=True)
    (out / "run1" / "a.dat").write_bytes(MINE)
    (out / "b.dat").write_bytes(MINE)
    files, failed = check_out(NAMES, out)
    assert files == 0 and sorted(failed) == ["b.dat", "run1/a.dat"]
    assert all("already exists" in why for why in failed.values()), failed
    assert (out / "run1" / "a.dat").read_bytes() == MINE
    assert (out / "b.dat").read_bytes() == MINE
    (out / "b.dat").write_bytes(payload("b.dat v2"))  # the item's own bytes: checked out
    (out / "run1" / "a.dat").unlink()
    assert check_out(NAMES, out) == (2, {})
    assert (out / "run1" / "a.dat").read_bytes() == payload("run1/a.dat")
    assert sorted(p.name for p in out.iterdir()) == ["b.dat", "run1"]  # no staging left behind


def test_a_copy_whose_bytes_rotted_is_removed_from_the_destination(estate: Estate, tmp_path: Path) -> None:
    ingest_payloads("hot", {n: payload(n) for n in NAMES}, staging=tmp_path / "staging")
    estate.flip_byte("hot", "b.dat")
    files, failed = check_out(NAMES, tmp_path / "out")
    assert files == 1 and "checksum mismatch" in failed["b.dat"]
    assert not (tmp_path / "out" / "b.dat").exists()
    assert (tmp_path / "out" / "run1" / "a.dat").read_bytes() == payload("run1/a.dat")


def test_a_destination_inside_a_storage_root_is_refused(estate: Estate, tmp_path: Path) -> None:
    ingest_payloads("hot", {n: payload(n) for n in NAMES}, staging=tmp_path / "staging")
    before = sorted(p.relative_to(estate.root) for p in estate.root.rglob("*"))
    with pytest.raises(InvalidValueError, match="root of storage 'warm'"):
        check_out(NAMES, estate.root / "warm" / "checkout")
    assert sorted(p.relative_to(estate.root) for p in estate.root.rglob("*")) == before
