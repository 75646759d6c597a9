"""Real Prefect servers for the deployment tests, each on a free port (never 4200), stopped by pid.

`prefect_server`: one server per test module (devrig.prefect_server.PrefectServer).
`dlm_env`: the environment of `dlm` subprocesses on a DLM home of their own; whatever Prefect
server that home started is stopped (by its pid file) when the test ends.
`served`: `dlm serve --no-server` against `prefect_server`, once its deployments are registered.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.server import ServerError, alive, server_files, stop_pid
from devrig.prefect_server import PrefectServer
from lifecycle.runs import Pipeline

DLM = [sys.executable, "-m", "dlm.cli"]
STARTUP_TIMEOUT_S = 120.0
# every pipeline of the registry under its own name, and replicate once more on the ready event
SERVED = {f"{p}/{p}" for p in Pipeline} | {"replicate/replicate-on-ready"}


def api(url: str, path: str, body: dict[str, Any] | None = None, method: str = "POST") -> Any:
    """One call of a Prefect REST API (POST with a JSON body by default)."""
    data = json.dumps(body or {}).encode() if method != "GET" else None
    req = urllib.request.Request(
        f"{url.rstrip('/')}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=15) as resp:
        return json.load(resp)


def poll(
    what: str, check: Callable[[], Any], timeout: float, log: Path | None = None, every: float = 0.5
) -> Any:
    """check() until it returns something true; fail with the end of `log` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(every)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log and log.exists() else ""
    pytest.fail(f"{what}: not within {timeout:.0f}s\n{tail}")


def deployment_names(url: str) -> set[str]:
    flows = {f["id"]: f["name"] for f in api(url, "/flows/filter")}
    return {f"{flows[d['flow_id']]}/{d['name']}" for d in api(url, "/deployments/filter")}


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real Prefect server on a free port for this module. Prefect is a dependency: a server
    that does not start is a failure, never a skip."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-server"))
    try:
        server.start(STARTUP_TIMEOUT_S)
    except ServerError as exc:
        pytest.fail(f"the Prefect server did not start: {exc}", pytrace=False)
    yield server
    pid = server.pid
    assert server.stop(), f"the Prefect server (pid {pid}) did not stop"


def _stop_home_server(home: Path) -> None:
    pid_text = server_files(home).pid.read_text().strip() if server_files(home).pid.exists() else ""
    if pid_text.isdigit():
        stop_pid(int(pid_text))


@pytest.fixture
def dlm_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of `dlm` subprocesses: a DLM home on SQLite, no PREFECT_API_URL, the
    clients' Prefect state away from ~/.prefect. Stops the home's Prefect server afterwards."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "PREFECT_"))}
    env.update(
        DLM_HOME=str(home),
        DLM_OWNER="tester",
        COLUMNS="250",
        PREFECT_HOME=str(tmp_path / "client-prefect"),
    )
    yield env
    _stop_home_server(home)


def run(
    env: dict[str, str], *args: str, check: bool = True, timeout: float = 180, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `dlm ARGS` (or, with args starting "prefect", Prefect's CLI) to completion."""
    argv = [sys.executable, "-m", *(["prefect", *args[1:]] if args[0] == "prefect" else ["dlm.cli", *args])]
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False)
    if check:
        assert res.returncode == 0, f"{' '.join(args)}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def start_serve(env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [*DLM, "serve", *extra],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its flow runs share its group: one kill reaches all
        )


def stop_serve(proc: subprocess.Popen[bytes], timeout: float = 60) -> int | None:
    """SIGTERM `dlm serve` (a clean stop), then kill its group; returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    code = proc.returncode
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    return code


@pytest.fixture(scope="module")
def served(
    prefect_server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """`dlm serve --no-server` on `prefect_server` with two posix storages (a, b) on a SQLite
    catalogue; yields its environment, home and log once all its deployments are registered."""
    base = tmp_path_factory.mktemp("served")
    home = base / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "PREFECT_"))}
    env.update(
        DLM_HOME=str(home),
        DLM_OWNER="tester",
        COLUMNS="250",
        PREFECT_HOME=str(base / "client-prefect"),
        **prefect_server.client_env(),
    )
    for name in ("a", "b"):
        (base / name).mkdir()
        run(env, "storage", "add", name, "--kind", "posix", "--root", str(base / name))
    log = base / "serve.log"
    proc = start_serve(env, log, "--no-server")
    try:
        poll(
            "dlm serve's deployments",
            lambda: deployment_names(prefect_server.url) >= SERVED,
            STARTUP_TIMEOUT_S,
            log,
        )
        yield {"env": env, "home": home, "base": base, "log": log, "proc": proc}
    finally:
        stop_serve(proc)
        assert not alive(proc.pid)
