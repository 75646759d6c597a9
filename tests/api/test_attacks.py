"""Hostile requests found by attacking the API: each is refused with one 4xx line and
changes nothing, or is scoped to the token's owner."""

from __future__ import annotations

import hashlib

import pytest
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
