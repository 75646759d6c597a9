"""An unmounted volume: its mount point is an empty directory without the storage's marker.
Verify, reconcile and copy batches must treat it as unreachable, not as a storage whose copies
all vanished: nothing marked LOST, nothing written onto the bare mount point, and the copies are
all there again once the volume is back. `dlm storage online` is the explicit way to accept an
empty, unmarked root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lifecycle.apply.copy import apply_copy_batch
from lifecycle.catalogue import storages
from lifecycle.catalogue.db import session_scope
from lifecycle.errors import StorageError
from lifecycle.integrity.reconcile import reconcile_storage
from lifecycle.states import StorageState
from lifecycle.storage import identity
from tests.factories import Estate, copy_batch, ingest_payloads, on_hot_and, payload, states_of, verify_copies

pytestmark = [pytest.mark.s3, pytest.mark.rclone]

NAMES = ("u1.dat", "u2.dat")


def unmount(estate: Estate, storage: str) -> Path:
    """Move STORAGE's directory away and leave an empty directory in its place (what an
    unmounted volume's mount point looks like); returns where the volume's files now are."""
    root = estate.root / storage
    away = estate.root / f"{storage}-volume"
    os.rename(root, away)
    root.mkdir()
    return away


def remount(estate: Estate, storage: str, away: Path) -> None:
    root = estate.root / storage
    root.rmdir()  # fails if anything was written onto the bare mount point
    os.rename(away, root)


def test_verify_and_reconcile_mark_nothing_lost_on_an_unmounted_root(estate: Estate, tmp_path: Path) -> None:
    on_hot_and("warm", NAMES, staging=tmp_path / "staging")
    away = unmount(estate, "warm")

    [result] = verify_copies("warm")
    assert (result.lost, result.unreadable) == (0, len(NAMES)), result
    assert any("is empty and has no .dlm-storage marker" in e for e in result.errors.values()), result.errors
    with pytest.raises(StorageError, match="is its volume mounted"):
        reconcile_storage("warm", adopt=False, dry_run=False)
    for name in NAMES:
        assert ("warm", "READY") in states_of(name), states_of(name)
    assert list((estate.root / "warm").iterdir()) == []  # nothing written on the mount point

    remount(estate, "warm", away)
    results = verify_copies("warm")
    assert sum(r.matched for r in results) == len(NAMES)
    for name in NAMES:
        assert estate.read("warm", name) == payload(name)


def test_no_copy_is_written_onto_an_unmounted_root(estate: Estate, tmp_path: Path) -> None:
    on_hot_and("warm", ["kept.dat"], staging=tmp_path / "staging")  # warm holds a copy
    ingest_payloads("hot", {"new.dat": payload("new.dat")}, staging=tmp_path / "staging")
    away = unmount(estate, "warm")

    result = apply_copy_batch(copy_batch(["new.dat"], "hot", "warm"))
    assert result.done == 0 and result.errors, result
    assert "is its volume mounted" in " ".join(result.errors.values())
    assert list((estate.root / "warm").iterdir()) == []
    remount(estate, "warm", away)
    assert estate.read("warm", "new.dat") is None
    assert estate.read("warm", "kept.dat") == payload("kept.dat")


def test_storage_online_accepts_an_empty_unmarked_root_explicitly(estate: Estate) -> None:
    root = estate.root / "warm"
    (root / identity.MARKER).unlink()  # e.g. a storage from before markers, emptied on purpose
    with session_scope() as s:
        warm = storages.get_storage("warm", session=s)
        s.expunge(warm)
    why = identity.refusal(warm)
    assert why is not None and "dlm storage online warm" in why
    with session_scope() as s:
        storages.set_storage_state("warm", StorageState.ONLINE, session=s)
    assert (root / identity.MARKER).is_file()
    assert identity.refusal(warm) is None
