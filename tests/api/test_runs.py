"""POST /api/runs/{pipeline}: an admin starts a served pipeline on the Prefect server."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.api.conftest import Api, Tokens
from tests.api.test_access import assert_one_line_error


def test_runs_are_for_admins_and_options_are_checked_as_dlm_run_checks_them(
    api: Api, tokens: Tokens, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    with api.client(tokens.alice) as alice, api.client(tokens.admin) as admin:
        assert_one_line_error(alice.post("/runs/replicate"), 403)
        assert "unknown pipeline" in assert_one_line_error(admin.post("/runs/shred"), 400)
        msg = assert_one_line_error(admin.post("/runs/replicate", json={"storage": "x"}), 400)
        assert msg.startswith("storage applies to")
        assert_one_line_error(admin.post("/runs/verify", json={"budget": "lots"}), 400)
        assert_one_line_error(admin.post("/runs/verify", json={"storage": "none-such"}), 404)
        assert_one_line_error(admin.post("/runs/verify", json={"colour": "red"}), 422)
        assert "partitions applies to" in assert_one_line_error(
            admin.post("/runs/expire", json={"partitions": 2}), 400
        )
        huge = admin.post("/runs/replicate", json={"partitions": 10**6})
        assert "at most" in assert_one_line_error(huge, 400)
        assert "at least" in assert_one_line_error(admin.post("/runs/replicate", json={"partitions": 0}), 400)
        down = assert_one_line_error(admin.post("/runs/replicate", json={"dry_run": True}), 503)
        assert "did not answer" in down


@pytest.mark.prefect
def test_an_admin_starts_a_served_pipeline_on_the_prefect_server(
    api: Api, tokens: Tokens, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL

    from flows.registry import FLOWS
    from lifecycle.runs import Pipeline

    url = str(PREFECT_API_URL.value()).rstrip("/")
    monkeypatch.setenv("PREFECT_API_URL", url)
    FLOWS[Pipeline.VERIFY].to_deployment(name="verify").apply()
    with api.client(tokens.admin) as admin:
        answer = admin.post("/runs/verify", json={"budget": "1MiB", "dry_run": True, "partitions": 2})
        assert answer.status_code == 202, answer.text
        assert "not served" in assert_one_line_error(admin.post("/runs/expire"), 409)
    run = httpx.get(f"{url}/flow_runs/{answer.json()['flow_run_id']}", timeout=15).json()
    # the parent run fans out into 2 sub-runs of the deployment when a worker or `dlm serve` runs it
    assert run["parameters"] == {"budget": "1MiB", "dry_run": True, "partitions": 2}
    assert "requested-by:root" in run["tags"]
    assert run["state_type"] == "SCHEDULED"
