"""Hostile requests found by attacking the API: each is refused with one 4xx line and
changes nothing, or is scoped to the token's owner."""

from __future__ import annotations

import base64
import hashlib
import json
import threading

import httpx
import pytest
from botocore.exceptions import ClientError
from sqlalchemy import func, select

from devrig.seaweed import SeaweedServer
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Dataset, Item
from tests.api.conftest import Api, Tokens
from tests.api.test_access import assert_one_line_error
from tests.factories import s3_storage


def _count(model: type) -> int:
    with session_scope() as s:
        return int(s.execute(select(func.count()).select_from(model)).one()[0])


@pytest.mark.s3
def test_an_owner_cannot_upload_an_item_without_owner(
    api: Api, tokens: Tokens, s3_env: SeaweedServer, s3_bucket: str
) -> None:
    # "owner": null from a non-admin token registered an item nobody but an admin could see
    with session_scope() as s:
        s3_storage(s, "objects", server=s3_env, bucket=s3_bucket)
    md5 = hashlib.md5(b"hello").hexdigest()
    body = {"name": "mine.dat", "size": 5, "checksum": md5, "storage": "objects"}
    with api.client(tokens.alice) as alice:
        made = alice.post("/items", json={**body, "owner": None})
        assert made.status_code == 201, made.text
        assert made.json()["item"]["owner"] == "alice"
        listed = alice.get("/items").json()["items"]
        assert [(i["name"], i["owner"]) for i in listed] == [("mine.dat", "alice")]
    with session_scope() as s:
        assert [o for (o,) in s.execute(select(Item.owner))] == ["alice"]


@pytest.mark.parametrize(
    ("where", "description", "field"),
    [
        ("size > 1", "a\\u0000b", "description"),
        ("size > 1", "\\ud800", "description"),
    ],
)
def test_dataset_text_the_catalogue_cannot_store_is_refused(
    api: Api, tokens: Tokens, where: str, description: str, field: str
) -> None:
    # a NUL (JSON \\u0000) in the description was a 500 on PostgreSQL, a lone surrogate on both
    with api.client(tokens.alice) as alice:
        body = f'{{"name": "d", "where": "{where}", "description": "{description}"}}'
        answer = alice.post("/datasets", content=body.encode(), headers={"content-type": "application/json"})
        assert f"invalid {field}" in assert_one_line_error(answer, 400)
    assert _count(Dataset) == 0


def test_names_the_catalogue_cannot_hold_are_not_found_not_a_500(api: Api, tokens: Tokens) -> None:
    # on PostgreSQL a NUL (or a lone surrogate) in a name looked up, or in a crafted cursor,
    # was a 500: no such dataset or storage can exist, and the cursor is not one we gave
    cursors = [
        base64.urlsafe_b64encode(json.dumps([text, 1]).encode()).decode() for text in ("a\x00", "\ud800")
    ]
    with api.client(tokens.alice) as alice, api.client(tokens.admin) as admin:
        for cursor in cursors:
            assert "invalid cursor" in assert_one_line_error(
                alice.get("/items", params={"cursor": cursor}), 400
            )
            page = alice.get("/datasets/raw/items", params={"cursor": cursor})
            assert_one_line_error(page, 404)  # no dataset raw
        assert "unknown dataset" in assert_one_line_error(alice.get("/datasets/a%00b/items"), 404)
        assert "unknown dataset" in assert_one_line_error(alice.delete("/datasets/a%00b"), 404)
        change = admin.patch("/storages/a%00b", json={"tier": "cold"})
        assert "unknown storage" in assert_one_line_error(change, 404)
        upload = {"name": "x", "size": 1, "checksum": "0" * 32, "storage": "a\x00b"}
        assert "unknown storage" in assert_one_line_error(alice.post("/items", json=upload), 404)
    assert _count(Item) == 0


@pytest.mark.s3
def test_an_upload_url_takes_only_the_declared_size(
    api: Api, tokens: Tokens, s3_env: SeaweedServer, s3_bucket: str
) -> None:
    # The URL was signed for the MD5 only: a client could declare 1000 times the size of its
    # bytes (with their MD5), PUT them, and recovery or the expire run finished the upload
    # READY at the declared size (the storage's used bytes inflated by the lie, a download's
    # Content-Length wrong).
    with session_scope() as s:
        s3_storage(s, "objects", server=s3_env, bucket=s3_bucket)
    payload = b"tiny bytes\n" * 10
    body = {
        "name": "lie.dat",
        "size": len(payload) * 1000,
        "checksum": hashlib.md5(payload).hexdigest(),
        "storage": "objects",
    }
    with api.client(tokens.alice) as alice, httpx.Client(timeout=30) as plain:
        made = alice.post("/items", json=body)
        assert made.status_code == 201, made.text
        put = plain.put(made.json()["upload_url"], content=payload, headers=made.json()["headers"])
        assert put.status_code == 403, put.text
        # the honest PUT of the same bytes, for an honest declaration, goes through
        honest = alice.post("/items", json={**body, "name": "true.dat", "size": len(payload)})
        assert honest.status_code == 201, honest.text
        ok = plain.put(honest.json()["upload_url"], content=payload, headers=honest.json()["headers"])
        assert ok.status_code == 200, ok.text
    with pytest.raises(ClientError):
        s3_env.client().head_object(Bucket=s3_bucket, Key="lie.dat")
    stored = s3_env.client().get_object(Bucket=s3_bucket, Key="true.dat")["Body"].read()
    assert stored == payload


@pytest.mark.s3
def test_an_owner_cannot_add_a_version_to_another_owners_item(
    api: Api, tokens: Tokens, s3_env: SeaweedServer, s3_bucket: str
) -> None:
    # Names are global: alice's upload of bob's item name became its newest version, which
    # every reference by name (dlm items show/checkout NAME, the latest version) then meant:
    # another owner's bytes in place of bob's, and bob's item's existence told to alice.
    with session_scope() as s:
        s3_storage(s, "objects", server=s3_env, bucket=s3_bucket)
    payload = b"bob's table\n"
    body = {"size": len(payload), "checksum": hashlib.md5(payload).hexdigest(), "storage": "objects"}
    with api.client(tokens.alice) as alice, api.client(tokens.bob) as bob, api.client(tokens.admin) as admin:
        assert bob.post("/items", json={**body, "name": "shared/table.csv"}).status_code == 201
        before = _count(Item)
        taken = alice.post("/items", json={**body, "name": "shared/table.csv"})
        assert "another owner" in assert_one_line_error(taken, 409)
        assert "bob" not in taken.json()["error"]
        assert _count(Item) == before
        # an owner adds versions to its own names; an admin may add one for bob
        second = bob.post("/items", json={**body, "name": "shared/table.csv"})
        assert second.status_code == 201 and second.json()["item"]["version"] == 2
        third = admin.post("/items", json={**body, "name": "shared/table.csv", "owner": "bob"})
        assert third.status_code == 201 and third.json()["item"]["version"] == 3
    with session_scope() as s:
        owners = s.execute(select(Item.version, Item.owner).order_by(Item.version)).all()
    assert [tuple(r) for r in owners] == [(1, "bob"), (2, "bob"), (3, "bob")]


def test_datasets_created_at_the_same_time_under_one_name_are_one_201_and_409s(
    api: Api, tokens: Tokens
) -> None:
    # two requests both found the name free, and the second insert was a 500 (IntegrityError)
    names = [f"d{i}" for i in range(20)]
    codes: dict[str, list[int]] = {n: [] for n in names}
    start = threading.Barrier(4)

    def create() -> None:
        with api.client(tokens.alice) as alice:
            start.wait()
            for name in names:
                answer = alice.post("/datasets", json={"name": name, "where": "size > 1"})
                codes[name].append(answer.status_code)

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {n: sorted(c) for n, c in codes.items()} == {n: [201, 409, 409, 409] for n in names}
    assert _count(Dataset) == len(names)


@pytest.mark.s3
def test_a_download_url_is_never_one_s3_refuses(
    api: Api, tokens: Tokens, s3_env: SeaweedServer, s3_bucket: str
) -> None:
    # expires=30d answered 200 with a URL S3 refuses (a presigned URL lives at most 7 days)
    with session_scope() as s:
        s3_storage(s, "objects", server=s3_env, bucket=s3_bucket)
    payload = b"some bytes"
    body = {"name": "f.dat", "size": len(payload), "checksum": hashlib.md5(payload).hexdigest()}
    with api.client(tokens.alice) as alice, httpx.Client(timeout=30) as plain:
        made = alice.post("/items", json={**body, "storage": "objects"}).json()
        assert plain.put(made["upload_url"], content=payload, headers=made["headers"]).status_code == 200
        oid = made["item"]["oid"]
        assert alice.post(f"/items/{oid}/ready").status_code == 200
        for expires in ("8d", "30d", "2w"):
            answer = alice.get(f"/items/{oid}/download-url", params={"expires": expires})
            assert "at most 7 days" in assert_one_line_error(answer, 400), expires
        link = alice.get(f"/items/{oid}/download-url", params={"expires": "7d"})
        assert link.status_code == 200 and link.json()["expires_in"] == 7 * 86400
        assert plain.get(link.json()["url"]).content == payload
