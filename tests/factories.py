"""Typed factories for the tests: storages, the estates the flow and core tests run on,
payloads ingested onto them, and what a test reads back (bytes on a storage, copies, events).

One place builds the catalogue's storages for a test, so a change to how a storage is added
is made once, and a test reads `estate.root` rather than an untyped dict.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from sqlalchemy import select
from sqlmodel import Session, col

from devrig.seaweed import SeaweedServer
from lifecycle.apply.copy import apply_copy_batch
from lifecycle.catalogue import ingest as ingesting
from lifecycle.catalogue.catalog import get_item
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Event, Replica, Storage, StorageCreate
from lifecycle.catalogue.storages import add_storage, get_storage
from lifecycle.integrity.verify import VerifyResult, batch_checks, select_checks, verify_batch
from lifecycle.planning.actions import Copy, DeleteReplica
from lifecycle.planning.plan import CopyBatch, DeleteBatch
from lifecycle.states import Phase, ReplicaState, StorageKind, Tier

# The credentials_env of every test S3 storage (tests/conftest.py's s3_env sets DLM_TEST_S3_*).
S3_CREDENTIALS_ENV = "DLM_TEST_S3"


def posix_storage(
    session: Session,
    name: str,
    root: Path,
    *,
    tier: Tier = Tier.HOT,
    location: str = "site-a",
    capacity_bytes: int | None = None,
) -> Storage:
    """A posix storage at `root` (created if absent). Raises what add_storage raises."""
    root.mkdir(parents=True, exist_ok=True)
    return add_storage(
        StorageCreate(
            name=name,
            kind=StorageKind.POSIX,
            root=str(root),
            tier=tier,
            location=location,
            capacity_bytes=capacity_bytes,
        ),
        session=session,
    )


def s3_storage(
    session: Session,
    name: str,
    *,
    server: SeaweedServer,
    bucket: str,
    tier: Tier = Tier.COLD,
    location: str = "site-b",
) -> Storage:
    """An S3 storage on a bucket of the test server. Raises what add_storage raises."""
    return add_storage(
        StorageCreate(
            name=name,
            kind=StorageKind.S3,
            root=bucket,
            endpoint=server.endpoint,
            credentials_env=S3_CREDENTIALS_ENV,
            tier=tier,
            location=location,
        ),
        session=session,
    )


@dataclass(frozen=True)
class Estate:
    """Three storages: 'hot' and 'warm' posix under root (site-a), 'cold' on S3 (site-b)."""

    root: Path
    bucket: str
    s3: SeaweedServer

    def read(self, storage: str, path: str) -> bytes | None:
        """The bytes at PATH on one of the estate's storages, None where nothing is there."""
        if storage != "cold":
            file = self.root / storage / path
            return file.read_bytes() if file.is_file() else None
        try:
            body = self.s3.client().get_object(Bucket=self.bucket, Key=path)["Body"]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        try:
            return bytes(body.read())
        finally:
            body.close()

    def write(self, storage: str, path: str, data: bytes) -> None:
        """Put DATA at PATH behind DLM's back (a user, a failing disk)."""
        if storage == "cold":
            self.s3.client().put_object(Bucket=self.bucket, Key=path, Body=data)
            return
        file = self.root / storage / path
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(data)

    def remove(self, storage: str, path: str) -> None:
        """Delete PATH behind DLM's back."""
        if storage == "cold":
            self.s3.client().delete_object(Bucket=self.bucket, Key=path)
        else:
            (self.root / storage / path).unlink()

    def flip_byte(self, storage: str, path: str, at: int = 1000) -> None:
        """Flip one byte of the copy at PATH: same size, other bytes (bit rot)."""
        data = self.read(storage, path)
        assert data is not None, f"nothing at {storage}:{path}"
        changed = bytearray(data)
        changed[at] ^= 0xFF
        self.write(storage, path, bytes(changed))


def three_tier_estate(
    root: Path, *, server: object, bucket: str, posix_capacity_bytes: int | None = None
) -> Estate:
    """Add hot and warm posix storages under `root` and a cold S3 storage on `bucket`."""
    assert isinstance(server, SeaweedServer)
    with session_scope() as s:
        for name, tier in (("hot", Tier.HOT), ("warm", Tier.WARM)):
            posix_storage(s, name, root / name, tier=tier, capacity_bytes=posix_capacity_bytes)
        s3_storage(s, "cold", server=server, bucket=bucket)
    return Estate(root=root, bucket=bucket, s3=server)


# --------------------------------------------------------------------------- payloads and copies


def payload(name: str, size: int = 3000) -> bytes:
    """The test bytes of item NAME: the same name gives the same bytes, another name others."""
    block = hashlib.sha256(name.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def ingest_payloads(
    storage: str,
    payloads: Mapping[str, bytes],
    *,
    staging: Path,
    phase: Phase = Phase.GAS,
    lifetime: timedelta | None = None,
) -> dict[str, uuid.UUID]:
    """Upload each payload to STORAGE as item NAME in one ingest (as `dlm ingest --upload`
    does); returns name -> item oid. STAGING is a directory outside every storage root."""
    staging.mkdir(parents=True, exist_ok=True)
    files = []
    for name, data in payloads.items():
        file = staging / name.replace("/", "_")
        file.write_bytes(data)
        files.append(str(file))
    with session_scope() as s:
        st = get_storage(storage, session=s)
        sources = ingesting.plan_ingest(storage=st, paths=files, upload=True, session=s)
        for source, name in zip(sources, payloads, strict=True):
            source.name = name
        options = ingesting.IngestOptions(phase=phase, lifetime=lifetime)
        ingesting.ingest(storage=st, sources=sources, options=options, session=s)
        return {name: get_item(name, session=s).oid for name in payloads}


def on_hot_and(
    dst: str, names: Sequence[str], *, staging: Path, phase: Phase = Phase.GAS
) -> dict[str, uuid.UUID]:
    """Items NAMES with their payload() uploaded to 'hot' and copied to DST (one copy batch),
    both copies READY; returns name -> item oid."""
    oids = ingest_payloads("hot", {n: payload(n) for n in names}, staging=staging, phase=phase)
    result = apply_copy_batch(copy_batch(names, "hot", dst))
    assert result.done == len(names), result.errors
    return oids


def rot_and_lose(estate: Estate, storage: str, names: Sequence[str], *, staging: Path) -> None:
    """NAMES on 'hot' and copied to STORAGE; there, behind DLM's back, 'rotten.dat' (one of
    NAMES) gets a flipped byte and 'gone.dat' (another) is removed."""
    on_hot_and(storage, names, staging=staging)
    estate.flip_byte(storage, "rotten.dat")
    estate.remove(storage, "gone.dat")


@dataclass(frozen=True)
class CopyRow:
    """One replica row of an item, as a test reads it back."""

    uid: uuid.UUID
    item_oid: uuid.UUID
    storage: str
    storage_id: uuid.UUID
    path: str
    state: ReplicaState


def copies_of(name: str, *, deleted: bool = False) -> list[CopyRow]:
    """The replica rows of item NAME (newest version), by storage name; DELETED ones only
    with `deleted`."""
    with session_scope() as s:
        oid = get_item(name, session=s).oid
        rows = s.execute(
            select(
                col(Replica.uid),
                col(Replica.storage_id),
                col(Storage.name),
                col(Replica.path),
                col(Replica.state),
            )
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(col(Replica.item_oid) == oid)
        ).all()
    found = [
        CopyRow(uid, oid, sname, sid, path, ReplicaState(state)) for uid, sid, sname, path, state in rows
    ]
    return sorted(
        (c for c in found if deleted or c.state != ReplicaState.DELETED), key=lambda c: (c.storage, c.state)
    )


def states_of(name: str) -> list[tuple[str, str]]:
    """(storage, state) of item NAME's copies that are not DELETED, sorted."""
    return [(c.storage, c.state.value) for c in copies_of(name)]


def copy_on(name: str, storage: str) -> CopyRow:
    """Item NAME's one copy on STORAGE that is not DELETED."""
    [row] = [c for c in copies_of(name) if c.storage == storage]
    return row


def events_of(name: str) -> list[tuple[str, dict[str, Any]]]:
    """(kind, details) of item NAME's audit events, oldest first."""
    with session_scope() as s:
        oid = get_item(name, session=s).oid
        rows = s.scalars(select(Event).where(col(Event.item_oid) == oid).order_by(col(Event.id)))
        return [(e.kind, dict(e.details or {})) for e in rows]


def event_kinds(name: str) -> list[str]:
    """The kinds of item NAME's audit events, oldest first."""
    return [kind for kind, _ in events_of(name)]


def copy_batch(names: Sequence[str], src: str, dst: str) -> CopyBatch:
    """A batch copying items NAMES from their copy on SRC to the same path on DST."""
    with session_scope() as s:
        src_id, dst_id = get_storage(src, session=s).id, get_storage(dst, session=s).id
        sizes = {name: get_item(name, session=s).size for name in names}
    actions = []
    for name in names:
        row = copy_on(name, src)
        actions.append(Copy(row.item_oid, src_id, row.path, dst_id, row.path, sizes[name], "test"))
    return CopyBatch(src_id, dst_id, tuple(actions))


def delete_batch(name: str, storage: str, *, expiring: bool = False) -> DeleteBatch:
    """A batch deleting item NAME's copy on STORAGE (as expired with `expiring`)."""
    row = copy_on(name, storage)
    with session_scope() as s:
        size = get_item(name, session=s).size
    action = DeleteReplica(row.uid, row.item_oid, row.storage_id, row.path, size, "test")
    return DeleteBatch(row.storage_id, (action,), frozenset({row.item_oid} if expiring else ()))


def verify_copies(*storages: str) -> list[VerifyResult]:
    """Re-read every copy (on STORAGES; all when none is named) with verify, one batch per
    storage and algorithm."""
    with session_scope() as s:
        sel = select_checks(s, budget_bytes=10**12, storages=storages or None)
    return [verify_batch(b) for b in batch_checks(sel.checks, max_files=1000, max_bytes=10**12)]


def rot_behind_stored_md5(estate: Estate, bucket: str, key: str, data: bytes) -> None:
    """Rewrite KEY on BUCKET as an object uploaded in parts (5 MiB each, the last shorter; one
    part for less) holding DATA with one byte flipped, whose md5chksum metadata (where rclone
    reads such an object's MD5) still says DATA's MD5: an object that rotted behind a stale
    stored digest."""
    client = estate.s3.client()
    rotten = bytearray(data)
    rotten[len(data) // 2] ^= 0xFF
    meta = {"md5chksum": base64.b64encode(hashlib.md5(data).digest()).decode()}
    upload = client.create_multipart_upload(Bucket=bucket, Key=key, Metadata=meta)["UploadId"]
    cut = 5 * 1024**2
    parts = []
    for n, at in enumerate(range(0, len(rotten), cut), start=1):
        chunk = bytes(rotten[at : at + cut])
        etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=n, Body=chunk)["ETag"]
        parts.append({"ETag": etag, "PartNumber": n})
    done = {"Parts": parts}
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload=done)
