"""`dlm storage set`: capacity, tier and state of a storage in one command, through the same
input model and core operation as `PATCH /api/storages/{name}` (tests/api/test_admin.py)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlmodel import col

from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Event
from lifecycle.catalogue.storages import get_storage
from lifecycle.states import StorageState, Tier
from lifecycle.storage import identity
from tests.factories import posix_storage


def _storage(name: str) -> tuple[str, str, int | None]:
    with session_scope() as s:
        st = get_storage(name, session=s)
        return str(st.state), str(st.tier), st.capacity_bytes


def _events(name: str) -> list[tuple[str, str, dict[str, Any]]]:
    with session_scope() as s:
        sid = get_storage(name, session=s).id
        rows = s.scalars(select(Event).where(col(Event.storage_id) == sid).order_by(col(Event.id))).all()
        return [(str(e.kind), e.actor, e.details) for e in rows]


def test_storage_set_changes_capacity_tier_and_state(dlm, db_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with session_scope() as s:
        posix_storage(s, "disk-a", tmp_path / "a")

    r = dlm("storage", "set", "disk-a", "--capacity", "10GiB", "--tier", "COLD")
    assert r.code == 0, r.err
    assert "tier cold" in r.out and "10.0 GiB" in r.out
    assert _storage("disk-a") == ("online", "cold", 10 * 1024**3)
    assert _events("disk-a")[-1] == (
        "storage.changed",
        "tester",
        {
            "name": "disk-a",
            "tier": {"from": "hot", "to": "cold"},
            "capacity_bytes": {"from": None, "to": 10 * 1024**3},
        },
    )

    assert dlm("storage", "set", "disk-a", "--draining").code == 0
    assert _storage("disk-a")[0] == StorageState.DRAINING
    assert dlm("storage", "set", "disk-a", "--no-draining").code == 0
    assert _storage("disk-a")[0] == StorageState.ONLINE
    assert dlm("storage", "set", "disk-a", "--offline").code == 0
    assert _storage("disk-a")[0] == StorageState.OFFLINE
    # --no-draining leaves a storage that is not draining as it is
    n = len(_events("disk-a"))
    assert dlm("storage", "set", "disk-a", "--no-draining").code == 0
    assert _storage("disk-a")[0] == StorageState.OFFLINE and len(_events("disk-a")) == n
    r = dlm("storage", "set", "disk-a", "--online", "--capacity", "none", "--json")
    assert r.code == 0, r.err
    assert '"capacity_bytes": null' in r.out
    assert _storage("disk-a") == ("online", "cold", None)
    kinds = [k for k, _, _ in _events("disk-a")]
    assert kinds == [
        "storage.added",
        "storage.changed",
        "storage.draining",
        "storage.online",
        "storage.offline",
        "storage.changed",
        "storage.online",
    ]
    assert all(actor == "tester" for _, actor, _ in _events("disk-a")[1:])


def test_bad_input_changes_nothing(dlm, db_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with session_scope() as s:
        posix_storage(s, "disk-a", tmp_path / "a", tier=Tier.WARM, capacity_bytes=5000)
    before = (_storage("disk-a"), _events("disk-a"))
    for args, message in [
        (("--tier", "cold", "--capacity", "-1GiB"), "invalid size '-1GiB'"),
        (("--tier", "cold", "--offline", "--draining"), "--draining and --offline contradict"),
        (("--tier", "lukewarm", "--capacity", "1GiB"), "invalid tier 'lukewarm'"),
        ((), "nothing to change"),
    ]:
        r = dlm("storage", "set", "disk-a", *args)
        assert r.code == 2, (args, r.err)
        assert r.err.startswith("dlm: error: ") and r.err.count("\n") == 1 and message in r.err, r.err
        assert (_storage("disk-a"), _events("disk-a")) == before


def test_set_online_marks_an_empty_unmarked_root_as_storage_online_does(  # type: ignore[no-untyped-def]
    dlm, db_url: str, tmp_path: Path
) -> None:
    """An unmounted volume's mount point (empty, no marker) is refused by every batch; bringing
    the storage online by `set --online` is the operator's explicit word, as `storage online`."""
    root = tmp_path / "warm"
    with session_scope() as s:
        posix_storage(s, "warm", root)
        posix_storage(s, "cold", tmp_path / "cold")
    (root / identity.MARKER).unlink()
    assert dlm("storage", "set", "warm", "--offline").code == 0
    assert not (root / identity.MARKER).exists()  # taking it offline marks nothing
    assert dlm("storage", "set", "warm", "--online", "--tier", "warm").code == 0
    assert (root / identity.MARKER).is_file()
    with session_scope() as s:
        warm = get_storage("warm", session=s)
        s.expunge(warm)
    assert identity.refusal(warm) is None

    # a root holding another storage's marker is refused, and the tier given with it too
    cold = tmp_path / "cold"
    (cold / identity.MARKER).write_bytes(identity.marker_bytes(uuid.uuid4(), "elsewhere"))
    assert dlm("storage", "set", "cold", "--offline").code == 0
    before = (_storage("cold"), _events("cold"))
    r = dlm("storage", "set", "cold", "--online", "--tier", "archive")
    assert r.code != 0 and "holds the marker of another storage" in r.err, r.err
    assert (_storage("cold"), _events("cold")) == before
