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

from dlm import quick_exit, render
from dlm.commands_catalogue import datasets_app, ingest, status
from dlm.commands_items import items_app, url
from dlm.commands_storage import storage_app
from dlm.commands_tokens import api, token_app
from dlm.common import JsonOpt, catalogue
from dlm.server_cli import quiet_prefect, server_app, use_prefect_server
from lifecycle.catalogue import catalog, storages
from lifecycle.catalogue.db import init_db
from lifecycle.errors import (
    DLMError,
    InvalidValueError,
    NotFoundError,
    UserInputError,
)
from lifecycle.redact import install_log_redaction, redact
from lifecycle.reports import (
    PartitionedReport,
    PipelineReport,
    ReconcileReport,
    RunFailedError,
    VerifyReport,
)
from lifecycle.runs import PIPELINES, Pipeline, RunKind, RunOption, accepting, parse_pipeline
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
app.add_typer(token_app, name="token")
app.add_typer(server_app, name="server")


@app.callback()
def _options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also show Prefect's log lines (flow and task runs).")
    ] = False,
) -> None:
    """DLM: a data lifecycle manager. Knows every item and copy; replicates, migrates, expires, verifies."""
    quiet_prefect(verbose)


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
app.command()(api)


# --------------------------------------------------------------------------- pipelines

RUN_HELP = "\n\n".join(
    [
        "Run one pipeline now (plan, then apply in batches) and print what it did.",
        "\b\n" + "\n".join(f"{spec.name:<10} {spec.description}" for spec in PIPELINES.values()),
    ]
)


def _accepted_by(option: RunOption) -> str:
    names = [p.value for p in accepting(option)]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


@app.command(help=RUN_HELP)
def run(
    pipeline: Annotated[str, typer.Argument(help=", ".join(Pipeline), show_default=False)],
    dry_run: Annotated[bool, typer.Option(help="print the plan and change nothing")] = False,
    storage: Annotated[
        str | None,
        typer.Option(help=f"{_accepted_by(RunOption.STORAGE)}: only this storage (default: every one)"),
    ] = None,
    budget: Annotated[
        str | None, typer.Option(help=f"{_accepted_by(RunOption.BUDGET)}: bytes to re-read, e.g. 10GiB")
    ] = None,
    adopt: Annotated[
        bool, typer.Option(help=f"{_accepted_by(RunOption.ADOPT)}: register unknown objects as items")
    ] = False,
    partitions: Annotated[
        int | None,
        typer.Option(
            min=1,
            help=f"{_accepted_by(RunOption.PARTITIONS)}: split the run by item into this many parts (run "
            "here one after another; a deployment run fans out to workers)",
        ),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    chosen = parse_pipeline(pipeline)
    spec = PIPELINES[chosen]
    given: dict[RunOption, Any] = {
        RunOption.STORAGE: storage,
        RunOption.BUDGET: budget,
        RunOption.ADOPT: adopt or None,
        RunOption.PARTITIONS: partitions,
    }
    options: dict[str, Any] = {}
    for option, value in given.items():
        if value is None:
            continue
        if option not in spec.options:
            raise InvalidValueError(f"--{option} applies to {_accepted_by(option)} only")
        options[option.value] = value
    if budget is not None:
        parse_size(budget)
    if partitions is not None:
        from lifecycle.planning.partition import check_partition

        check_partition(partitions, None)
    with catalogue() as s:
        if storage:
            storages.get_storage(storage, session=s)
    report: PipelineReport | VerifyReport | ReconcileReport | PartitionedReport | None = None
    if spec.kind is RunKind.PLACEMENT:
        # the plan, or a run with nothing to do, without importing Prefect nor starting a flow run
        from flows.plan_report import dry_run_report, idle_report

        # (a plan with work in it is kept for the flow run started below: it need not plan again)
        report = dry_run_report(chosen) if dry_run else idle_report(chosen, keep_plan=not options)
    if report is None:
        from flows.plan_report import drop_planned

        try:
            _use_running_server()
            from flows.registry import FLOWS

            report = FLOWS[chosen](dry_run=dry_run, **options)
        except RunFailedError as exc:  # show what the run did, then the error (exit 1)
            _show_report(exc.report, json_)
            raise
        finally:
            drop_planned()
    _show_report(report, json_)
    if report.has_failures:
        raise SystemExit(1)  # some transfers, deletions or reads failed: the next run retries them


def _show_report(
    report: PipelineReport | VerifyReport | ReconcileReport | PartitionedReport, json_: bool
) -> None:
    if json_:
        render.print_json(report.as_json())
    else:
        render.run_report(report)


def _use_running_server() -> None:
    """Run flows on the long-lived Prefect server: PREFECT_API_URL's, a running `dlm serve`'s,
    or this DLM home's own (started in the background on first use; `dlm server`)."""
    use_prefect_server()


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
    use_prefect_server(start=False)  # checkout runs no flow (yet): a server only if one runs
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
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="port of this DLM home's Prefect server if it starts")
    ] = None,
    no_server: Annotated[
        bool, typer.Option("--no-server", help="use the Prefect server PREFECT_API_URL names (required)")
    ] = False,
) -> None:
    """Serve the pipelines on their schedules and on item-ready events, on this DLM home's
    Prefect server (started if needed; it keeps running afterwards) or PREFECT_API_URL's."""
    from deployments.server import announced, serve_server

    with catalogue():
        pass
    settings = get_settings()
    try:
        url, started = serve_server(settings.home, port, configured_only=no_server)
        with announced(url, settings.home):
            from deployments.serve import build_deployments, describe, serve_all

            deployments = build_deployments(settings)
            how = "started" if started else "running"
            render.out.print(
                f"Prefect UI: {url.removesuffix('/api')}  (API {url}, server {how})", markup=False
            )
            render.table(
                "Served deployments",
                ["deployment", "runs"],
                [(f"{d.flow_name}/{d.name}", describe(d)) for d in deployments],
            )
            render.out.print("Ctrl-C stops serving (the Prefect server keeps running).", markup=False)
            serve_all(deployments)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before serving began
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
    if argv is None:  # the `dlm` process itself, not a caller in-process: skip the slow teardown
        with quick_exit.armed():
            _main(argv)
    else:
        _main(argv)


def _main(argv: list[str] | None) -> None:
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
            # Prefect could not reach (or start) its API server.
            _fail(
                f"{exc} (start this DLM home's Prefect server with `dlm server start`, "
                "or set PREFECT_API_URL to a running server, and retry)",
                1,
            )
        _fail(f"internal error: {type(exc).__name__}: {exc} (set DLM_DEBUG=1 for the traceback)", 70)
    if isinstance(result, int) and result:
        raise SystemExit(result)


if __name__ == "__main__":
    main()
