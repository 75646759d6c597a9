"""`dlm run` as the pipeline registry and the typed run report define it, through the real CLI.

The CLI's choices, help and option checks come from lifecycle.runs; what `dlm run --json`
prints is the flow's report (lifecycle.reports), and reads back into the same model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from lifecycle.catalogue.db import session_scope
from lifecycle.errors import InvalidValueError
from lifecycle.planning.pipelines import make_plan
from lifecycle.reports import (
    BatchRow,
    PipelineReport,
    ReconcileReport,
    Recovered,
    VerifyReport,
    parse_report,
)
from lifecycle.runs import PIPELINES, Pipeline, RunOption, accepting
from tests.flows.dlm_process import dlm, dlm_env, files, run_json

UNKNOWN = (
    "dlm: error: unknown pipeline 'nope': use one of replicate, migrate, expire, rebalance, verify, reconcile"
)
PAYLOAD = os.urandom(20_000) + b"dlm run contracts"


# --------------------------------------------------------------------------- the registry drives the CLI


def test_dlm_run_help_names_every_pipeline_of_the_registry(tmp_path: Path) -> None:
    res = dlm(dlm_env(tmp_path / "home"), "run", "--help")

    assert res.returncode == 0, res.stderr
    for spec in PIPELINES.values():
        assert f"{spec.name:<10} {spec.description}" in res.stdout, spec.name
    assert ", ".join(Pipeline) in res.stdout


def test_an_unknown_pipeline_is_one_line_exit_2_and_changes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    res = dlm(dlm_env(home), "run", "nope")

    assert (res.returncode, res.stdout, res.stderr) == (2, "", UNKNOWN + "\n")
    assert not (home / "dlm.db").exists()
    # the same words where the core plans (placement pipelines only): make_plan parses names too
    with session_scope() as session:
        for name in ("nope", "verify"):
            with pytest.raises(InvalidValueError) as refused:
                make_plan(session, name)
            assert str(refused.value) == (
                f"unknown pipeline '{name}': use one of replicate, migrate, expire, rebalance"
            )


@pytest.mark.parametrize("pipeline", list(Pipeline))
def test_options_a_pipeline_does_not_take_are_refused_by_name(pipeline: Pipeline, tmp_path: Path) -> None:
    home = tmp_path / "home"
    flags = {
        RunOption.STORAGE: ["--storage", "a"],
        RunOption.BUDGET: ["--budget", "1GiB"],
        RunOption.ADOPT: ["--adopt"],
        RunOption.PARTITIONS: ["--partitions", "2"],
    }
    refused = [o for o in RunOption if o not in PIPELINES[pipeline].options]
    for option in refused:
        res = dlm(dlm_env(home), "run", pipeline, *flags[option])
        takers = [p.value for p in accepting(option)]
        assert res.returncode == 2, (option, res.stderr)
        assert res.stderr == f"dlm: error: --{option} applies to {' and '.join(takers)} only\n"
    assert not (home / "dlm.db").exists()


# --------------------------------------------------------------------------- the report is the JSON


def test_report_models_round_trip_their_json() -> None:
    copy = BatchRow(kind="copy", from_="a", to="b", planned=2, done=2, bytes=10, seconds=1.5,
                    stages={"claim": 0.1, "rclone": 1.2})  # fmt: skip
    delete = BatchRow(
        kind="delete", from_="a", planned=1, done=1, bytes_read_to_confirm=10, stages={"confirm": 0.2}
    )
    report = PipelineReport(
        pipeline=Pipeline.MIGRATE, dry_run=False, plan={"copies": 2}, batches=[copy, delete], copied=2,
        deleted=1, failed=0, bytes_moved=10, bytes_read_to_confirm=10, below_target_after=0,
        recovered=Recovered(rolled_back=1),
    )  # fmt: skip
    data = report.as_json()

    # the keys the reports always had: stage seconds flattened, the error last, nothing null
    assert list(data["batches"][0]) == [
        "kind", "from", "to", "planned", "done", "failed", "skipped", "bytes", "seconds", "claim s",
        "rclone s", "first error",
    ]  # fmt: skip
    assert (
        data["batches"][1]["bytes read to confirm"] == 10
        and "bytes read to confirm" not in data["batches"][0]
    )
    assert None not in data.values() and "settled" not in data
    assert parse_report(json.dumps(data)) == report
    assert parse_report(data).as_json() == data
    dry = PipelineReport(pipeline=Pipeline.REPLICATE, dry_run=True, plan={})
    assert "copied" not in dry.as_json() and parse_report(dry.as_json()) == dry


# --------------------------------------------------------------------------- every pipeline, end to end


@pytest.fixture
def estate(tmp_path: Path, flows_env: None) -> dict[str, Any]:
    """Two posix storages and one LIQUID item on `a`, set up through the CLI; runs use the
    session's Prefect server."""
    from prefect.settings import PREFECT_API_URL

    env = dlm_env(
        tmp_path / "home", PREFECT_API_URL=str(PREFECT_API_URL.value()), PREFECT_HOME=str(tmp_path / "ph")
    )
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        res = dlm(env, "storage", "add", name, "--kind", "posix", "--root", str(tmp_path / name))
        assert res.returncode == 0, res.stderr
    payload = tmp_path / "payload.bin"
    payload.write_bytes(PAYLOAD)
    res = dlm(
        env, "ingest", "--storage", "a", "--upload", str(payload), "--name", "c/p.bin", "--phase", "LIQUID"
    )
    assert res.returncode == 0, res.stderr
    return {"env": env, "a": tmp_path / "a", "b": tmp_path / "b"}


@pytest.mark.prefect
def test_every_pipeline_runs_from_the_cli_and_prints_its_report(estate: dict[str, Any]) -> None:
    env = estate["env"]
    kinds = {Pipeline.VERIFY: VerifyReport, Pipeline.RECONCILE: ReconcileReport}
    for pipeline in Pipeline:
        data, report = run_json(env, pipeline, "--dry-run")
        assert report.pipeline is pipeline and data["pipeline"] == pipeline.value
        assert isinstance(report, kinds.get(pipeline, PipelineReport)) and report.dry_run
        if pipeline is not Pipeline.VERIFY:  # a dry run settles nothing: no recovery counts
            assert "recovered" not in data, data["recovered"]
    assert files(estate["b"]) == []  # dry runs changed nothing on the storages

    data, report = run_json(env, "replicate", "--dry-run")
    assert isinstance(report, PipelineReport)
    assert [(a.action, a.from_, a.to) for a in report.actions] == [("copy", "a", "b")]
    assert "copied" not in data  # what a dry run did not do is not in its JSON
    shown = dlm(env, "run", "replicate", "--dry-run")  # for people: the same plan, as a table
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("replicate (dry run: nothing changed): planned 1 copies")
    assert report.actions[0].item[:8] in shown.stdout and "Plan" in shown.stdout

    _, report = run_json(env, "replicate")
    assert isinstance(report, PipelineReport)
    assert (report.copied, report.failed, report.below_target_after) == (1, 0, 0)
    (batch,) = report.batches
    assert (batch.kind, batch.from_, batch.to, batch.done) == ("copy", "a", "b", 1) and batch.stages
    (copied,) = files(estate["b"])
    assert (estate["b"] / copied).read_bytes() == PAYLOAD

    # again: nothing to do, said without a flow run, in the same report
    runs = _flow_runs()
    again, idle = run_json(env, "replicate")
    assert isinstance(idle, PipelineReport) and again["nothing_to_do"] is True
    assert (idle.copied, idle.failed, idle.below_target_after, idle.batches) == (0, 0, 0, [])
    assert set(again) == set(report.as_json()) | {"nothing_to_do"}
    shown = dlm(env, "run", "replicate")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("replicate: planned 0 copies")
    assert "copied 0 (0 B), deleted 0, failed 0; items below target now: 0" in shown.stdout
    assert "nothing to do: no flow run started" in shown.stdout
    assert _flow_runs() == runs

    _, verified = run_json(env, "verify")
    assert isinstance(verified, VerifyReport)
    assert (verified.intact, verified.corrupted, verified.lost) == (2, 0, 0)
    shown = dlm(env, "run", "verify", "--storage", "b")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("verify: budget_bytes ") and "intact 1" in shown.stdout
    assert "Batches" in shown.stdout

    # reconcile without --storage takes every storage, as its daily schedule does
    _, reconciled = run_json(env, "reconcile")
    assert isinstance(reconciled, ReconcileReport)
    assert (reconciled.storage, reconciled.listed, reconciled.matched, reconciled.unknown) == (
        "a, b",
        2,
        2,
        0,
    )


def _flow_runs() -> int:
    """How many flow runs the session's Prefect server has recorded."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.count_flow_runs()
