"""Admin routes: changing a storage's state, and the Prometheus metrics."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlmodel import col

from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Event, Item, Replica
from lifecycle.catalogue.storages import get_storage
from lifecycle.states import ItemState, ReplicaState, StorageState
from tests.api.conftest import Api, Tokens
from tests.api.test_access import assert_one_line_error
from tests.factories import posix_storage


def test_an_admin_drains_a_storage_and_an_owner_may_not(api: Api, tokens: Tokens, tmp_path: Path) -> None:
    with session_scope() as s:
        posix_storage(s, "disk-a", tmp_path / "a")
    with api.client(tokens.alice) as alice, api.client(tokens.admin) as admin:
        assert "admin" in assert_one_line_error(
            alice.patch("/storages/disk-a", json={"state": "draining"}), 403
        )
        with session_scope() as s:
            assert get_storage("disk-a", session=s).state == StorageState.ONLINE
        assert "storage state" in assert_one_line_error(
            admin.patch("/storages/disk-a", json={"state": "melted"}), 400
        )
        assert "invalid x" in assert_one_line_error(
            admin.patch("/storages/disk-a", json={"state": "draining", "x": 1}), 400
        )
        assert_one_line_error(admin.patch("/storages/disk-a", json=["draining"]), 422)
        assert_one_line_error(admin.patch("/storages/nope", json={"state": "draining"}), 404)
        done = admin.patch("/storages/disk-a", json={"state": "DRAINING"})
        assert done.status_code == 200, done.text
        assert done.json()["state"] == "draining"
    with session_scope() as s:
        st = get_storage("disk-a", session=s)
        assert st.state == StorageState.DRAINING
        events = s.scalars(select(Event).where(col(Event.storage_id) == st.id)).all()
        [event] = [e for e in events if e.kind == "storage.draining"]
        assert event.actor == "root"


def test_an_admin_changes_tier_and_capacity_as_dlm_storage_set_does(
    api: Api, tokens: Tokens, tmp_path: Path
) -> None:
    with session_scope() as s:
        st = posix_storage(s, "disk-a", tmp_path / "a")
        item = Item(name="m/0", size=100, owner="alice", state=ItemState.READY)
        s.add(item)
        s.add(Replica(item_oid=item.oid, storage_id=st.id, path="m/0", state=ReplicaState.READY))

    def row() -> tuple[str, str, int | None, int]:
        with session_scope() as s:
            st = get_storage("disk-a", session=s)
            n = len(s.scalars(select(Event).where(col(Event.storage_id) == st.id)).all())
            return str(st.state), str(st.tier), st.capacity_bytes, n

    with api.client(tokens.admin) as admin:
        change = {"tier": "cold", "capacity_bytes": "2GiB", "draining": True}
        done = admin.patch("/storages/disk-a", json=change)
        assert done.status_code == 200, done.text
        assert (done.json()["tier"], done.json()["capacity_bytes"], done.json()["state"]) == (
            "cold",
            2 * 1024**3,
            "draining",
        )
        before = row()
        assert before[:3] == ("draining", "cold", 2 * 1024**3)
        # the same refusals, worded as the input model words them, as `dlm storage set`
        for body, status, message in [
            ({}, 400, "nothing to change"),
            ({"capacity_bytes": 0}, 400, "invalid capacity_bytes 0"),
            ({"capacity_bytes": "lots"}, 400, "invalid size 'lots'"),
            ({"tier": "lukewarm"}, 400, "invalid tier 'lukewarm'"),
            ({"online": False, "draining": True}, 400, "contradict"),
            ({"state": "online", "online": True}, 400, "not both"),
            ({"online": "yes"}, 400, "invalid online 'yes'"),
            ({"tier": "hot", "state": "retired"}, 409, "still holds 1 live copies"),
            ({"tier": "hot", "colour": "red"}, 400, "invalid colour"),
        ]:
            assert message in assert_one_line_error(admin.patch("/storages/disk-a", json=body), status)
            assert row() == before, body
        done = admin.patch("/storages/disk-a", json={"capacity_bytes": None, "draining": False})
        assert done.status_code == 200, done.text
    assert row()[:3] == ("online", "cold", None)
    with session_scope() as s:
        sid = get_storage("disk-a", session=s).id
        events = s.scalars(select(Event).where(col(Event.storage_id) == sid).order_by(col(Event.id))).all()
    assert [(e.kind, e.actor) for e in events][1:] == [
        ("storage.changed", "root"),
        ("storage.draining", "root"),
        ("storage.changed", "root"),
        ("storage.online", "root"),
    ]
    assert events[-2].details == {"name": "disk-a", "capacity_bytes": {"from": 2 * 1024**3, "to": None}}


def test_metrics_show_the_catalogue_to_an_admin(api: Api, tokens: Tokens, tmp_path: Path) -> None:
    with session_scope() as s:
        st = posix_storage(s, "disk-a", tmp_path / "a", capacity_bytes=10_000)
        for i in range(3):
            item = Item(name=f"m/{i}", size=100, owner="alice", state=ItemState.READY)
            s.add(item)
            s.add(Replica(item_oid=item.oid, storage_id=st.id, path=f"m/{i}", state=ReplicaState.READY))
        s.add(Item(name="m/new", size=5, owner="bob", state=ItemState.INITIALISED))
    with api.client(tokens.admin) as admin, api.client(tokens.alice) as alice:
        base = api.base.removesuffix("/api")
        assert alice.get(f"{base}/metrics").status_code == 403
        text = admin.get(f"{base}/metrics").text
    lines = set(text.splitlines())
    assert 'dlm_items{state="READY"} 3.0' in lines
    assert 'dlm_items{state="INITIALISED"} 1.0' in lines
    assert 'dlm_storage_capacity_bytes{storage="disk-a"} 10000.0' in lines
    assert 'dlm_storage_copies{storage="disk-a"} 3.0' in lines
    assert "dlm_live_bytes 305.0" in lines
