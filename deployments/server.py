"""The Prefect server DLM uses: one long-lived server per DLM home, found or started on demand.

Which server a command's flows talk to (`api_url_for`): PREFECT_API_URL if set (in the
environment or the active Prefect profile); else the server a running `dlm serve` announced;
else this DLM home's own server, started in the background the first time it is needed
(detached, in a session of its own) and reused by every later command. Its files live under
`$DLM_HOME/prefect/`: `server.pid`, `server.url`, `server.log`, `server.lock` (held while one
command starts it, so two `dlm run` at once start one server), and its database `prefect.db`.
`dlm server start|stop|status` manage it by hand.

Imports no Prefect: the server runs as a separate process (`prefect server start`), so that
the caller can point PREFECT_API_URL at it before Prefect is first imported.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from flows.events import api_url_file
from lifecycle.errors import ConflictError, DLMError, InvalidValueError

HOST = "127.0.0.1"
DEFAULT_PREFECT_PORT = 4200  # Prefect's own default; on-demand servers take a free port instead
STARTUP_TIMEOUT_S = 120.0  # a first start migrates a fresh database (~20 s here)
STOP_TIMEOUT_S = 15.0
# The server's environment: no anonymous usage reports to Prefect, and its UI asks the API
# at the address it was started on (set from --host/--port unless PREFECT_UI_API_URL is set).
QUIET_SERVER_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
# How long the server keeps an idle connection open: longer than Prefect's clients keep one in
# their pool (25 s). At the server's default, 5 s, a request sent on a connection idle for about
# 5 s can cross the server closing it; Prefect's client then retries it after 2 s.
KEEPALIVE_S = 65


class ServerError(DLMError):
    """The Prefect server did not start, or a given server does not answer."""


# --------------------------------------------------------------------------- small parts


def free_port(host: str = HOST) -> int:
    """A TCP port on `host` that is free right now (never Prefect's default 4200)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port != DEFAULT_PREFECT_PORT:
            return port


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """Whether a Prefect API answers its health check at `api_url` (`http://host:port/api`)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def check_can_listen(host: str, port: int) -> None:
    """Raises InvalidValueError (one line) if a server could not listen on host:port now."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as exc:
        reason = "the port is in use" if getattr(exc, "errno", None) == 98 else (exc.strerror or str(exc))
        raise InvalidValueError(f"cannot start a Prefect server on {host}:{port}: {reason}") from None


def api_url(host: str, port: int) -> str:
    """The API URL a browser or client uses for a server bound to host:port (a wildcard
    address becomes this machine's name)."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/api"


def ui_url(url: str) -> str:
    """The UI's address for an API URL (the UI is served at the API's root)."""
    return url.rstrip("/").removesuffix("/api")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def is_prefect_server(pid: int) -> bool:
    """Whether `pid` is a `prefect server start` process (not a recycled pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return alive(pid)  # no /proc: trust the pid file
    return b"prefect" in b" ".join(argv) and b"server" in argv and b"start" in argv


def server_env(prefect_home: Path, host: str, port: int) -> dict[str, str]:
    """The environment of a server process: its own PREFECT_HOME (its database is there), no
    analytics, no PREFECT_API_URL of the caller, and the UI pointed at host:port."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(QUIET_SERVER_ENV, PREFECT_HOME=str(prefect_home))
    env.setdefault("PREFECT_UI_API_URL", api_url(host, port))
    # Concurrency-slot leases (`storage:NAME`) kept on disk, not in memory: a restarted server
    # still knows, and repossesses, the slots of batches that died with the old one.
    env.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", LEASE_STORAGE)
    env.setdefault("PREFECT_SERVER_API_KEEPALIVE_TIMEOUT", str(KEEPALIVE_S))
    return env


_LAUNCHER = (
    "import subprocess, sys\n"
    "log = open(sys.argv[1], 'ab')\n"
    "p = subprocess.Popen(sys.argv[2:], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,"
    " start_new_session=True)\n"
    "print(p.pid)\n"
)


def spawn_server(prefect_home: Path, host: str, port: int, log: Path) -> int:
    """Start `prefect server start` detached (a session of its own, not our child: it outlives
    the caller) with its output appended to `log`. Returns its pid (also its process group)."""
    prefect_home.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)]
    out = subprocess.run(
        [sys.executable, "-c", _LAUNCHER, str(log), *argv],
        env=server_env(prefect_home, host, port),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        return int(out.stdout.strip())
    except ValueError:
        raise ServerError(f"could not start the Prefect server: {out.stderr.strip()[-500:]}") from None


def wait_healthy(url: str, pid: int, log: Path, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Wait until the server at `url` (process `pid`) answers. Raises ServerError (with the end
    of its log) if it exits or does not answer within `timeout` seconds; it is stopped then."""
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if not alive(pid):
            raise ServerError(f"the Prefect server exited (log {log}):\n{_tail(log)}")
        if time.monotonic() > deadline:
            stop_pid(pid)
            raise ServerError(f"the Prefect server did not answer at {url} within {timeout:.0f}s (log {log})")
        time.sleep(0.2)


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT_S) -> bool:
    """Stop the server's process group: SIGTERM, then SIGKILL after `timeout` seconds.
    Returns whether it is gone. Never raises."""

    def signal_group(sig: signal.Signals) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)

    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    # Children of the server (uvicorn workers, services) share its group.
    signal_group(signal.SIGKILL)
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


# --------------------------------------------------------------------------- the home server


@dataclass(frozen=True)
class ServerFiles:
    """Where a DLM home keeps its Prefect server's state."""

    dir: Path

    @property
    def pid(self) -> Path:
        return self.dir / "server.pid"

    @property
    def url(self) -> Path:
        return self.dir / "server.url"

    @property
    def log(self) -> Path:
        return self.dir / "server.log"

    @property
    def lock(self) -> Path:
        return self.dir / "server.lock"


def server_files(home: Path) -> ServerFiles:
    return ServerFiles(home / "prefect")


@dataclass(frozen=True)
class ServerStatus:
    url: str
    pid: int | None
    answering: bool

    @property
    def ui(self) -> str:
        return ui_url(self.url)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def home_server_status(home: Path) -> ServerStatus | None:
    """The home's server as its files describe it, or None if it has none running."""
    files = server_files(home)
    url, pid_text = _read(files.url), _read(files.pid)
    pid = int(pid_text) if pid_text.isdigit() else None
    if not url or pid is None or not alive(pid):
        return None
    return ServerStatus(url, pid, healthy(url))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released by the kernel if we die
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _forget(files: ServerFiles) -> None:
    for path in (files.url, files.pid):
        with suppress(OSError):
            path.unlink()


def start_home_server(
    home: Path, host: str = HOST, port: int | None = None, timeout: float = STARTUP_TIMEOUT_S
) -> tuple[ServerStatus, bool]:
    """The home's server, started (detached) unless it already runs; returns it and whether it
    was started now. One caller at a time starts it (an flock on `server.lock`).

    Raises ConflictError if it already runs at another address than host/port asked for,
    InvalidValueError if host:port cannot be listened on, ServerError if it does not start.
    """
    files = server_files(home)
    with _locked(files.lock):
        running = home_server_status(home)
        if running is not None and running.answering:
            wanted = api_url(host, port) if port else None
            if wanted and wanted != running.url:
                raise ConflictError(
                    f"this DLM home's Prefect server already runs at {running.url} (pid {running.pid}): "
                    "stop it first with `dlm server stop`"
                )
            return running, False
        if running is not None and running.pid is not None and is_prefect_server(running.pid):
            stop_pid(running.pid)  # alive but not answering: replace it
        _forget(files)
        if port:
            check_can_listen(host, port)
        port = port or free_port(HOST if host in ("", "0.0.0.0", "::") else host)
        url = api_url(host, port)
        pid = spawn_server(files.dir, host, port, files.log)
        files.pid.write_text(f"{pid}\n")
        try:
            wait_healthy(url, pid, files.log, timeout)
        except ServerError:
            _forget(files)
            raise
        files.url.write_text(url + "\n")
        return ServerStatus(url, pid, True), True


def stop_home_server(home: Path, timeout: float = STOP_TIMEOUT_S) -> ServerStatus | None:
    """Stop the home's server (its whole process group); returns what was stopped, or None."""
    files = server_files(home)
    with _locked(files.lock):
        running = home_server_status(home)
        if running is None:
            _forget(files)
            return None
        if running.pid is not None and is_prefect_server(running.pid) and not stop_pid(running.pid, timeout):
            raise ServerError(f"the Prefect server (pid {running.pid}) did not stop")
        _forget(files)
        return running


# --------------------------------------------------------------------------- which server


def _profile_api_url() -> str:
    """PREFECT_API_URL of the active Prefect profile (profiles.toml), read without Prefect."""
    path = os.environ.get("PREFECT_PROFILES_PATH") or str(
        Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect") / "profiles.toml"
    )
    try:
        doc = tomllib.loads(Path(path).expanduser().read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return ""
    active = os.environ.get("PREFECT_PROFILE") or doc.get("active") or "ephemeral"
    profile = (doc.get("profiles") or {}).get(active) or {}
    return str(profile.get("PREFECT_API_URL") or "") if isinstance(profile, dict) else ""


def configured_api_url() -> str:
    """PREFECT_API_URL from the environment, a Prefect already configured in this process,
    or the active Prefect profile; empty if none names a server."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if url:
        return url
    if "prefect.settings" in sys.modules:  # e.g. under Prefect's test harness
        from prefect.settings import PREFECT_API_URL

        return str(PREFECT_API_URL.value() or "")
    return _profile_api_url()


def announced_api_url() -> str:
    """The URL a running `dlm serve` announced, if its server answers."""
    url = _read(api_url_file())
    return url if url and healthy(url) else ""


def api_url_for(home: Path, *, start: bool = True) -> str:
    """The Prefect API a command's flows use (see the module docstring); starts the home's
    server when none is found and `start`. Returns "" if none and not `start`.

    Raises ServerError if the home's server does not start.
    """
    url = configured_api_url() or announced_api_url()
    if url:
        return url
    running = home_server_status(home)
    if running is not None and running.answering:
        return running.url
    if not start:
        return ""
    return start_home_server(home)[0].url


# --------------------------------------------------------------------------- `dlm serve`


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def announced(url: str, home: Path) -> Iterator[str]:
    """For the duration of a `dlm serve`: write the API URL where `dlm` commands look for it,
    set PREFECT_API_URL for this process and its children, make SIGTERM stop cleanly; restore
    all of it on exit. One `dlm serve` per DLM home: an flock on `prefect/serve.lock`.

    Raises ConflictError if another `dlm serve` runs for this home.
    """
    lock_path = server_files(home).dir / "serve.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    path = api_url_file()
    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError(
                f"a `dlm serve` is already running for this DLM home, at {_read(path) or '?'}"
            ) from None
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


def serve_server(home: Path, port: int | None = None, *, configured_only: bool = False) -> tuple[str, bool]:
    """The server `dlm serve` uses and whether it was started now: PREFECT_API_URL's (it must
    answer), else the home's server (started if needed; it keeps running after `dlm serve`).

    Raises InvalidValueError (configured_only without PREFECT_API_URL), ServerError,
    ConflictError (the home's server runs on another port than `port`).
    """
    url = configured_api_url()
    if configured_only and not url:
        raise InvalidValueError("--no-server needs PREFECT_API_URL set to a running Prefect server's API")
    if url:
        if not healthy(url, timeout=10):
            raise ServerError(f"no Prefect server answers at PREFECT_API_URL={url}")
        return url, False
    status, started = start_home_server(home, port=port)
    return status.url, started
