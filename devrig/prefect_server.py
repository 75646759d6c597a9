"""A real Prefect server for tests and benchmarks: its own state directory, a free port (never
Prefect's default 4200), started detached and stopped by its process group.

    with PrefectServer(tmp_path / "prefect") as server:
        subprocess.run([...], env={**os.environ, **server.client_env()})
        server.url        # http://127.0.0.1:PORT/api
        server.ui         # http://127.0.0.1:PORT
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from deployments.server import (
    HOST,
    QUIET_SERVER_ENV,
    STARTUP_TIMEOUT_S,
    ServerError,
    api_url,
    free_port,
    spawn_server,
    stop_pid,
    ui_url,
    wait_healthy,
)

__all__ = ["PrefectServer", "ServerError"]


class PrefectServer:
    """`prefect server start` on host:port (a free one by default) with PREFECT_HOME=`workdir`."""

    def __init__(self, workdir: Path, *, host: str = HOST, port: int | None = None) -> None:
        self.workdir = Path(workdir)
        self.host = host
        self.port = port or free_port(host)
        self.pid: int | None = None

    @property
    def url(self) -> str:
        """The API URL (`http://host:port/api`)."""
        return api_url(self.host, self.port)

    @property
    def ui(self) -> str:
        return ui_url(self.url)

    @property
    def log(self) -> Path:
        return self.workdir / "server.log"

    def client_env(self) -> dict[str, str]:
        """What a client process (`dlm`, `prefect`, a worker) needs to use this server."""
        return {"PREFECT_API_URL": self.url, **QUIET_SERVER_ENV}

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> PrefectServer:
        """Start it and wait until its API answers. Raises ServerError (then it is stopped)."""
        self.pid = spawn_server(self.workdir, self.host, self.port, self.log)
        wait_healthy(self.url, self.pid, self.log, timeout)
        return self

    def stop(self) -> bool:
        """Stop its process group (SIGTERM, then SIGKILL). Returns whether it is gone."""
        if self.pid is None:
            return True
        gone = stop_pid(self.pid)
        self.pid = None
        return gone

    def __enter__(self) -> PrefectServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
