"""A real Prefect server, the `dlm-process` work pool, `prefect deploy --all` and `prefect worker`
processes, for the tests of DLM on workers. Every process is started in its own process group
and stopped by it.

(A small fixture of its own until a shared Prefect server helper lands.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlmodel import col

from devrig.postgres import fresh_postgres_database, in_ci
from lifecycle.catalogue import ingest as ingesting
from lifecycle.catalogue import storages
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Item, Replica, Storage, Transfer
from lifecycle.states import Phase, ReplicaState, StorageKind, TransferKind
from tests.factories import S3_CREDENTIALS_ENV, Estate, three_tier_estate

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")
POOL = "dlm-process"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `grace` seconds."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # children it may have left
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(5)


def base_env() -> dict[str, str]:
    """This environment without DLM_* and PREFECT_* (each process gets what it needs)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "PREFECT_"))}


@dataclass
class PrefectServer:
    """`prefect server start` on a free port with its own PREFECT_HOME, its state in the
    PostgreSQL database `database_url` (SQLite answers `database is locked` to busy workers)."""

    home: Path
    database_url: str | None = None
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        return {
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_URL": self.api,
            "PREFECT_UI_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }

    def start(self, timeout: float = 120) -> None:
        env = {
            **base_env(),
            **self.env(),
            "PREFECT_UI_ENABLED": "false",
            # no cron runs in the middle of a test: the tests start every run themselves
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            # expired slot leases are freed every 2 s (default 15 s)
            "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "2",
        }
        if self.database_url:
            env["PREFECT_API_DATABASE_CONNECTION_URL"] = self.database_url
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / "server.log", "wb") as log:  # the process keeps its own copy
            self.proc = subprocess.Popen(
                [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        tail = (self.home / "server.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"prefect server did not answer within {timeout:.0f}s:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    # ---------------------------------------------------------------- REST helpers

    def get(self, path: str) -> Any:
        r = httpx.get(f"{self.api}{path}", timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body: Any) -> Any:
        r = httpx.post(f"{self.api}{path}", json=body, timeout=30)
        r.raise_for_status()
        return r.json() if r.content else None

    def deployment_id(self, name: str) -> str:
        return str(self.get(f"/deployments/name/{name}")["id"])

    def create_flow_run(self, deployment: str, parameters: dict[str, Any]) -> str:
        run = self.post(
            f"/deployments/{self.deployment_id(deployment)}/create_flow_run", {"parameters": parameters}
        )
        return str(run["id"])

    def flow_runs(self, deployment: str | None = None) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"sort": "EXPECTED_START_TIME_ASC"}
        if deployment:
            body["deployments"] = {"id": {"any_": [self.deployment_id(deployment)]}}
        return list(self.post("/flow_runs/filter", body))

    def wait_run(self, run_id: str, timeout: float = 300) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{run_id}")
            if run["state_type"] in FINAL:
                return dict(run)
            time.sleep(1)
        raise AssertionError(f"flow run {run_id} not finished within {timeout:.0f}s")

    def wait_quiet(self, deployment: str, timeout: float = 300) -> list[dict[str, Any]]:
        """Wait until every run of `deployment` is final; returns them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = self.flow_runs(deployment)
            if runs and all(r["state_type"] in FINAL for r in runs):
                return runs
            time.sleep(1)
        raise AssertionError(f"runs of {deployment} not all finished within {timeout:.0f}s")

    def prefect(
        self, *args: str, cwd: Path = REPO, extra: dict[str, str] | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run Prefect's own CLI against this server; fails the test on error if `check`."""
        env = {**base_env(), **self.env(), **(extra or {})}
        p = subprocess.run(
            [PREFECT, "--no-prompt", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
        )
        if check:
            assert p.returncode == 0, f"prefect {' '.join(args)}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        return p

    def set_limit(self, name: str, limit: int) -> None:
        """What an operator does: `prefect gcl update NAME --limit N` (or create it)."""
        if self.prefect("gcl", "update", name, "--limit", str(limit), check=False).returncode:
            self.prefect("gcl", "create", name, "--limit", str(limit))
        assert self.get(f"/v2/concurrency_limits/{name}")["limit"] == limit


@dataclass
class Workers:
    """`prefect worker start -p dlm-process` processes with DLM's environment."""

    server: PrefectServer
    workdir: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, limit: int | None = None) -> None:
        cmd = [PREFECT, "worker", "start", "--pool", POOL, "--name", name, "--type", "process"]
        if limit:
            cmd += ["--limit", str(limit)]
        with open(self.workdir / f"{name}.log", "wb") as log:  # the process keeps its own copy
            self.procs[name] = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                env={**base_env(), **self.server.env(), **self.env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def ran(self, run_id: str) -> list[str]:
        """The workers whose log names this flow run as submitted."""
        return [n for n in self.procs if run_id in self.log(n)]

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_group(proc)
        self.procs.clear()


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


@contextlib.contextmanager
def running_workers(
    server: PrefectServer,
    workdir: Path,
    env: dict[str, str],
    names: tuple[str, ...] = ("w1", "w2"),
    limit: int | None = None,
) -> Iterator[Workers]:
    """Workers `names`, each running at most `limit` flow runs at once."""
    workdir.mkdir(parents=True, exist_ok=True)
    workers = Workers(server, workdir, env)
    try:
        for name in names:
            workers.start(name, limit)
        yield workers
    finally:
        workers.stop()


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
