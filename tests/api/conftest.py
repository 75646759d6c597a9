"""The REST API served by a real uvicorn on a free loopback port, in a thread of the test process,
on the test's catalogue (DLM_DATABASE_URL); and tokens for three principals."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.tokens import TokenCreate, create_token


@dataclass
class Api:
    base: str  # http://127.0.0.1:PORT/api

    def client(self, token: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=30)


@dataclass
class Tokens:
    alice: str
    bob: str
    admin: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def api(db_url: str) -> Iterator[Api]:
    """`dlm api`'s app on uvicorn, stopped (and its thread joined) after the test."""
    import uvicorn

    from api.app import create_app

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="dlm-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the API server did not start", pytrace=False)
        time.sleep(0.05)
    yield Api(f"http://127.0.0.1:{port}/api")
    server.should_exit = True
    thread.join(timeout=20)
    assert not thread.is_alive(), "the API server did not stop"


@pytest.fixture
def tokens(db_url: str) -> Tokens:
    """Tokens of two owners and an admin, created through the core."""
    with session_scope() as s:
        made = {
            who: create_token(TokenCreate(owner=who, admin=who == "root"), session=s).secret
            for who in ("alice", "bob", "root")
        }
    return Tokens(alice=made["alice"], bob=made["bob"], admin=made["root"])
