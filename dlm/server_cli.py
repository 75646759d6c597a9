"""`dlm server start|stop|status`, and how every `dlm` command finds its Prefect server.

A command that runs a flow calls `use_prefect_server()` first: it sets PREFECT_API_URL to the
server `deployments.server.api_url_for` picks (starting this DLM home's server on first use),
before Prefect is imported. `quiet_prefect()` keeps Prefect's log lines off the console
unless `dlm -v`.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import ExitStack
from typing import Annotated

import typer

from deployments import server as prefect_server
from dlm import render
from lifecycle.settings import get_settings

server_app = typer.Typer(
    help="This DLM home's long-lived Prefect server (API and UI): start, stop, status.",
    no_args_is_help=True,
)

# Prefect's console handler prints only warnings and errors (its records still reach the
# server's log store: the UI shows every line of a run).
QUIET_PREFECT_ENV = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


# Prefect's queue services warn at exit while they still send a run's last events and logs
# ("EventsWorker - Still processing items: 4 items remaining..."): progress, not a problem.
DRAINING_LOGGERS = ("EventsWorker", "APILogWorker")


def quiet_prefect(verbose: bool) -> None:
    """Before Prefect is imported: its INFO lines only with -v; no analytics either way."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not verbose:
        for key, value in QUIET_PREFECT_ENV.items():
            os.environ.setdefault(key, value)
        for name in DRAINING_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


# Settings entered for the rest of a CLI process (see use_prefect_server).
_process_settings = ExitStack()


def use_prefect_server(*, start: bool = True) -> str:
    """Point this process (and its children) at the Prefect server flows use, starting this
    DLM home's server if there is none and `start`. Returns its API URL ("" if none).
    Raises ServerError.

    Where Prefect is already imported (a test harness, an embedding program) its settings are
    fixed: only a server configured there is used, none is started. In a fresh CLI process this
    also turns off flow-run heartbeats for the runs it starts: the heartbeat thread is joined
    at the end of a run and holds it up to a second, half of what a run with nothing to do
    takes (heartbeats serve a zombie-run automation; served and worker runs keep theirs).
    """
    if "prefect" in sys.modules:
        return prefect_server.configured_api_url()
    url = prefect_server.api_url_for(get_settings().home, start=start)
    if not url:
        return ""
    if not prefect_server.healthy(url, timeout=10):  # a configured server that is down
        if not start:
            return ""  # (a command that runs no flow does without)
        raise prefect_server.ServerError(f"no Prefect server answers at {url} (PREFECT_API_URL)")
    os.environ["PREFECT_API_URL"] = url
    from prefect.settings import temporary_settings

    _process_settings.enter_context(temporary_settings(updates={"flows.heartbeat_frequency": None}))
    return url


@server_app.command("start")
def server_start(
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface)")] = (
        prefect_server.HOST
    ),
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="port (default: a free one)")] = None,
) -> None:
    """Start this DLM home's Prefect server in the background (or say where it already runs)."""
    status, started = prefect_server.start_home_server(get_settings().home, host=host, port=port)
    _print_status(status, "started" if started else "already running")


@server_app.command("stop")
def server_stop() -> None:
    """Stop this DLM home's Prefect server (its history stays in its database)."""
    stopped = prefect_server.stop_home_server(get_settings().home)
    if stopped is None:
        render.out.print("no Prefect server runs for this DLM home", markup=False)
    else:
        render.out.print(f"stopped the Prefect server at {stopped.url} (pid {stopped.pid})", markup=False)


@server_app.command("status")
def server_status(
    json_: Annotated[bool, typer.Option("--json", help="Machine-readable JSON.")] = False,
) -> None:
    """Where this DLM home's Prefect server runs (API, UI, pid), and which server `dlm run` uses.
    Exit code 1 if none runs."""
    home = get_settings().home
    status = prefect_server.home_server_status(home)
    used = prefect_server.configured_api_url() or prefect_server.announced_api_url()
    if json_:
        render.print_json(
            {
                "running": status is not None,
                "url": status.url if status else None,
                "ui": status.ui if status else None,
                "pid": status.pid if status else None,
                "answering": status.answering if status else False,
                "log": str(prefect_server.server_files(home).log),
                "used_by_dlm": used or (status.url if status else None),
            }
        )
    elif status is None:
        render.out.print("no Prefect server runs for this DLM home (`dlm server start`)", markup=False)
    else:
        _print_status(status, "running" if status.answering else "NOT ANSWERING")
    if used and (status is None or used != status.url) and not json_:
        render.out.print(f"dlm commands use the Prefect server at {used}", markup=False)
    if status is None or not status.answering:
        raise typer.Exit(1)


def _print_status(status: prefect_server.ServerStatus, state: str) -> None:
    files = prefect_server.server_files(get_settings().home)
    render.out.print(
        f"Prefect server {state}: API {status.url}  UI {status.ui}  pid {status.pid}  log {files.log}",
        markup=False,
    )
