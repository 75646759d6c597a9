"""A local Prefect server for `dlm serve`: start it, wait until healthy, announce it, stop it.

Imports no Prefect: the server runs as a child process (`prefect server start`), so that
the caller can point PREFECT_API_URL at it before Prefect is first imported.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import FrameType

from flows.events import api_url_file
from lifecycle.errors import ConflictError, DLMError, InvalidValueError

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = 120.0  # a first start migrates a fresh database (~20 s here)
STOP_TIMEOUT_S = 15.0


class ServerError(DLMError):
    """The local Prefect server did not start, or a given server does not answer."""


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers its health check at `api_url` (`http://host:port/api`)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_local_server(
    home: Path, port: int | None = None, timeout: float = STARTUP_TIMEOUT_S
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start `prefect server start` on 127.0.0.1 with its state under `home/prefect`.

    Returns the API URL (`http://127.0.0.1:PORT/api`) and the server process once its health
    check answers; its pid goes to `home/prefect/server.pid` and its log to `server.log`.
    Raises ServerError (with the end of its log) if it exits or does not answer within
    `timeout` seconds; the process is stopped in that case.
    """
    prefect_home = home / "prefect"
    prefect_home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://{HOST}:{port}/api"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    log = prefect_home / "server.log"
    with log.open("ab") as out:
        # A session of its own: a Ctrl-C at the terminal reaches `dlm serve`, which then
        # shuts the runner down while the server still answers, and stops the server last.
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    # For an operator (or a test) to find a server left behind by a `dlm serve` killed hard.
    (prefect_home / "server.pid").write_text(f"{process.pid}\n")
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if process.poll() is not None:
            raise ServerError(
                f"the Prefect server exited with code {process.returncode} (log {log}):\n{_tail(log)}"
            )
        if time.monotonic() > deadline:
            stop_local_server(process)
            raise ServerError(f"the Prefect server did not answer at {url} within {timeout:.0f}s (log {log})")
        time.sleep(0.3)
    return url, process


def stop_local_server(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> int | None:
    """Stop the server's process group: SIGTERM, then SIGKILL after `timeout` seconds.

    Returns the exit code (None if it could not be reaped). Never raises.
    """

    def signal_group(sig: signal.Signals) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)

    if process.poll() is None:
        signal_group(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                process.wait(5)
    # Children of the server (it may run uvicorn in a subprocess) share its group.
    signal_group(signal.SIGKILL)
    return process.returncode


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def _announced(url: str) -> Iterator[str]:
    """Write the API URL where `dlm` commands look for it; SIGTERM stops cleanly; restore on exit."""
    path = api_url_file()
    try:
        previous = path.read_text().strip()
    except OSError:
        previous = ""
    if previous and previous != url and healthy(previous):
        raise ConflictError(f"a `dlm serve` is already running for this DLM home, at {previous}")
    saved_env = os.environ.get("PREFECT_API_URL")
    saved_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    # Started in the background by a script, SIGINT may arrive ignored: make it stop us.
    saved_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(url + "\n")
    os.environ["PREFECT_API_URL"] = url
    try:
        yield url
    finally:
        with suppress(OSError):
            path.unlink()
        signal.signal(signal.SIGTERM, saved_term)
        signal.signal(signal.SIGINT, saved_int)
        if saved_env is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved_env


@contextmanager
def local_server(home: Path, port: int | None = None) -> Iterator[str]:
    """Run a local Prefect server for the duration: yields its API URL, set as PREFECT_API_URL
    (and PREFECT_HOME) for this process and its children, and written to the api-url file.

    Raises ServerError if it does not start, ConflictError if another `dlm serve` runs here.
    """
    prefect_home = str(home / "prefect")
    saved_home = os.environ.get("PREFECT_HOME")
    url, process = start_local_server(home, port)
    try:
        os.environ["PREFECT_HOME"] = prefect_home
        with _announced(url):
            yield url
    finally:
        stop_local_server(process)
        with suppress(OSError):
            (home / "prefect" / "server.pid").unlink()
        if saved_home is None:
            os.environ.pop("PREFECT_HOME", None)
        else:
            os.environ["PREFECT_HOME"] = saved_home


@contextmanager
def existing_server() -> Iterator[str]:
    """Use the Prefect server that PREFECT_API_URL names (for `dlm serve --no-server`).

    Raises InvalidValueError if PREFECT_API_URL is not set, ServerError if it does not answer.
    """
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url:
        raise InvalidValueError("--no-server needs PREFECT_API_URL set to a running Prefect server's API")
    if not healthy(url, timeout=10):
        raise ServerError(f"no Prefect server answers at PREFECT_API_URL={url}")
    with _announced(url):
        yield url
