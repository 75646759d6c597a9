"""Uploads nobody finished: real presigned uploads started through the API, aged in the
catalogue past DLM_UPLOAD__TIMEOUT, then a real `dlm run expire` (a subprocess). What is on
S3 afterwards is read back: partial or wrong bytes are gone, complete bytes are kept (and the
item finished), a fresh upload and a bulk-listed file awaiting its checksum are untouched."""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError
from sqlalchemy import select, update
from sqlmodel import col

from devrig.seaweed import SeaweedServer
from lifecycle.catalogue.bulk import register_from_list
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Event, Item, Replica, utcnow
from lifecycle.catalogue.storages import get_storage
from tests.api.conftest import Api, Tokens
from tests.api.test_access import assert_one_line_error
from tests.dlm_process import run_dlm
from tests.factories import s3_storage

pytestmark = [pytest.mark.prefect, pytest.mark.s3, pytest.mark.rclone]


def _object(server: SeaweedServer, bucket: str, key: str) -> bytes | None:
    try:
        body = server.client().get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    with body:
        return bytes(body.read())


def _state(oid: str) -> tuple[str, list[str]]:
    with session_scope() as s:
        item = s.get_one(Item, uuid.UUID(oid))
        reps = s.scalars(select(Replica).where(col(Replica.item_oid) == item.oid)).all()
        return str(item.state), [str(r.state) for r in reps]


def _events(oid: str) -> list[tuple[str, str, dict[str, Any]]]:
    with session_scope() as s:
        rows = s.scalars(select(Event).where(col(Event.item_oid) == uuid.UUID(oid)).order_by(col(Event.id)))
        return [(str(e.kind), e.actor, dict(e.details)) for e in rows]


def test_unfinished_uploads_are_aborted_or_finished_by_an_expire_run(
    api: Api,
    tokens: Tokens,
    tmp_path: Path,
    s3_env: SeaweedServer,
    s3_bucket: str,
    flows_env: None,
) -> None:
    with session_scope() as s:
        s3_storage(s, "objects", server=s3_env, bucket=s3_bucket)
    data = {name: f"{name} bytes\n".encode() * 500 for name in ("never", "partial", "complete", "fresh")}
    started: dict[str, dict[str, Any]] = {}
    with api.client(tokens.alice) as alice, httpx.Client(timeout=30) as plain:
        for name, payload in data.items():
            body = {
                "name": f"up/{name}.dat",
                "size": len(payload),
                "checksum": hashlib.md5(payload).hexdigest(),
                "storage": "objects",
            }
            made = alice.post("/items", json=body)
            assert made.status_code == 201, made.text
            started[name] = made.json()
        # complete: the declared bytes through the URL, but `ready` is never called
        done = plain.put(
            started["complete"]["upload_url"],
            content=data["complete"],
            headers=started["complete"]["headers"],
        )
        assert done.status_code == 200, done.text
        # partial / fresh: other bytes reach the object (a PUT cut short, a client's own keys:
        # the URL itself refuses them), and `ready` refuses them
        for name in ("partial", "fresh"):
            s3_env.client().put_object(Bucket=s3_bucket, Key=f"up/{name}.dat", Body=data[name][:1000])
            oid = started[name]["item"]["oid"]
            assert "1000 bytes" in assert_one_line_error(alice.post(f"/items/{oid}/ready"), 409)
    # a file listed without a checksum: INITIALISED too, but the user's, waiting for verify
    s3_env.client().put_object(Bucket=s3_bucket, Key="listed/f.dat", Body=b"listed" * 100)
    listing = tmp_path / "list.jsonl"
    listing.write_text('{"name": "listed/f.dat", "size": 600}\n')
    with session_scope() as s:
        register_from_list(s, storage=get_storage("objects", session=s), source=listing)
    # age everything but the fresh upload past the timeout (2h here)
    oids = {name: started[name]["item"]["oid"] for name in started}
    old = utcnow() - timedelta(hours=3)
    with session_scope() as s:
        s.execute(
            update(Item)
            .where(col(Item.oid) != uuid.UUID(oids["fresh"]))
            .values(created_at=old, updated_at=old)
        )

    run = run_dlm("run", "expire", "--json", env={"DLM_UPLOAD__TIMEOUT": "2h"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    assert report["uploads"] == {"aborted": 2, "finished": 1, "removed": 1, "left": 0, "errors": {}}

    # the bytes on S3
    assert _object(s3_env, s3_bucket, "up/never.dat") is None
    assert _object(s3_env, s3_bucket, "up/partial.dat") is None  # the wrong bytes are gone
    assert _object(s3_env, s3_bucket, "up/complete.dat") == data["complete"]
    assert _object(s3_env, s3_bucket, "up/fresh.dat") == data["fresh"][:1000]  # not yet timed out
    assert _object(s3_env, s3_bucket, "listed/f.dat") == b"listed" * 100
    # the catalogue
    assert _state(oids["never"]) == ("DELETED", ["DELETED"])
    assert _state(oids["partial"]) == ("DELETED", ["DELETED"])
    assert _state(oids["complete"]) == ("READY", ["READY"])
    assert _state(oids["fresh"]) == ("INITIALISED", ["PENDING"])
    with session_scope() as s:
        listed = s.scalars(select(Item).where(col(Item.name) == "listed/f.dat")).one()
        assert listed.state == "INITIALISED"
        # the finished upload and the listed file count; nothing of the aborted ones
        assert get_storage("objects", session=s).used_bytes == len(data["complete"]) + 600
    kinds = [k for k, _, _ in _events(oids["partial"])]
    assert kinds == ["item.registered", "item.upload_aborted", "replica.deleted"]
    [(_, actor, aborted)] = [e for e in _events(oids["partial"]) if e[0] == "item.upload_aborted"]
    assert actor.startswith("flow:expire")
    assert aborted["reason"] == "upload not finished within 2h"
    assert aborted["found"] == ["objects:up/partial.dat: other bytes than declared (removed)"]
    assert [d["found"] for k, _, d in _events(oids["never"]) if k == "item.upload_aborted"] == [
        ["objects:up/never.dat: nothing uploaded"]
    ]
    assert [k for k, _, _ in _events(oids["complete"])] == [
        "item.registered",
        "replica.created",
        "item.ready",
    ]

    with api.client(tokens.alice) as alice:
        # an aborted upload cannot be finished any more; the finished one downloads
        assert "no upload pending" in assert_one_line_error(
            alice.post(f"/items/{oids['partial']}/ready"), 409
        )
        link = alice.get(f"/items/{oids['complete']}/download-url").json()
        with httpx.Client(timeout=30) as plain:
            assert plain.get(link["url"]).content == data["complete"]

    # a second run finds nothing more to do
    again = run_dlm("run", "expire", "--json", env={"DLM_UPLOAD__TIMEOUT": "2h"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["uploads"]["aborted"] == 0
    assert _object(s3_env, s3_bucket, "up/complete.dat") == data["complete"]
