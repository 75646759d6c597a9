"""The `dlm` command line: parse, call the lifecycle core (or start a flow), render.

This module holds the app, `init`, the pipelines (`run`, `checkout`, `serve`), `demo` and the
entry point; the catalogue's commands are in dlm/commands_storage.py (`storage`),
dlm/commands_items.py (`items`, `url`) and dlm/commands_catalogue.py (`ingest`, `status`,
`datasets`). Each is a short function of argument parsing and rendering: the work itself is in
lifecycle/ and flows/.

Exit codes: 0 success, 1 a failure while working (storage, transfer), 2 bad input.
Errors are one line on stderr: `dlm: error: ...`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

# typer >= 0.20 vendors click; its exceptions live here (typer re-exports only Abort and Exit).
from typer._click import exceptions as click_exc

from dlm import render
from dlm.commands_catalogue import datasets_app, ingest, status
from dlm.commands_items import items_app, url
from dlm.commands_storage import storage_app
from dlm.common import JsonOpt, catalogue
from lifecycle.catalogue import catalog, storages
from lifecycle.catalogue.db import init_db
from lifecycle.errors import (
    DLMError,
    InvalidValueError,
    NotFoundError,
    UserInputError,
)
from lifecycle.redact import install_log_redaction, redact
from lifecycle.settings import get_settings
from lifecycle.units import parse_size

app = typer.Typer(
    name="dlm",
    help="DLM: a data lifecycle manager. Knows every item and copy; replicates, migrates, expires, verifies.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
)
app.add_typer(storage_app, name="storage")
app.add_typer(items_app, name="items")
app.add_typer(datasets_app, name="datasets")

# --------------------------------------------------------------------------- helpers


def _fail(message: str, code: int) -> None:
    line = " ".join(redact(message).splitlines())  # one line, whatever the message held
    render.err.print(f"dlm: error: {line}", markup=False)
    raise SystemExit(code)


# --------------------------------------------------------------------------- init and the catalogue


@app.command()
def init() -> None:
    """Create or upgrade the catalogue schema."""
    rev = init_db()
    render.out.print(f"catalogue ready at {redact(get_settings().db_url)} (schema {rev})", markup=False)


# The catalogue's commands live in their own modules (storage, items and url, ingest, status and
# datasets); registered here in the order `dlm --help` lists them.
app.command()(status)
app.command()(ingest)
app.command()(url)


# --------------------------------------------------------------------------- pipelines

PIPELINE_NAMES = ("replicate", "migrate", "expire", "rebalance", "verify", "reconcile")


@app.command()
def run(
    pipeline: Annotated[
        str, typer.Argument(help="replicate, migrate, expire, rebalance, verify or reconcile")
    ],
    dry_run: Annotated[bool, typer.Option(help="print the plan and change nothing")] = False,
    storage: Annotated[
        str | None, typer.Option(help="verify: only this storage; reconcile: the storage (required)")
    ] = None,
    budget: Annotated[str | None, typer.Option(help="verify: bytes to re-read, e.g. 10GiB")] = None,
    adopt: Annotated[bool, typer.Option(help="reconcile: register unknown objects as items")] = False,
    json_: JsonOpt = False,
) -> None:
    """Run one pipeline now (plan, then apply in batches) and print what it did."""
    if pipeline not in PIPELINE_NAMES:
        raise InvalidValueError(f"unknown pipeline {pipeline!r}: use one of {', '.join(PIPELINE_NAMES)}")
    if pipeline not in ("verify", "reconcile") and (storage or budget or adopt):
        raise InvalidValueError("--storage, --budget and --adopt apply to verify and reconcile only")
    if budget is not None:
        parse_size(budget)
    with catalogue() as s:
        if storage:
            storages.get_storage(storage, session=s)
    _use_running_server()
    if pipeline == "verify":
        from flows.integrity import verify

        report = verify(storage=storage, budget=budget, dry_run=dry_run)
        failed = bool(report.get("repair_failed") or report.get("unreadable"))
    elif pipeline == "reconcile":
        if not storage:
            raise InvalidValueError("reconcile needs --storage NAME")
        from flows.integrity import reconcile

        report = reconcile(storage=storage, adopt=adopt, dry_run=dry_run)
        failed = bool(report.get("repair_failed"))
    else:
        from flows.pipelines import FLOWS

        report = FLOWS[pipeline](dry_run=dry_run)
        failed = bool(report.get("failed"))
    if json_:
        render.print_json(report)
    elif pipeline in ("verify", "reconcile"):
        render_integrity(pipeline, report)
    else:
        render_report(report)
    if failed:
        raise SystemExit(1)  # some transfers, deletions or reads failed: the next run retries them


def _use_running_server() -> None:
    """Run flows on the Prefect server of a running `dlm serve` (if any) instead of starting a
    temporary one: faster, and the runs show in its UI."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from flows.events import api_url_file

    try:
        url = api_url_file().read_text().strip()
    except OSError:
        return
    if not url:
        return
    import httpx

    try:
        alive = httpx.get(f"{url.rstrip('/')}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        alive = False  # a stale file of a `dlm serve` that died
    if alive:
        os.environ["PREFECT_API_URL"] = url


def render_integrity(pipeline: str, report: dict[str, Any]) -> None:
    """Counters, batches, repairs and unknown objects of a verify or reconcile run."""
    skip = {"batches", "repairs", "unknown_objects", "temporary_objects", "pipeline", "dry_run"}
    counters = {k: v for k, v in report.items() if k not in skip and isinstance(v, int | float | str | bool)}
    title = pipeline + (" (dry run: nothing changed)" if report.get("dry_run") else "")
    render.out.print(f"[bold]{title}[/]: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    for key, heading in (
        ("batches", "Batches"),
        ("repairs", "Repairs"),
        ("unknown_objects", "Unknown objects"),
        ("temporary_objects", "Temporary files (left by interrupted writes)"),
    ):
        rows = report.get(key) or []
        if rows and isinstance(rows[0], dict):
            render.table(heading, list(rows[0]), [tuple(r.values()) for r in rows])


def render_report(report: dict[str, Any]) -> None:
    p = report["plan"]
    title = f"{report['pipeline']}" + (" (dry run: nothing changed)" if report["dry_run"] else "")
    render.out.print(
        f"[bold]{title}[/]: planned {p['copies']} copies ({render.size(p['copy_bytes'])}), "
        f"{p['deletes']} deletions, {p['expired_items']} item expiries, {p['phase_changes']} phase changes, "
        f"{p['refusals']} refused, {p['shortfalls']} shortfalls"
        + (f", {p['drained']} storages drained (can be retired)" if p.get("drained") else "")
    )
    if report["dry_run"]:
        render.table(
            "Plan",
            ["action", "item", "from", "to", "path", "bytes", "reason"],
            [
                (a["action"], a["item"][:8], a["from"], a["to"], a["path"], a["bytes"], a["reason"])
                for a in report["actions"]
            ],
        )
        return
    if report["batches"]:
        # copy and delete rows carry different stage columns: one column per key, the error last
        keys = [k for k in dict.fromkeys(k for b in report["batches"] for k in b) if k != "first error"]
        keys.append("first error")
        render.table("Batches", keys, [tuple(b.get(k, "") for k in keys) for b in report["batches"]])
    render.out.print(
        f"copied {report['copied']} ({render.size(report['bytes_moved'])}), deleted {report['deleted']}, "
        f"failed {report['failed']}; items below target now: {report['below_target_after']}"
    )


@app.command()
def checkout(
    args: Annotated[list[str], typer.Argument(help="NAME... DEST (a directory or REMOTE:PATH)")],
    dataset: Annotated[str | None, typer.Option(help="check out a dataset's members")] = None,
    json_: JsonOpt = False,
) -> None:
    """Copy items (or a dataset) to a local directory or an rclone remote, verified by checksum."""
    from flows.checkout import checkout_now

    *refs, dest = args
    with catalogue():
        pass
    result = checkout_now(refs or None, dataset, dest, catalog.current_actor())
    if json_:
        render.print_json(result)
    else:
        render.out.print(
            f"checked out {result['files']} files ({render.size(result['bytes'])}) to {dest} "
            f"with {result['rclone_processes']} rclone calls"
        )
        for name, err in result["failed"].items():
            render.err.print(f"failed: {name}: {err}", markup=False)
    if result["failed"]:
        raise SystemExit(1)


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="local Prefect server port")] = None,
    no_server: Annotated[
        bool, typer.Option("--no-server", help="use the Prefect server PREFECT_API_URL names")
    ] = False,
) -> None:
    """Serve the pipelines on their schedules and on item-ready events, with a local Prefect UI."""
    from deployments.server import existing_server, local_server

    with catalogue():
        pass
    settings = get_settings()
    try:
        with existing_server() if no_server else local_server(settings.home, port) as url:
            from deployments.serve import build_deployments, describe, serve_all

            deployments = build_deployments(settings)
            render.out.print(f"Prefect UI: {url.removesuffix('/api')}  (API {url})", markup=False)
            render.table(
                "Served deployments",
                ["deployment", "runs"],
                [(f"{d.flow_name}/{d.name}", describe(d)) for d in deployments],
            )
            render.out.print("Ctrl-C stops.", markup=False)
            serve_all(deployments)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before serving began: the server is stopped
        pass
    render.out.print("dlm serve stopped", markup=False)


# --------------------------------------------------------------------------- demo


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="keep the demo's files here (default: a temp dir)")
    ] = None,
) -> None:
    """The whole lifecycle on the embedded default: SQLite, two posix volumes and a local S3."""
    from dlm.demo import run_demo

    run_demo(workdir, app=app)


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; DLM errors and usage errors become one line on stderr and an exit code."""
    install_log_redaction()
    try:
        result = app(args=argv, standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:
        render.err.print(exc.format_message(), markup=False)
        raise SystemExit(2) from None
    except typer.Abort:
        _fail("aborted", 130)
    except click_exc.UsageError as exc:
        _fail(exc.format_message().replace("\n", " "), 2)
    except click_exc.ClickException as exc:
        _fail(exc.format_message().replace("\n", " "), exc.exit_code or 1)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except (UserInputError, NotFoundError) as exc:
        _fail(str(exc), 2)
    except DLMError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except PermissionError as exc:  # the last net for a file the core did not expect to be closed to it
        _fail(f"cannot access {exc.filename!r}: {exc.strerror}", 1)
    except Exception as exc:
        if os.environ.get("DLM_DEBUG"):
            raise
        if isinstance(exc, RuntimeError) and "Prefect API server" in str(exc):
            # Several `dlm run` at once on a loaded machine, each starting a temporary server.
            _fail(
                f"{exc} (several runs at once each start a temporary Prefect server: run `dlm serve`, "
                "or set PREFECT_API_URL to a running server, and retry)",
                1,
            )
        _fail(f"internal error: {type(exc).__name__}: {exc} (set DLM_DEBUG=1 for the traceback)", 70)
    if isinstance(result, int) and result:
        raise SystemExit(result)


if __name__ == "__main__":
    main()
