"""GET /metrics after real runs: every finished run that was not a dry run is in the catalogue's
run log (pipeline, outcome, duration), and transfers are counted per storage pair and state.
The runs are real `dlm run` subprocesses on the Prefect harness, copying real files."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import col

from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.run_log import PipelineRun
from lifecycle.states import Phase
from tests.api.conftest import Api, Tokens
from tests.dlm_process import run_dlm
from tests.factories import ingest_payloads, payload, posix_storage

pytestmark = [pytest.mark.prefect, pytest.mark.rclone]


def _metrics(api: Api, tokens: Tokens) -> dict[str, float]:
    with api.client(tokens.admin) as admin:
        text = admin.get(f"{api.base.removesuffix('/api')}/metrics").text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_runs_and_transfers_reach_the_metrics(
    api: Api, tokens: Tokens, tmp_path: Path, flows_env: None
) -> None:
    with session_scope() as s:
        posix_storage(s, "disk-a", tmp_path / "a")
        posix_storage(s, "disk-b", tmp_path / "b", location="site-b")
    names = [f"r/{i}.dat" for i in range(3)]
    ingest_payloads("disk-a", {n: payload(n) for n in names}, staging=tmp_path / "in", phase=Phase.LIQUID)
    # one copy will fail: its source is gone behind DLM's back
    (tmp_path / "a" / names[2]).unlink()

    assert run_dlm("run", "replicate", "--dry-run").returncode == 0  # a dry run is not logged
    done = run_dlm("run", "replicate")
    assert done.returncode == 1, done.stdout + done.stderr  # the failed copy fails the run
    # the two intact files were copied: the bytes are on disk-b
    for n in names[:2]:
        assert (tmp_path / "b" / n).read_bytes() == payload(n)
    assert not (tmp_path / "b" / names[2]).exists()

    with session_scope() as s:
        runs = s.scalars(select(PipelineRun).order_by(col(PipelineRun.id))).all()
        assert [(r.pipeline, r.outcome, r.copied, r.failed) for r in runs] == [("replicate", "failed", 2, 1)]
        took = runs[0].duration_s
    assert took > 0

    m = _metrics(api, tokens)
    assert m['dlm_pipeline_runs{outcome="failed",pipeline="replicate"}'] == 1.0
    assert m['dlm_pipeline_last_run_seconds{outcome="failed",pipeline="replicate"}'] == pytest.approx(took)
    assert m['dlm_pipeline_run_seconds_sum{outcome="failed",pipeline="replicate"}'] == pytest.approx(took)
    pair = 'destination="disk-b",kind="copy",source="disk-a"'
    assert m[f'dlm_transfers{{{pair},state="DONE"}}'] == 2.0
    assert m[f'dlm_transfers{{{pair},state="FAILED"}}'] == 1.0
    assert m[f'dlm_transfer_bytes{{{pair},state="DONE"}}'] == float(sum(len(payload(n)) for n in names[:2]))
