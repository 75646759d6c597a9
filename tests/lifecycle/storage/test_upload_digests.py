"""rclone skips the HEAD after each upload only of files it sends in one PUT, and only to an S3
service that refuses a body which is not its Content-MD5 (S3Storage.checks_upload_digests):
then the service itself has checked the bytes it stored against the MD5 rclone took of the
source. SeaweedFS (real) checks; a stand-in service that stores whatever it is sent does not,
and one that refuses the question cannot tell: both keep the HEAD."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from devrig.seaweed import SeaweedServer
from lifecycle.integrity.reconcile import is_temporary
from lifecycle.storage import s3 as s3_module
from lifecycle.storage.backends import copy_needs_read_back
from lifecycle.storage.s3 import DIGEST_CHECK, RCLONE_UPLOAD_CUTOFF, S3Storage

NO_HEAD = "RCLONE_CONFIG_DLM_OBJ_STORE_NO_HEAD"


@pytest.mark.s3
def test_an_s3_service_that_checks_digests_gets_uploads_without_a_head_and_keeps_no_probe(
    s3_env: SeaweedServer, s3_bucket: str
) -> None:
    storage = S3Storage("obj-store", f"{s3_bucket}/runs", endpoint=s3_env.endpoint)
    try:
        assert storage.checks_upload_digests()
        assert dict(storage.upload_target(RCLONE_UPLOAD_CUTOFF - 1).env)[NO_HEAD] == "true"
        assert NO_HEAD not in storage.upload_target(RCLONE_UPLOAD_CUTOFF).env  # uploaded in parts
        assert NO_HEAD not in storage.rclone_target().env  # listings, deletes, sources: unchanged
        # the refused upload left nothing in the bucket
        listed = s3_env.client().list_objects_v2(Bucket=s3_bucket)
        assert [o["Key"] for o in listed.get("Contents", [])] == []
    finally:
        storage.close()


class _StandIn(ThreadingHTTPServer):
    """An S3 service that answers every PUT with `put_status` (200: stored, whatever its
    Content-MD5) and records the requests."""

    def __init__(self, put_status: int | str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.put_status = put_status
        self.requests: list[tuple[str, str]] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _StandIn
    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.requests.append(("PUT", self.path))
        if self.server.put_status == "garbage":
            self.wfile.write(b"this is not HTTP\r\n\r\n")
            self.close_connection = True
        elif self.server.put_status == 200:
            self._reply(200, headers={"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        else:
            error = b"<Error><Code>AccessDenied</Code><Message>not here</Message></Error>"
            self._reply(self.server.put_status, error, {"Content-Type": "application/xml"})

    def do_DELETE(self) -> None:
        self.server.requests.append(("DELETE", self.path))
        self._reply(204)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def stand_in(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Storage]:
    server = _StandIn(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("STANDIN_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("STANDIN_SECRET_ACCESS_KEY", "secret")
    storage = S3Storage("obj-store", "bucket/runs", endpoint=server.endpoint, credentials_env="STANDIN")
    storage.server = server  # type: ignore[attr-defined]
    try:
        yield storage
    finally:
        storage.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("stand_in", [200], indirect=True)
def test_a_service_that_stores_a_body_against_its_digest_keeps_the_head_and_loses_the_probe(
    stand_in: S3Storage,
) -> None:
    server: _StandIn = stand_in.server  # type: ignore[attr-defined]
    assert not stand_in.checks_upload_digests()
    assert NO_HEAD not in stand_in.upload_target(4096).env
    (put, key), (delete, deleted) = server.requests
    assert (put, delete) == ("PUT", "DELETE")
    # a presigned PUT (its payload unsigned, as rclone sends it), stored, then removed
    assert key.startswith(f"/bucket/runs/{DIGEST_CHECK}?") and "X-Amz-Signature=" in key
    assert deleted == f"/bucket/runs/{DIGEST_CHECK}"
    # the answer is kept for the process: no second probe
    assert not stand_in.checks_upload_digests()
    assert len(server.requests) == 2


@pytest.mark.parametrize("stand_in", [403], indirect=True)
def test_a_service_that_refuses_the_question_keeps_the_head_and_is_asked_again_later(
    stand_in: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    server: _StandIn = stand_in.server  # type: ignore[attr-defined]
    assert not stand_in.checks_upload_digests()
    assert NO_HEAD not in stand_in.upload_target(4096).env
    assert not stand_in.checks_upload_digests()
    assert [m for m, _ in server.requests] == ["PUT"]  # "no answer" stands for a while...
    later = time.monotonic() + s3_module.DIGEST_CHECK_RETRY_S + 1
    monkeypatch.setattr(s3_module, "time", SimpleNamespace(monotonic=lambda: later))
    assert not stand_in.checks_upload_digests()
    assert [m for m, _ in server.requests] == ["PUT", "PUT"]  # ...then it is asked again


@pytest.mark.s3
def test_a_probe_left_behind_is_not_listed_nor_taken_for_an_unknown_object(
    s3_env: SeaweedServer, s3_bucket: str
) -> None:
    """A service that stored the probe and then failed to delete it leaves `.dlm-digest-check`
    at the root: DLM's listing skips it and reconcile counts it among temporary objects."""
    storage = S3Storage("obj-store", f"{s3_bucket}/runs", endpoint=s3_env.endpoint)
    try:
        s3_env.client().put_object(Bucket=s3_bucket, Key=f"runs/{DIGEST_CHECK}", Body=b"x")
        s3_env.client().put_object(Bucket=s3_bucket, Key="runs/data.bin", Body=b"y")
        assert [o.path for o in storage.list()] == ["data.bin"]
    finally:
        storage.close()
    assert is_temporary(DIGEST_CHECK) and is_temporary(f"a/{DIGEST_CHECK}")
    assert not is_temporary(f"{DIGEST_CHECK}ed") and not is_temporary(f"x{DIGEST_CHECK}")


@pytest.mark.parametrize("stand_in", ["garbage"], indirect=True)
def test_a_service_that_answers_nonsense_keeps_the_head_and_fails_no_batch(stand_in: S3Storage) -> None:
    assert not stand_in.checks_upload_digests()  # no exception out of the question
    assert NO_HEAD not in stand_in.upload_target(4096).env


@pytest.mark.parametrize(
    ("src", "dst", "size", "read_back"),
    [
        ("posix", "s3", RCLONE_UPLOAD_CUTOFF, False),  # rclone hashed the bytes it read
        ("s3", "posix", RCLONE_UPLOAD_CUTOFF, False),  # rclone hashes the local file it wrote
        ("s3", "s3", RCLONE_UPLOAD_CUTOFF - 1, False),  # one PUT: its Content-MD5 is checked
        ("s3", "s3", RCLONE_UPLOAD_CUTOFF, True),  # in parts: the digest is the source's stored one
        (None, "s3", RCLONE_UPLOAD_CUTOFF, True),  # recovery: the source is not known
        ("s3", "rclone", 10, True),  # a remote of the user's: its part size is not known
        ("posix", "rclone", 10, False),
    ],
)
def test_which_copies_are_read_back(src: str | None, dst: str, size: int, read_back: bool) -> None:
    assert copy_needs_read_back(src, dst, size) is read_back
