"""The pipelines as Prefect deployments: schedules, the item-ready trigger, prefect.yaml, and `dlm serve`."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.serve import ON_READY, READY_EVENT, READY_PARAMETERS, READY_WINDOW_S, build_deployments
from flows.registry import FLOWS
from lifecycle import settings as settings_mod
from lifecycle.runs import PIPELINES, Pipeline
from lifecycle.settings import ScheduleSettings

REPO = Path(__file__).resolve().parents[2]
# Every pipeline of the registry under its own name, and replicate once more on the ready event.
SERVED = {f"{p}/{p}" for p in Pipeline} | {f"replicate/{ON_READY}"}
TEMPLATE = "{{ event.occurred.isoformat() }}"


# --------------------------------------------------------------------------- build_deployments


def test_build_deployments_has_every_pipeline_on_its_configured_cron(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLM_SCHEDULES__REPLICATE", "*/7 * * * *")
    monkeypatch.setenv("DLM_SCHEDULES__EXPIRE", "15 */2 * * *")
    settings_mod.reset_settings()

    deps = {f"{d.flow_name}/{d.name}": d for d in build_deployments()}

    assert set(deps) == SERVED
    crons = {name: [s.schedule.cron for s in d.schedules] for name, d in deps.items()}  # type: ignore[union-attr]
    assert crons == {
        "replicate/replicate": ["*/7 * * * *"],
        "migrate/migrate": ["0 3 * * *"],
        "expire/expire": ["15 */2 * * *"],
        "rebalance/rebalance": ["30 * * * *"],
        "verify/verify": ["0 4 * * *"],
        "reconcile/reconcile": ["0 5 * * *"],
        f"replicate/{ON_READY}": [],
    }
    # Module entrypoints: the runs import the installed package, whatever the working directory.
    assert {d.entrypoint for d in deps.values()} == {
        *(f"flows.pipelines.{p}" for p in Pipeline if PIPELINES[p].plans),
        "flows.integrity.verify",
        "flows.integrity.reconcile",
    }
    assert all(not d.triggers for name, d in deps.items() if name != f"replicate/{ON_READY}")
    for p, spec in PIPELINES.items():
        assert deps[f"{p}/{p}"].description == spec.description, p


def test_every_pipeline_in_the_registry_has_a_flow_and_a_schedule() -> None:
    """A pipeline added to lifecycle.runs without its flow or its cron setting fails here."""
    assert set(FLOWS) == set(Pipeline) == set(PIPELINES)
    defaults = ScheduleSettings()
    for p, spec in PIPELINES.items():
        assert FLOWS[p].name == spec.name
        assert getattr(defaults, spec.schedule), p
    assert set(ScheduleSettings.model_fields) == {spec.schedule for spec in PIPELINES.values()}


def test_replicate_on_ready_runs_once_per_burst_of_events() -> None:
    (on_ready,) = [d for d in build_deployments() if d.name == ON_READY]
    (trigger,) = on_ready.triggers

    assert trigger.expect == {READY_EVENT}
    assert trigger.match.root == {"prefect.resource.id": "dlm.item.*"}
    assert trigger.parameters == {"ready_since": TEMPLATE, "window_s": READY_WINDOW_S}
    # The automation fires on the first event of a quiet period, then not for READY_WINDOW_S.
    assert trigger.within.total_seconds() == READY_WINDOW_S  # type: ignore[union-attr]
    deployment_id = uuid.uuid4()
    trigger.set_deployment_id(deployment_id)
    automation = trigger.as_automation()
    (action,) = automation.actions
    assert action.deployment_id == deployment_id  # type: ignore[union-attr]
    assert action.parameters == READY_PARAMETERS  # type: ignore[union-attr]
    assert automation.trigger.threshold == 1  # type: ignore[union-attr]


# --------------------------------------------------------------------------- prefect.yaml


@pytest.fixture
def prefect_yaml() -> dict[str, Any]:
    doc = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert isinstance(doc, dict)
    return doc


def test_prefect_yaml_deploys_the_same_pipelines_through_its_anchors(prefect_yaml: dict[str, Any]) -> None:
    defs = prefect_yaml["definitions"]
    pool = defs["work_pools"]["process"]
    deps = {d["name"]: d for d in prefect_yaml["deployments"]}

    assert {f"{d['entrypoint'].rsplit(':', 1)[1]}/{n}" for n, d in deps.items()} == SERVED
    assert pool["name"] == "dlm-process"
    defaults = ScheduleSettings()
    for name, d in deps.items():
        # An alias loads as the very object its anchor defines.
        assert d["work_pool"] is pool, name
        if name == ON_READY:
            assert "schedules" not in d
            continue
        (schedule,) = d["schedules"]
        assert schedule is defs["schedules"][name], name
        assert schedule["cron"] == getattr(defaults, name), f"{name}: prefect.yaml and settings disagree"
        assert d["description"] == PIPELINES[Pipeline(name)].description, name
    (trigger,) = deps[ON_READY]["triggers"]
    assert trigger is defs["triggers"]["item_ready"]
    assert trigger["expect"] == [READY_EVENT]
    assert trigger["parameters"] == READY_PARAMETERS
    assert trigger["within"] == READY_WINDOW_S
    (pull,) = prefect_yaml["pull"]
    assert "directory" in pull["prefect.deployments.steps.set_working_directory"]


def test_prefect_yaml_loads_in_prefect_and_its_entrypoints_are_the_flows(
    prefect_yaml: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers
    from prefect.flows import Flow, load_flow_from_entrypoint
    from rich.console import Console

    # The loader `prefect deploy` uses (private, so pinned with prefect): it prints and skips
    # what does not validate, so nothing printed means every deployment is accepted.
    said = io.StringIO()
    configs, actions = _load_deploy_configs_and_actions(REPO / "prefect.yaml", console=Console(file=said))
    assert said.getvalue() == ""
    assert len(configs) == len(prefect_yaml["deployments"]) == len(SERVED)
    assert actions["pull"]
    for config in configs:
        for trigger in _initialize_deployment_triggers(config["name"], config.get("triggers") or []):
            assert trigger.expect == {READY_EVENT}

    monkeypatch.chdir(REPO)
    for d in prefect_yaml["deployments"]:
        flow = load_flow_from_entrypoint(d["entrypoint"])
        assert isinstance(flow, Flow)
        assert flow.name == d["entrypoint"].rsplit(":", 1)[1]
        # the entrypoint is where the registry's flow of that name is defined
        served = FLOWS[Pipeline(flow.name)]
        source = Path(inspect.getsourcefile(served.fn) or "").relative_to(REPO)
        assert d["entrypoint"] == f"{source}:{served.fn.__name__}"


# --------------------------------------------------------------------------- dlm serve, end to end

READY_TIMEOUT_S = 120.0  # a first start of the Prefect server migrates its database (~20 s)
REPLICATE_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 60.0


def _api(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def _poll(what: str, check: Callable[[], Any], timeout: float, log: Path, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(every)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:]) if log.exists() else ""
    pytest.fail(f"{what}: not within {timeout:.0f}s; end of `dlm serve` output:\n{tail}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def estate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A DLM home on SQLite (here and in the `dlm` subprocesses) and the subprocesses' environment."""
    home = tmp_path / "home"
    monkeypatch.setenv("DLM_HOME", str(home))
    settings_mod.reset_settings()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "PREFECT_"))}
    env.update(
        DLM_HOME=str(home),
        DLM_OWNER="tester",
        COLUMNS="200",
        # the `dlm` clients' own Prefect state, away from the user's ~/.prefect
        PREFECT_HOME=str(tmp_path / "client-prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return {"home": home, "env": env}


def _dlm(estate: dict[str, Any], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [sys.executable, "-m", "dlm.cli", *args],
        env=estate["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, f"dlm {' '.join(args)}: {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


@pytest.fixture
def dlm_serve(estate: dict[str, Any], tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`dlm serve` as a real subprocess; every process it started is gone afterwards."""
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dlm.cli", "serve"],
            env=estate["env"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its flow runs share its group: one kill reaches all
        )
    pid_file = estate["home"] / "prefect" / "server.pid"
    server_pid: list[int] = []
    try:
        server_pid += [int(_poll("the Prefect server's pid", pid_file.read_text, READY_TIMEOUT_S, log))]
        yield {"proc": proc, "log": log, "server_pid": server_pid[0]}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(STOP_TIMEOUT_S)
        _kill_group(proc.pid)
        proc.wait(10)
        for pid in server_pid:  # the server runs in a session of its own
            _kill_group(pid)


@pytest.mark.prefect
def test_serve_replicates_an_item_as_soon_as_ingest_announces_it(
    estate: dict[str, Any], dlm_serve: dict[str, Any], tmp_path: Path, rclone_path: str
) -> None:
    from flows.events import api_url_file

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        _dlm(estate, "storage", "add", name, "--kind", "posix", "--root", str(tmp_path / name))
    log: Path = dlm_serve["log"]
    url_file = api_url_file()  # where `dlm ingest` looks for the server
    url = _poll("the api-url file", lambda: url_file.read_text().strip(), READY_TIMEOUT_S, log)

    def served() -> bool:
        deps = _api(url, "/deployments/filter")
        names = {d["name"] for d in deps if not d["paused"]}
        automations = _api(url, "/automations/filter")
        return names == {n.split("/")[1] for n in SERVED} and any(
            READY_EVENT in a["trigger"].get("expect", []) for a in automations
        )

    _poll("the deployments and the item-ready automation", served, READY_TIMEOUT_S, log)

    payload = tmp_path / "payload.bin"
    payload.write_bytes(os.urandom(64 * 1024) + b"dlm serve end to end")
    ingest = _dlm(
        estate, "ingest", "--storage", "a", "--upload", str(payload), "--name", "e2e/payload.bin",
        "--phase", "LIQUID", "--json",
    )  # fmt: skip
    assert len(json.loads(ingest.stdout)) == 1  # one new item, announced

    def two_ready() -> dict[str, Any] | None:
        shown = json.loads(_dlm(estate, "items", "show", "e2e/payload.bin", "--json").stdout)
        ready = {r["storage"]: r for r in shown["replicas"] if r["state"] == "READY"}
        return ready if set(ready) == {"a", "b"} else None

    replicas = _poll("a second READY replica", two_ready, REPLICATE_TIMEOUT_S, log, every=1.0)
    assert (tmp_path / "b" / replicas["b"]["path"]).read_bytes() == payload.read_bytes()
    # The event started the replicate-on-ready deployment, with the time of the burst it
    # coalesces (the run replicates every READY item once that window has closed).
    runs = _api(url, "/flow_runs/filter", {"deployments": {"name": {"any_": [ON_READY]}}})
    assert runs and all(r["parameters"].get("ready_since") for r in runs), runs

    proc: subprocess.Popen[bytes] = dlm_serve["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(STOP_TIMEOUT_S) == 0
    assert not url_file.exists()
    # The DLM home's Prefect server outlives `dlm serve` (with its history); `dlm server stop` stops it.
    assert _alive(dlm_serve["server_pid"])
    _dlm(estate, "server", "stop")
    _poll("the Prefect server to stop", lambda: not _alive(dlm_serve["server_pid"]), 20, log)
    assert "dlm serve stopped" in log.read_text()
