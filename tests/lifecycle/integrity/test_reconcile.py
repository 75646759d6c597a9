"""Reconcile at the core (lifecycle.integrity.reconcile): a storage's listing against the
catalogue. Unknown objects are reported and adopted only when asked; a copy gone is LOST, one
of another size CORRUPTED; a dry run and DLM's temporary files change nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifecycle.catalogue.catalog import get_item
from lifecycle.catalogue.db import session_scope
from lifecycle.errors import ItemNotFoundError
from lifecycle.integrity.reconcile import reconcile_storage
from tests.factories import Estate, copies_of, md5, on_hot_and, payload, states_of

pytestmark = [pytest.mark.s3, pytest.mark.rclone]

NAMES = ("kept.dat", "gone.dat", "short.dat")
FOUND = "new/found.dat"
TEMP = "run1/.dlm-tmp-otherhost-12-abc"


def is_item(name: str) -> bool:
    with session_scope() as s:
        try:
            get_item(name, session=s)
        except ItemNotFoundError:
            return False
    return True


@pytest.mark.parametrize("storage", ["warm", "cold"])
def test_unknown_objects_are_reported_and_adopted_only_when_asked(
    estate: Estate, tmp_path: Path, storage: str
) -> None:
    on_hot_and(storage, NAMES, staging=tmp_path / "staging")
    estate.write(storage, FOUND, payload(FOUND, 1234))
    estate.write(storage, TEMP, b"half an upload")
    estate.remove(storage, "gone.dat")
    estate.write(storage, "short.dat", payload("short.dat")[:100])

    dry = reconcile_storage(storage, dry_run=True, adopt=True)
    assert (dry.unknown, dry.adopted, dry.ignored, dry.missing, dry.resized) == (1, 0, 1, 1, 1)
    assert [o.path for o in dry.unknown_objects] == [FOUND]
    assert [o.path for o in dry.temporary_objects] == [TEMP]
    assert states_of("gone.dat") == states_of("short.dat") == sorted([("hot", "READY"), (storage, "READY")])
    assert not is_item(FOUND)

    seen = reconcile_storage(storage)
    assert (seen.unknown, seen.adopted, seen.lost, seen.corrupted, seen.matched) == (1, 0, 1, 1, 1)
    assert states_of("gone.dat") == sorted([("hot", "READY"), (storage, "LOST")])
    assert states_of("short.dat") == sorted([("hot", "READY"), (storage, "CORRUPTED")])
    assert sorted(seen.damaged) == sorted(
        c.uid for n in ("gone.dat", "short.dat") for c in copies_of(n) if c.storage == storage
    )
    assert not is_item(FOUND)

    adopted = reconcile_storage(storage, adopt=True)
    assert (adopted.unknown, adopted.adopted, adopted.lost, adopted.corrupted) == (1, 1, 0, 0)
    with session_scope() as s:
        item = get_item(FOUND, session=s)
        assert (item.state, item.size, item.checksum) == ("READY", 1234, md5(payload(FOUND, 1234)))
    assert states_of(FOUND) == [(storage, "READY")]
    assert not is_item(TEMP)  # DLM's temporary files are never adopted, nor removed here
    assert estate.read(storage, TEMP) == b"half an upload"
    assert estate.read(storage, FOUND) == payload(FOUND, 1234)
    assert estate.read(storage, "short.dat") == payload("short.dat")[:100]  # reconcile only lists


def test_an_object_whose_name_is_not_an_item_name_is_reported_not_adopted(estate: Estate) -> None:
    estate.write("cold", "bad@name.dat", b"x" * 10)
    result = reconcile_storage("cold", adopt=True)
    assert (result.unknown, result.adopted) == (1, 0)
    [found] = result.unknown_objects
    assert found.path == "bad@name.dat" and found.note.startswith("not adoptable")
    assert estate.read("cold", "bad@name.dat") == b"x" * 10
