"""Prefect's own CLI and REST API against a Prefect server that DLM uses, each a real process.

Every test runs against a real `prefect server start` on a free port (never 4200), stopped by
pid at the end (tests/deployments/conftest.py); the runs are served by a real `dlm serve`.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.server import alive
from devrig.prefect_server import PrefectServer
from lifecycle.runs import PIPELINES, Pipeline
from lifecycle.settings import ScheduleSettings
from tests.deployments.conftest import SERVED, api, deployment_names, poll, run

pytestmark = pytest.mark.prefect

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 150
NOWHERE = "http://127.0.0.1:9/api"  # a Prefect API that is not there: `dlm ingest` announces nothing


def _ingest(served: dict[str, Any], name: str) -> tuple[bytes, str]:
    """A LIQUID item with its one copy on storage a, not announced (so nothing replicates it
    until a run is started); returns its bytes and oid."""
    data = os.urandom(32 * 1024) + name.encode()
    path = served["base"] / "a" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    env = {**served["env"], "PREFECT_API_URL": NOWHERE}
    out = run(env, "ingest", "--storage", "a", str(path), "--phase", "LIQUID", "--json")
    (item,) = json.loads(out.stdout)
    return data, item["oid"]


def _copy_on_b(served: dict[str, Any], name: str) -> bytes | None:
    shown = json.loads(run(served["env"], "items", "show", name, "--json").stdout)
    on_b = [r for r in shown["replicas"] if r["storage"] == "b" and r["state"] == "READY"]
    return (served["base"] / "b" / on_b[0]["path"]).read_bytes() if on_b else None


def test_prefect_deployment_ls_lists_dlm_deployments(served: dict[str, Any]) -> None:
    out = run(served["env"], "prefect", "deployment", "ls").stdout

    listed = {name for name in SERVED if name in out}
    assert listed == SERVED, out


def test_prefect_deployment_run_is_run_by_dlm_serve(
    served: dict[str, Any], prefect_server: PrefectServer
) -> None:
    data, _oid = _ingest(served, "cli/one.bin")
    assert _copy_on_b(served, "cli/one.bin") is None

    res = run(
        served["env"],
        "prefect", "deployment", "run", "replicate/replicate",
        "--watch", "--watch-timeout", str(RUN_TIMEOUT_S),
        timeout=RUN_TIMEOUT_S + 60,
    )  # fmt: skip

    assert "Completed" in res.stdout, res.stdout + res.stderr
    assert _copy_on_b(served, "cli/one.bin") == data
    # the run is the deployment's, completed, with DLM's artifacts
    (deployment,) = [d for d in api(prefect_server.url, "/deployments/filter") if d["name"] == "replicate"]
    runs = api(prefect_server.url, "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}})
    assert any(r["state_type"] == "COMPLETED" for r in runs), runs
    keys = {a["key"] for a in api(prefect_server.url, "/artifacts/filter")}
    assert {"dlm-replicate-actions", "dlm-replicate-summary"} <= keys


def test_prefect_flow_run_ls_shows_a_dlm_run(served: dict[str, Any], prefect_server: PrefectServer) -> None:
    name = f"ls-{uuid.uuid4().hex[:8]}"
    run(
        served["env"],
        "prefect", "deployment", "run", "expire/expire", "--flow-run-name", name,
        "--watch", "--watch-timeout", str(RUN_TIMEOUT_S),
        timeout=RUN_TIMEOUT_S + 60,
    )  # fmt: skip

    out = run(served["env"], "prefect", "flow-run", "ls", "--limit", "50").stdout

    (line,) = [ln for ln in out.splitlines() if name in ln]
    assert "expire" in line and "COMPLETED" in line, out


def test_rest_create_flow_run_replicates(served: dict[str, Any], prefect_server: PrefectServer) -> None:
    data, oid = _ingest(served, "rest/two.bin")
    (deployment,) = [d for d in api(prefect_server.url, "/deployments/filter") if d["name"] == "replicate"]

    res = subprocess.run(
        [
            "curl", "-sS", "--fail-with-body", "-X", "POST", "-H", "Content-Type: application/json",
            "-d", json.dumps({"parameters": {"items": [oid]}}),
            f"{prefect_server.url}/deployments/{deployment['id']}/create_flow_run",
        ],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    flow_run = json.loads(res.stdout)
    assert flow_run["parameters"] == {"items": [oid]}

    def final() -> dict[str, Any] | None:
        fr = api(prefect_server.url, f"/flow_runs/{flow_run['id']}", method="GET")
        return fr if fr["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    done = poll("the flow run to finish", final, RUN_TIMEOUT_S, served["log"], every=1.0)
    assert done["state_type"] == "COMPLETED", done["state"]
    assert _copy_on_b(served, "rest/two.bin") == data


def test_prefect_deploy_all_from_prefect_yaml(tmp_path: Path) -> None:
    """`prefect deploy --all` from the repository's prefect.yaml: DLM's deployments on the
    `dlm-process` pool, on their schedules, and the item-ready trigger as an automation."""
    with PrefectServer(tmp_path / "prefect") as server:
        pid = server.pid
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "PREFECT_"))}
        env.update(server.client_env(), PREFECT_HOME=str(tmp_path / "client"), COLUMNS="250")
        run(env, "prefect", "work-pool", "create", "dlm-process", "--type", "process")

        run(env, "prefect", "deploy", "--all", "--no-prompt", cwd=REPO, timeout=300)

        assert deployment_names(server.url) == SERVED
        deployments = {d["name"]: d for d in api(server.url, "/deployments/filter")}
        assert {d["work_pool_name"] for d in deployments.values()} == {"dlm-process"}
        crons = {n: [s["schedule"]["cron"] for s in d["schedules"]] for n, d in deployments.items()}
        defaults = ScheduleSettings()
        for pipeline in Pipeline:
            assert crons[pipeline] == [getattr(defaults, PIPELINES[pipeline].schedule)], pipeline
        assert crons["replicate-on-ready"] == []
        automations = api(server.url, "/automations/filter")
        trigger = yaml.safe_load((REPO / "prefect.yaml").read_text())["definitions"]["triggers"]["item_ready"]
        (automation,) = [a for a in automations if a["name"] == trigger["name"]]
        assert automation["trigger"]["expect"] == ["dlm.item.ready"]
        (action,) = automation["actions"]
        assert action["deployment_id"] == deployments["replicate-on-ready"]["id"]
    assert pid is not None and not alive(pid)
