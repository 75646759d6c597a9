"""Uploads and downloads through the REST API, against a real SeaweedFS S3 server: the bytes a
client PUTs with the presigned URL are checked before the item is READY, and read back."""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from devrig.seaweed import SeaweedServer
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.inputs import ItemOptions
from lifecycle.catalogue.models import Event, Item, Replica
from lifecycle.catalogue.storages import get_storage
from lifecycle.states import ItemState, ReplicaState
from lifecycle.storage.backends import backend_for
from lifecycle.storage.s3 import S3Storage
from tests.api.conftest import Api, Tokens
from tests.api.test_access import assert_one_line_error
from tests.factories import posix_storage, s3_storage

pytestmark = pytest.mark.s3


@pytest.fixture
def bucket_storage(db_url: str, s3_env: SeaweedServer, s3_bucket: str) -> str:
    with session_scope() as s:
        s3_storage(s, "objects", server=s3_env, bucket=s3_bucket)
    return "objects"


def stored_bytes(storage: str, path: str) -> bytes:
    with session_scope() as s:
        backend = backend_for(get_storage(storage, session=s))
    with backend.open(path) as f:
        return f.read()


def test_presigned_upload_then_presigned_download_returns_the_same_bytes(
    api: Api, tokens: Tokens, bucket_storage: str
) -> None:
    payload = os.urandom(300_000)
    body = {
        "name": "runs/r1/frame.fits",
        "size": len(payload),
        "checksum": hashlib.md5(payload).hexdigest(),
        "storage": bucket_storage,
        "phase": "liquid",
        "lifetime": "30d",
        "metadata": {"kind": "raw"},
    }
    with api.client(tokens.alice) as alice, httpx.Client(timeout=30) as plain:
        started = alice.post("/items", json=body)
        assert started.status_code == 201, started.text
        item = started.json()["item"]
        oid = item["oid"]
        assert (item["state"], item["owner"], item["target_phase"]) == ("INITIALISED", "alice", "LIQUID")
        assert item["metadata"] == {"kind": "raw"} and item["expires_at"] is not None
        # not READY, not downloadable, before the bytes are there
        assert alice.get("/items", params={"where": "state = 'READY'"}).json()["items"] == []
        assert "nothing uploaded" in assert_one_line_error(alice.post(f"/items/{oid}/ready"), 409)

        url, headers = started.json()["upload_url"], started.json()["headers"]
        # half of the 1 h after which recovery would take the copy for a dead upload's
        assert started.json()["expires_in"] == 1800
        assert headers == {"Content-MD5": base64.b64encode(hashlib.md5(payload).digest()).decode()}
        # the URL is signed for the declared MD5: S3 refuses a PUT without it, or other bytes
        assert plain.put(url, content=payload).status_code == 403
        assert plain.put(url, content=payload[::-1], headers=headers).status_code == 400
        assert "nothing uploaded" in assert_one_line_error(alice.post(f"/items/{oid}/ready"), 409)
        put = plain.put(url, content=payload, headers=headers)  # straight to S3, no token
        assert put.status_code == 200, put.text
        ready = alice.post(f"/items/{oid}/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["state"] == "READY"
        assert alice.post(f"/items/{oid}/ready").json()["state"] == "READY"  # again: no change

        [copy] = alice.get(f"/items/{oid}/replicas").json()
        assert (copy["storage"], copy["state"]) == (bucket_storage, "READY")
        assert stored_bytes(bucket_storage, copy["path"]) == payload

        # the URL is still valid, but cannot replace the READY item's bytes: not with other
        # bytes of the declared size (another MD5), nor with another size
        assert plain.put(url, content=os.urandom(len(payload)), headers=headers).status_code == 400
        assert plain.put(url, content=b"other bytes", headers=headers).status_code == 403
        assert stored_bytes(bucket_storage, copy["path"]) == payload

        link = alice.get(f"/items/{oid}/download-url", params={"expires": "10m"}).json()
        assert link["presigned"] is True and link["expires_in"] == 600
        got = plain.get(link["url"])
        assert got.status_code == 200 and got.content == payload

        events = alice.get(f"/items/{oid}/events").json()["events"]
    assert [e["kind"] for e in events] == ["item.registered", "replica.created", "item.ready"]
    assert {e["actor"] for e in events} == {"alice"}  # the token's owner, not the server's user
    assert events[-1]["details"]["checksum"] == f"md5:{body['checksum']}"
    with session_scope() as s:
        assert s.get_one(Item, uuid.UUID(oid)).state == ItemState.READY
        assert get_storage(bucket_storage, session=s).used_bytes == len(payload)


@pytest.mark.parametrize("wrong", ["checksum", "size"])
def test_an_upload_that_differs_from_what_was_declared_is_refused_and_nothing_is_ready(
    api: Api, tokens: Tokens, bucket_storage: str, wrong: str
) -> None:
    payload = b"the bytes that really arrive\n" * 100
    declared = payload if wrong == "size" else payload.replace(b"really", b"REALLY")
    body = {
        "name": f"bad/{wrong}.dat",
        "size": len(payload) + (1 if wrong == "size" else 0),
        "checksum": hashlib.md5(declared).hexdigest(),
        "storage": bucket_storage,
    }
    with api.client(tokens.bob) as bob, httpx.Client(timeout=30) as plain:
        started = bob.post("/items", json=body).json()
        oid = started["item"]["oid"]
        url, headers = started["upload_url"], started["headers"]
        put = plain.put(url, content=payload, headers=headers)
        # S3 refuses through the URL another size than declared (the URL is signed for it) and
        # other bytes than the declared MD5; bytes that reach the object another way (a client
        # with its own S3 keys) are caught when ready is called
        assert put.status_code == (403 if wrong == "size" else 400)
        with session_scope() as s:
            backend = backend_for(get_storage(bucket_storage, session=s))
        assert isinstance(backend, S3Storage)
        backend.client().put_object(Bucket=backend.bucket, Key=f"bad/{wrong}.dat", Body=payload)
        msg = assert_one_line_error(bob.post(f"/items/{oid}/ready"), 409)
        assert ("MD5" if wrong == "checksum" else "bytes") in msg and "INITIALISED" in msg
        assert bob.get(f"/items/{oid}").json()["state"] == "INITIALISED"
        assert_one_line_error(bob.get(f"/items/{oid}/download-url"), 409)
        assert bob.get("/items", params={"where": "state = 'READY'"}).json()["items"] == []
    with session_scope() as s:
        reps = s.scalars(select(Replica)).all()
        assert [r.state for r in reps] == [ReplicaState.PENDING]
        assert [e.kind for e in s.scalars(select(Event).where(Event.item_oid.is_not(None))).all()] == [  # type: ignore[union-attr]
            "item.registered"
        ]
        assert get_storage(bucket_storage, session=s).used_bytes == 0


def test_upload_requests_are_checked_by_the_core_models(
    api: Api, tokens: Tokens, bucket_storage: str
) -> None:
    good = {
        "name": "x/ok.dat",
        "size": 3,
        "checksum": hashlib.md5(b"abc").hexdigest(),
        "storage": bucket_storage,
    }
    with api.client(tokens.alice) as alice:
        for change, words in [
            ({"name": "../escape"}, "name"),
            ({"size": -1}, "size"),
            ({"checksum": "xyz"}, "checksum"),
            ({"checksum": None}, "checksum"),
            ({"phase": "PLASMOID"}, "phase"),
            ({"lifetime": "forever"}, "lifetime"),
            ({"colour": "red"}, "colour"),
            ({"owner": "bob"}, "owner"),
        ]:
            msg = assert_one_line_error(alice.post("/items", json={**good, **change}), 400)
            assert words in msg, (change, msg)
        assert "unknown storage" in assert_one_line_error(
            alice.post("/items", json={**good, "storage": "no"}), 404
        )
        assert alice.get("/items").json()["items"] == []
    with api.client(tokens.admin) as admin:  # an admin may upload for another owner
        made = admin.post("/items", json={**good, "owner": "bob"})
        assert made.status_code == 201 and made.json()["item"]["owner"] == "bob"


def test_a_posix_only_item_streams_through_the_api(api: Api, tokens: Tokens, tmp_path: Path) -> None:
    from lifecycle.catalogue.ingest import ingest, plan_ingest

    payload = os.urandom(70_000)
    (tmp_path / "vol").mkdir()
    (tmp_path / "vol" / "cal.bin").write_bytes(payload)
    with session_scope() as s:
        st = posix_storage(s, "disk", tmp_path / "vol")
        sources = plan_ingest(session=s, storage=st, paths=["cal.bin"], upload=False)
        [item] = ingest(session=s, storage=st, sources=sources, options=ItemOptions(owner="alice"))
    with api.client(tokens.alice) as alice, api.client(tokens.bob) as bob:
        link = alice.get(f"/items/{item.oid}/download-url").json()
        assert link["presigned"] is False and link["storage"] == "disk"
        assert httpx.get(link["url"], timeout=30).status_code == 401  # the link needs the token
        got = alice.get(link["url"])
        assert got.status_code == 200 and got.content == payload
        assert_one_line_error(bob.get(link["url"]), 404)


@pytest.mark.rclone
def test_an_upload_recovery_settled_is_still_checked_and_made_ready_once(
    api: Api, tokens: Tokens, bucket_storage: str, rclone_path: str
) -> None:
    """A pipeline run's recovery may settle a stale PENDING upload before the client calls
    ready: the item then still becomes READY, its bytes counted once on the storage."""
    from datetime import timedelta

    from lifecycle.integrity.recovery import settle_in_flight

    payload = os.urandom(5000)
    body = {
        "name": "late/upload.bin",
        "size": len(payload),
        "checksum": hashlib.md5(payload).hexdigest(),
        "storage": bucket_storage,
    }
    with api.client(tokens.alice) as alice:
        started = alice.post("/items", json=body).json()
        put = httpx.put(started["upload_url"], content=payload, headers=started["headers"], timeout=30)
        assert put.status_code == 200
        with session_scope() as s:
            assert settle_in_flight(s, stale_after=timedelta(0)).completed == 1
        assert alice.get(f"/items/{started['item']['oid']}").json()["state"] == "INITIALISED"
        ready = alice.post(f"/items/{started['item']['oid']}/ready")
        assert ready.status_code == 200 and ready.json()["state"] == "READY"
        [copy] = alice.get(f"/items/{started['item']['oid']}/replicas").json()
        assert copy["state"] == "READY" and stored_bytes(bucket_storage, copy["path"]) == payload
    with session_scope() as s:
        assert get_storage(bucket_storage, session=s).used_bytes == len(payload)


def test_concurrent_uploads_of_one_name_get_distinct_versions_or_a_conflict(
    api: Api, tokens: Tokens, bucket_storage: str
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    body = {"name": "same/name.dat", "size": 1, "checksum": hashlib.md5(b"x").hexdigest()}

    def post(_: int) -> httpx.Response:
        with api.client(tokens.alice) as alice:
            return alice.post("/items", json={**body, "storage": bucket_storage})

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(post, range(4)))
    assert {a.status_code for a in answers} <= {201, 409}, [a.text for a in answers]
    made = [a.json()["item"] for a in answers if a.status_code == 201]
    assert made and len({m["version"] for m in made}) == len(made)
    for a in answers:
        if a.status_code == 409:
            assert_one_line_error(a, 409)
