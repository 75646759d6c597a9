"""Changes through the REST API: datasets created and deleted, items changed (phase, expiry,
metadata) and deleted, with the CLI's input models and core operations: the token's owner
is the actor, another owner's item is 404 and stays as it was, bad input is one 4xx line."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlmodel import col

from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Dataset, Event, Item, utcnow
from lifecycle.states import ItemState
from tests.api.conftest import Api, Tokens
from tests.api.test_access import assert_one_line_error
from tests.factories import (
    Estate,
    copies_of,
    ingest_payloads,
    on_hot_and,
    payload,
    posix_storage,
    three_tier_estate,
)


def _item_row(oid: str) -> dict[str, Any]:
    table = Item.__table__  # type: ignore[attr-defined]
    with session_scope() as s:
        row = dict(s.execute(select(table).where(table.c.oid == uuid.UUID(oid))).mappings().one())
        row["events"] = s.execute(
            select(func.count()).select_from(Event).where(col(Event.item_oid) == uuid.UUID(oid))
        ).one()[0]
        return row


def _events(oid: str) -> list[tuple[str, str, dict[str, Any]]]:
    with session_scope() as s:
        rows = s.scalars(select(Event).where(col(Event.item_oid) == uuid.UUID(oid)).order_by(col(Event.id)))
        return [(str(e.kind), e.actor, dict(e.details)) for e in rows]


def test_an_owner_creates_and_deletes_its_datasets(api: Api, tokens: Tokens) -> None:
    with api.client(tokens.alice) as alice, api.client(tokens.bob) as bob, api.client(tokens.admin) as admin:
        made = alice.post("/datasets", json={"name": "raw", "where": "meta.kind = 'raw'", "description": "r"})
        assert made.status_code == 201, made.text
        assert (made.json()["name"], made.json()["owner"]) == ("raw", "alice")
        assert [d["name"] for d in alice.get("/datasets").json()] == ["raw"]
        assert bob.get("/datasets").json() == []
        assert "already exists" in assert_one_line_error(
            alice.post("/datasets", json={"name": "raw", "where": "size > 1"}), 409
        )
        for body, message in [
            ({"name": "bad", "where": "size >"}, "filter"),
            ({"name": "no spaces", "where": "size > 1"}, "dataset name"),
            ({"name": "mine", "where": "size > 1", "owner": "bob"}, "only an admin"),
            ({"name": "mine", "where": "size > 1", "colour": "red"}, "invalid colour"),
        ]:
            assert message in assert_one_line_error(alice.post("/datasets", json=body), 400), body
        assert_one_line_error(alice.post("/datasets", json=["raw"]), 422)
        for_bob = admin.post("/datasets", json={"name": "bobs", "where": "size > 1", "owner": "bob"})
        assert for_bob.status_code == 201 and for_bob.json()["owner"] == "bob"
        # bob's dataset does not exist for alice
        assert_one_line_error(alice.delete("/datasets/bobs"), 404)
        assert bob.delete("/datasets/bobs").status_code == 204
        assert bob.get("/datasets").json() == []
    with session_scope() as s:
        assert [d.name for d in s.scalars(select(Dataset))] == ["raw"]
        events = [
            (e.kind, e.actor, e.details["name"]) for e in s.scalars(select(Event).order_by(col(Event.id)))
        ]
    assert events == [
        ("dataset.created", "alice", "raw"),
        ("dataset.created", "root", "bobs"),
        ("dataset.deleted", "bob", "bobs"),
    ]


def test_an_owner_changes_phase_expiry_and_metadata_of_its_item(
    api: Api, tokens: Tokens, tmp_path: Path
) -> None:
    with session_scope() as s:
        posix_storage(s, "hot", tmp_path / "hot")
    [oid] = [
        str(o) for o in ingest_payloads("hot", {"obs/a.fits": b"a" * 100}, staging=tmp_path / "in").values()
    ]
    with session_scope() as s:
        item = s.get_one(Item, uuid.UUID(oid))
        item.owner, item.meta = "alice", {"kind": "raw", "obs": {"night": 3}}
        s.add(item)
    with api.client(tokens.alice) as alice, api.client(tokens.bob) as bob:
        before = _item_row(oid)
        # another owner's item does not exist for bob, and stays as it was
        assert_one_line_error(bob.patch(f"/items/{oid}", json={"phase": "SOLID"}), 404)
        assert_one_line_error(bob.delete(f"/items/{oid}"), 404)
        for body, status, message in [
            ({}, 400, "nothing to change"),
            ({"phase": "sollid"}, 400, "invalid phase 'sollid'"),  # the CLI's message
            ({"phase": "SOLID", "lifetime": "30d", "expires_at": "2030-01-01"}, 400, "exactly one of"),
            ({"lifetime": "1.5d"}, 400, "invalid lifetime"),
            ({"lifetime": "0d"}, 400, "invalid lifetime"),
            ({"expires_at": "tomorrow"}, 400, "invalid date"),
            ({"never": "yes"}, 400, "invalid never"),
            ({"metadata": {"a b": 1}}, 400, "invalid metadata key 'a b'"),
            ({"metadata": {"obs": 1, "obs.band": "r"}}, 400, "one would replace the other"),
            ({"metadata": {"kind.sub": 1}}, 400, "holds a value"),  # 'kind' is "raw"
            ({"phase": "SOLID", "metadata": ["x"]}, 400, "must be a JSON object"),
            ({"phase": "SOLID", "colour": "red"}, 400, "invalid colour"),
        ]:
            assert message in assert_one_line_error(alice.patch(f"/items/{oid}", json=body), status), body
            assert _item_row(oid) == before, body
        infinite = alice.patch(
            f"/items/{oid}",
            content=b'{"metadata": {"x": 1e999}}',
            headers={"content-type": "application/json"},
        )
        assert "finite" in assert_one_line_error(infinite, 400)
        assert _item_row(oid) == before
        assert_one_line_error(alice.patch("/items/not-a-uuid", json={"phase": "GAS"}), 400)
        assert_one_line_error(alice.patch(f"/items/{uuid.uuid4()}", json={"phase": "GAS"}), 404)

        done = alice.patch(
            f"/items/{oid}", json={"phase": "solid", "lifetime": "90d", "metadata": {"obs.band": "r", "n": 2}}
        )
        assert done.status_code == 200, done.text
        assert done.json()["target_phase"] == "SOLID"
        assert done.json()["metadata"] == {"kind": "raw", "obs": {"night": 3, "band": "r"}, "n": 2}
        # the filter language sees the new metadata
        found = alice.get("/items", params={"where": "meta.obs.band = 'r'"}).json()["items"]
        assert [i["oid"] for i in found] == [oid]
        assert alice.patch(f"/items/{oid}", json={"never": True}).status_code == 200
    row = _item_row(oid)
    assert row["target_phase"] == "SOLID" and row["expires_at"] is None
    changes = [(k, actor, d) for k, actor, d in _events(oid)][-4:]
    assert [(k, actor) for k, actor, _ in changes] == [
        ("item.phase_changed", "alice"),
        ("item.expiry_changed", "alice"),
        ("item.metadata_changed", "alice"),
        ("item.expiry_changed", "alice"),
    ]
    expiry = datetime.fromisoformat(changes[1][2]["to"])
    assert abs(utcnow() + timedelta(days=90) - expiry) < timedelta(minutes=5)
    assert changes[2][2] == {"set": {"obs.band": "r", "n": 2}}


@pytest.mark.s3
@pytest.mark.rclone
def test_an_owner_deletes_its_item_and_every_copy_goes(
    api: Api, tokens: Tokens, tmp_path: Path, s3_env: object, s3_bucket: str
) -> None:
    estate: Estate = three_tier_estate(tmp_path / "st", server=s3_env, bucket=s3_bucket)
    oids = on_hot_and("cold", ["keep.dat", "drop.dat"], staging=tmp_path / "in")
    with session_scope() as s:
        for item in s.scalars(select(Item)):
            item.owner = "alice"
            s.add(item)
    drop, keep = str(oids["drop.dat"]), str(oids["keep.dat"])
    with api.client(tokens.alice) as alice, api.client(tokens.bob) as bob:
        assert_one_line_error(bob.delete(f"/items/{drop}"), 404)
        assert estate.read("hot", "drop.dat") == payload("drop.dat")
        gone = alice.delete(f"/items/{drop}")
        assert gone.status_code == 200, gone.text
        assert (gone.json()["deleted"], gone.json()["failed"]) == (2, 0)
        assert gone.json()["item"]["state"] == "DELETED"
        assert "already deleted" in assert_one_line_error(alice.delete(f"/items/{drop}"), 409)
        assert "DELETED" in assert_one_line_error(alice.patch(f"/items/{drop}", json={"phase": "GAS"}), 409)
    assert estate.read("hot", "drop.dat") is None and estate.read("cold", "drop.dat") is None
    assert estate.read("hot", "keep.dat") == payload("keep.dat")
    assert estate.read("cold", "keep.dat") == payload("keep.dat")
    assert copies_of("drop.dat") == []
    assert _item_row(keep)["state"] == ItemState.READY
    kinds = [(k, actor) for k, actor, _ in _events(drop)][-4:]
    assert kinds == [
        ("item.expired", "alice"),
        ("replica.deleted", "alice"),
        ("replica.deleted", "alice"),
        ("item.deleted", "alice"),
    ]
