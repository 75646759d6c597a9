"""Typed factories for the tests: storages and the estates the flow tests run on.

One place builds the catalogue's storages for a test, so a change to how a storage is added
is made once, and a test reads `estate.root` rather than an untyped dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlmodel import Session

from devrig.seaweed import SeaweedServer
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Storage, StorageCreate
from lifecycle.catalogue.storages import add_storage
from lifecycle.states import StorageKind, Tier

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
