"""Fixtures for the tests of DLM on workers: a real Prefect server (its state in PostgreSQL)
with the `dlm-process` pool and DLM's deployments, storages on posix and SeaweedFS, and reading
copies back (devrig/workers.py starts and stops the processes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlmodel import col

from devrig.postgres import fresh_postgres_database, in_ci
from devrig.workers import (
    POOL,
    REPO,
    PrefectServer,
)
from lifecycle.catalogue import ingest as ingesting
from lifecycle.catalogue import storages
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Item, Replica, Storage, Transfer
from lifecycle.states import Phase, ReplicaState, StorageKind, TransferKind
from tests.factories import S3_CREDENTIALS_ENV, Estate, three_tier_estate


def _unavailable(what: str) -> None:
    if in_ci():
        pytest.fail(f"{what} is required in CI but unavailable", pytrace=False)
    pytest.skip(f"{what} unavailable")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real Prefect server for the module, with the work pool and DLM's deployments
    (`prefect work-pool create`, `prefect deploy --all` from prefect.yaml)."""
    try:
        database = fresh_postgres_database("prefect_test")
        url = make_url(database.__enter__()).set(drivername="postgresql+asyncpg")
    except RuntimeError as exc:
        _unavailable(f"PostgreSQL for the Prefect server ({exc})")
        raise
    server = PrefectServer(tmp_path_factory.mktemp("prefect-home"), url.render_as_string(hide_password=False))
    try:
        server.start()
        server.prefect("work-pool", "create", POOL, "--type", "process")
        server.prefect("deploy", "--all", extra={"DLM_CODE_DIR": str(REPO)})
        yield server
    except (RuntimeError, OSError) as exc:
        _unavailable(f"prefect server ({exc})")
    finally:
        server.stop()
        database.__exit__(None, None, None)


@pytest.fixture
def estate(pg_db_url: str, tmp_path: Path, s3_bucket: str, s3_env: object, rclone_path: str) -> Estate:
    """hot and warm posix (site-a), cold S3 (site-b), on a fresh PostgreSQL catalogue."""
    return three_tier_estate(
        tmp_path / "storages", server=s3_env, bucket=s3_bucket, posix_capacity_bytes=10**9
    )


def worker_env(db_url: str, estate: Estate, **settings: str) -> dict[str, str]:
    """What a machine running a DLM worker has: the catalogue, the code, the S3 credentials."""
    s3 = estate.s3
    env = {
        "DLM_DATABASE_URL": db_url,
        "DLM_CODE_DIR": str(REPO),
        "DLM_HOME": str(estate.root / "worker-home"),
        "PYTHONPATH": str(REPO),
        f"{S3_CREDENTIALS_ENV}_ACCESS_KEY_ID": s3.access_key,
        f"{S3_CREDENTIALS_ENV}_SECRET_ACCESS_KEY": s3.secret_key,
    }
    env.update({f"DLM_{k.upper()}": v for k, v in settings.items()})
    return env


# --------------------------------------------------------------------------- catalogue and bytes


def content(prefix: str, i: int, size: int) -> bytes:
    return hashlib.sha256(f"{prefix}{i}".encode()).digest() * (size // 32)


def ingest(
    estate: Estate, n: int, *, phase: Phase = Phase.LIQUID, prefix: str = "obs", size: int = 2048
) -> list[str]:
    """Ingest n new files into 'hot' (uploaded); returns their names."""
    src = estate.root / f"src-{prefix}"
    src.mkdir(parents=True, exist_ok=True)
    names = []
    with session_scope() as s:
        st = storages.get_storage("hot", session=s)
        paths = []
        for i in range(n):
            f = src / f"f{i}.dat"
            f.write_bytes(content(prefix, i, size))
            paths.append(str(f))
            names.append(f"{prefix}/f{i}.dat")
        sources = ingesting.plan_ingest(storage=st, paths=paths, upload=True, session=s)
        for srcobj, name in zip(sources, names, strict=True):
            srcobj.name = name
        ingesting.ingest(storage=st, sources=sources, options=ingesting.IngestOptions(phase=phase), session=s)
    return names


def read_bytes(estate: Estate, storage: Storage, path: str) -> bytes:
    """The bytes of a replica as stored (posix file or S3 object)."""
    if storage.kind == StorageKind.POSIX:
        return (Path(storage.root) / path).read_bytes()
    bucket, _, prefix = storage.root.partition("/")
    key = f"{prefix.rstrip('/')}/{path}" if prefix else path
    body = estate.s3.client().get_object(Bucket=bucket, Key=key)["Body"]
    try:
        return bytes(body.read())
    finally:
        body.close()


@dataclass(frozen=True)
class Copies:
    """Per item name: the storages of its READY replicas, and how many copy transfers it had."""

    ready: dict[str, set[str]]
    copy_transfers: dict[str, int]


def catalogue_copies(estate: Estate, prefix: str, size: int) -> Copies:
    """Every READY replica of the `prefix` items, its bytes checked against what was ingested."""
    ready: dict[str, set[str]] = {}
    transfers: dict[str, int] = {}
    with session_scope() as s:
        rows = s.execute(
            select(Item.name, Storage, Replica.path)
            .join(Replica, col(Replica.item_oid) == col(Item.oid))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(col(Item.name).like(f"{prefix}/%"), col(Replica.state) == ReplicaState.READY.value)
        ).all()
        for name, storage, path in rows:
            i = int(name.rsplit("/f", 1)[1].removesuffix(".dat"))
            assert read_bytes(estate, storage, path) == content(prefix, i, size), f"{name} on {storage.name}"
            ready.setdefault(name, set()).add(storage.name)
        for (name,) in s.execute(
            select(Item.name)
            .join(Transfer, col(Transfer.item_oid) == col(Item.oid))
            .where(col(Item.name).like(f"{prefix}/%"), col(Transfer.kind) == TransferKind.COPY.value)
        ).all():
            transfers[name] = transfers.get(name, 0) + 1
    return Copies(ready, transfers)
