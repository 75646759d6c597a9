"""Who sees what through the REST API: tokens, owners, admins, pages, and errors as one JSON line."""

from __future__ import annotations

import json
import uuid

import pytest

from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Dataset, Item
from lifecycle.catalogue.tokens import list_tokens, revoke_token
from lifecycle.states import ItemState
from tests.api.conftest import Api, Tokens


def add_items(owner: str, names: list[str]) -> list[uuid.UUID]:
    """READY items of `owner`, registered through the catalogue's tables."""
    with session_scope() as s:
        items = [Item(name=n, size=len(n), owner=owner, state=ItemState.READY) for n in names]
        s.add_all(items)
    return [i.oid for i in items]


def assert_one_line_error(response: object, status: int) -> str:
    import httpx

    assert isinstance(response, httpx.Response)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"]
    assert "\n" not in body["error"] and "Traceback" not in body["error"] and body["error"]
    return str(body["error"])


def test_requests_without_a_valid_token_are_refused(api: Api, tokens: Tokens) -> None:
    add_items("alice", ["a/1"])
    with api.client(None) as anon:
        assert "bearer token" in assert_one_line_error(anon.get("/items"), 401)
        assert anon.get("/items").headers["www-authenticate"] == "Bearer"
    with api.client("dlm_not-a-token") as wrong:
        assert assert_one_line_error(wrong.get("/items"), 401) == "invalid or revoked token"
    with api.client(tokens.alice) as alice:
        assert [i["name"] for i in alice.get("/items").json()["items"]] == ["a/1"]
        with session_scope() as s:
            [row] = [t for t in list_tokens(session=s) if t.owner == "alice"]
            revoke_token(row.id, session=s)
        assert assert_one_line_error(alice.get("/items"), 401) == "invalid or revoked token"
        assert_one_line_error(alice.get("/storages"), 401)


def test_an_owner_sees_only_its_items_and_another_owners_item_is_not_found(api: Api, tokens: Tokens) -> None:
    [mine] = add_items("alice", ["shared/name"])
    [theirs] = add_items("bob", ["bob/secret"])
    missing = uuid.uuid4()
    with api.client(tokens.alice) as alice, api.client(tokens.admin) as admin:
        assert [i["oid"] for i in alice.get("/items").json()["items"]] == [str(mine)]
        assert alice.get(f"/items/{mine}").json()["owner"] == "alice"
        for path in ("", "/replicas", "/events", "/download-url"):
            # the same answer as for an item that does not exist: nothing is learnt about it
            hidden = assert_one_line_error(alice.get(f"/items/{theirs}{path}"), 404)
            absent = assert_one_line_error(alice.get(f"/items/{missing}{path}"), 404)
            assert hidden == absent.replace(str(missing), str(theirs))
        assert_one_line_error(alice.post(f"/items/{theirs}/ready"), 404)
        assert alice.get("/items", params={"where": "owner = 'bob'"}).json()["items"] == []
        # an admin sees every owner's items
        listed = admin.get("/items").json()["items"]
        assert {(i["name"], i["owner"]) for i in listed} == {("shared/name", "alice"), ("bob/secret", "bob")}
        assert admin.get(f"/items/{theirs}").json()["name"] == "bob/secret"


def test_datasets_and_events_are_scoped_to_their_owner(api: Api, tokens: Tokens) -> None:
    add_items("alice", ["raw/a1", "raw/a2"])
    add_items("bob", ["raw/b1"])
    with session_scope() as s:
        s.add(Dataset(name="alice-raw", where="name ~ 'raw/*'", owner="alice"))
        s.add(Dataset(name="bob-raw", where="name ~ 'raw/*'", owner="bob"))
    with api.client(tokens.alice) as alice, api.client(tokens.admin) as admin:
        assert [d["name"] for d in alice.get("/datasets").json()] == ["alice-raw"]
        members = alice.get("/datasets/alice-raw/items").json()["items"]
        assert [m["name"] for m in members] == ["raw/a1", "raw/a2"]
        assert_one_line_error(alice.get("/datasets/bob-raw/items"), 404)
        assert [d["name"] for d in admin.get("/datasets").json()] == ["alice-raw", "bob-raw"]
        assert len(admin.get("/datasets/alice-raw/items").json()["items"]) == 3


def test_pages_return_every_item_exactly_once_across_inserts_between_pages(api: Api, tokens: Tokens) -> None:
    """Listed by oid, page after page, while new items (before the cursor, after it, and new
    versions of items already listed) are added between pages: no item twice, none missed."""
    before = set(map(str, add_items("alice", [f"run/{i:03d}" for i in range(23)])))
    listed: list[str] = []
    cursor = None
    with api.client(tokens.alice) as alice:
        for page in range(50):
            params = {"limit": 5, "where": "name ~ 'run/*'", **({"cursor": cursor} if cursor else {})}
            answer = alice.get("/items", params=params)
            assert answer.status_code == 200, answer.text
            listed += [i["oid"] for i in answer.json()["items"]]
            cursor = answer.json()["next_cursor"]
            add_items(
                "alice", [f"run/{page:03d}a", f"run/zz{page}", f"run/!{page}"]
            )  # before and after the cursor
            with session_scope() as s:  # a second version of an item already listed
                s.add(Item(name="run/000", version=page + 2, size=1, owner="alice", state=ItemState.READY))
            if cursor is None:
                break
    assert cursor is None
    assert len(listed) == len(set(listed))
    assert before <= set(listed)


def test_a_bad_filter_or_cursor_is_a_400_with_one_line(api: Api, tokens: Tokens) -> None:
    with api.client(tokens.alice) as alice:
        msg = assert_one_line_error(alice.get("/items", params={"where": "size >"}), 400)
        assert msg.startswith("invalid filter")
        assert_one_line_error(alice.get("/items", params={"where": "colour = 'red'"}), 400)
        assert "cursor" in assert_one_line_error(alice.get("/items", params={"cursor": "nonsense"}), 400)
        assert "limit" in assert_one_line_error(alice.get("/items", params={"limit": 0}), 422)
        assert "item id" in assert_one_line_error(alice.get("/items/not-a-uuid"), 400)
        assert_one_line_error(
            alice.post("/items", content=b"{", headers={"content-type": "application/json"}), 422
        )


def test_an_unexpected_failure_is_a_generic_500_without_internals(
    api: Api, tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lifecycle.catalogue import access

    def broken(**_: object) -> None:
        raise RuntimeError("password=hunter2 at /srv/internal/path")

    monkeypatch.setattr(access, "datasets", broken)
    with api.client(tokens.alice) as alice:
        answer = alice.get("/datasets")
    msg = assert_one_line_error(answer, 500)
    assert "hunter2" not in answer.text and "internal/path" not in answer.text
    assert msg == "internal error (logged on the server)"


def test_openapi_lists_every_route(api: Api) -> None:
    with api.client(None) as anon:
        spec = anon.get("/openapi.json").json()
        assert anon.get("/docs").status_code == 200
    paths = set(spec["paths"])
    assert {
        "/api/items",
        "/api/items/{oid}",
        "/api/items/{oid}/replicas",
        "/api/items/{oid}/events",
        "/api/items/{oid}/ready",
        "/api/items/{oid}/download-url",
        "/api/storages",
        "/api/datasets",
        "/api/datasets/{name}/items",
        "/api/events",
    } <= paths
    assert json.dumps(spec).count("HTTPBearer") >= 1
