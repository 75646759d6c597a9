"""A Prefect server, DLM's deployments on a process work pool, and `prefect worker` processes.

For tests/workers and bench/: `prefect server start` on a free loopback port with its own
PREFECT_HOME (and optionally its state in a PostgreSQL database), `prefect work-pool create`,
`prefect deploy --all` from prefect.yaml, and workers started with DLM's environment. Every
process runs in its own process group and is stopped by it.
"""

from __future__ import annotations

import contextlib
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

REPO = Path(__file__).resolve().parents[1]
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
    settings: dict[str, str] = field(default_factory=dict)  # more PREFECT_* for the server
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
        env.update(self.settings)
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
        """The workers that ran this flow run: those that submitted it and were not told to
        abort (both workers may try; the server lets one set it PENDING)."""
        return [
            n
            for n in self.procs
            if f"submitting flow run '{run_id}'" in (log := self.log(n))
            and f"Aborted submission of flow run '{run_id}'" not in log
        ]

    def stop(self) -> None:
        for proc in self.procs.values():
            stop_group(proc)
        self.procs.clear()


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
