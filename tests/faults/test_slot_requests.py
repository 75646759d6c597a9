"""A storage-slot request the Prefect server cannot answer at once (503: Prefect on SQLite answers
a slot request that way when another write commits under it) is tried again within a fraction
of a second, not after the 2 s Prefect's own client waits; a server that keeps answering 503
makes the batch fail as transient (retried), and any other error is not retried.

The server here is a stand-in that answers each request with the next status of a script, so
the test can make the server busy on demand; against the real server see tests/workers/test_slots.py.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from lifecycle.errors import TransientError
from tasks import slots


class _Scripted(ThreadingHTTPServer):
    def __init__(self, statuses: list[int]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.statuses = statuses  # the answer to each POST in turn; the last one repeats
        self.posts: list[tuple[str, dict[str, object]]] = []


class _Handler(BaseHTTPRequestHandler):
    server: _Scripted

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # the client's version check
        self._answer(200, "3.9.1") if self.path.endswith("/admin/version") else self._answer(404, {})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.server.posts.append((self.path, body))
        status = self.server.statuses.pop(0) if len(self.server.statuses) > 1 else self.server.statuses[0]
        if status == 503:
            self._answer(503, {"exception_message": "Service Unavailable"})
        elif status == 200:
            limit = {"id": str(uuid.uuid4()), "name": body["names"][0], "limit": 1}
            self._answer(200, {"lease_id": str(uuid.uuid4()), "limits": [limit]})
        elif status == 204:
            self.send_response(204)
            self.end_headers()
        else:
            self._answer(status, {"detail": "refused"})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[_Scripted]:
    server = _Scripted([200])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api"
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield server
    finally:
        server.shutdown()
        server.server_close()


def test_a_busy_answer_is_retried_at_once_and_the_slot_is_granted(scripted: _Scripted) -> None:
    scripted.statuses[:] = [503, 503, 200]
    started = time.monotonic()
    acquired = slots.acquire_slots(["storage:hot"], wait_s=30, lease_s=60)
    took = time.monotonic() - started
    assert [limit.name for limit in acquired.limits] == ["storage:hot"]
    paths = [path for path, _ in scripted.posts]
    assert paths == ["/api/v2/concurrency_limits/increment-with-lease"] * 3
    assert scripted.posts[-1][1] == {
        "names": ["storage:hot"],
        "slots": 1,
        "mode": "concurrency",
        "lease_duration": 60,
    }
    # Prefect's own client would have waited 2 s before each retry
    assert took < 1.5, f"two busy answers cost {took:.1f}s"


def test_a_release_the_server_is_too_busy_for_is_retried(scripted: _Scripted) -> None:
    scripted.statuses[:] = [503, 502, 204]  # 502: a proxy in front of a restarting server
    lease = uuid.uuid4()
    slots.release_slots(lease)
    assert (
        scripted.posts == [("/api/v2/concurrency_limits/decrement-with-lease", {"lease_id": str(lease)})] * 3
    )


def test_a_server_busy_for_too_long_fails_the_request_as_transient(
    scripted: _Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted.statuses[:] = [503]
    monkeypatch.setattr(slots, "RETRY_FOR_S", 0.5)
    with pytest.raises(
        TransientError, match=r"answered 503 for 0.5s: could not request a slot of storage:hot"
    ):
        slots.acquire_slots(["storage:hot"], wait_s=30, lease_s=60)
    assert len(scripted.posts) >= 3  # it did try again meanwhile


def test_other_errors_are_not_retried(scripted: _Scripted) -> None:
    scripted.statuses[:] = [422]
    with pytest.raises(httpx.HTTPStatusError):
        slots.acquire_slots(["storage:hot"], wait_s=30, lease_s=60)
    assert len(scripted.posts) == 1
