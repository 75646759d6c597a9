"""Check before delete at its root (lifecycle.apply.confirm): what one storage really holds
of the copies a deletion relies on, found by one listing and, where the storage keeps no
hash, by re-reading the bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lifecycle.apply.confirm import confirm_copies, same_files
from lifecycle.apply.settle import Check
from lifecycle.catalogue.catalog import get_item
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.storages import get_storage
from lifecycle.errors import StorageError
from lifecycle.states import ReplicaState
from tests.factories import Estate, copy_on, on_hot_and, payload, rot_and_lose

pytestmark = [pytest.mark.s3, pytest.mark.rclone]

NAMES = ("intact.dat", "gone.dat", "rotten.dat", "short.dat")


def checks(names: tuple[str, ...], storage: str) -> list[Check]:
    """The READY copies of NAMES on STORAGE as the pre-delete check reads them."""
    rows = [copy_on(name, storage) for name in names]
    with session_scope() as s:
        items = [get_item(name, session=s) for name in names]
    return [
        Check(
            r.uid, r.item_oid, r.storage_id, r.path, i.size, i.checksum or "", i.checksum_algo or "", r.state
        )
        for r, i in zip(rows, items, strict=True)
    ]


@pytest.mark.parametrize(("storage", "read"), [("warm", 3000 * 2), ("cold", 0)])
def test_each_copy_is_found_intact_lost_or_corrupted(
    estate: Estate, tmp_path: Path, storage: str, read: int
) -> None:
    """Posix copies are hashed from their bytes (the intact one and the rotten one: 6000
    bytes); S3 is judged by the MD5 it stores, reading nothing."""
    rot_and_lose(estate, storage, NAMES, staging=tmp_path / "staging")
    estate.write(storage, "short.dat", payload("short.dat")[:-1])
    with session_scope() as s:
        st = get_storage(storage, session=s)
    found = confirm_copies(st, checks(NAMES, storage))
    assert [c.path for c in found.intact] == ["intact.dat"]
    assert {ch.check.path: ch.to for ch in found.changes} == {
        "gone.dat": ReplicaState.LOST,
        "rotten.dat": ReplicaState.CORRUPTED,
        "short.dat": ReplicaState.CORRUPTED,
    }
    assert {ch.check.path: ch.details.get("found_size") for ch in found.changes}["short.dat"] == 2999
    assert found.bytes_read == read and not found.unread


def test_an_unmounted_root_confirms_nothing(estate: Estate, tmp_path: Path) -> None:
    on_hot_and("warm", ["intact.dat"], staging=tmp_path / "staging")
    survivors = checks(("intact.dat",), "warm")
    (estate.root / "warm").rename(estate.root / "elsewhere")
    with session_scope() as s:
        st = get_storage("warm", session=s)
    with pytest.raises(StorageError):
        confirm_copies(st, survivors)


def test_a_hard_link_into_another_root_is_not_a_second_copy(estate: Estate, tmp_path: Path) -> None:
    """The 'copy' on warm is the same inode as the one to delete on hot: it does not count."""
    on_hot_and("warm", ["intact.dat"], staging=tmp_path / "staging")
    [survivor] = checks(("intact.dat",), "warm")
    os.unlink(estate.root / "warm" / "intact.dat")
    os.link(estate.root / "hot" / "intact.dat", estate.root / "warm" / "intact.dat")
    with session_scope() as s:
        hot, warm = get_storage("hot", session=s), get_storage("warm", session=s)
    twins = same_files(hot, {survivor.item_oid: "intact.dat"}, {warm.id: warm}, {warm.id: [survivor]})
    assert list(twins) == [survivor.replica_uid]
    assert "same file" in twins[survivor.replica_uid]
    # a real second copy (its own inode) counts
    os.unlink(estate.root / "warm" / "intact.dat")
    estate.write("warm", "intact.dat", payload("intact.dat"))
    assert same_files(hot, {survivor.item_oid: "intact.dat"}, {warm.id: warm}, {warm.id: [survivor]}) == {}
