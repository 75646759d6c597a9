"""One long-lived Prefect server per DLM home: `dlm run` starts it on first use and reuses it,
`dlm server start|stop|status` manage it, `dlm serve` serves on it. Real processes throughout;
every server a test starts is stopped by its pid (tests/deployments/conftest.py `dlm_env`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from deployments.server import alive, free_port, server_files
from devrig.prefect_server import PrefectServer
from tests.deployments.conftest import DLM, SERVED, api, deployment_names, poll, run, start_serve, stop_serve

pytestmark = pytest.mark.prefect


def _status(env: dict[str, str]) -> dict[str, Any]:
    return dict(json.loads(run(env, "server", "status", "--json", check=False).stdout))


def _cli_runs(url: str, flow: str = "replicate") -> list[dict[str, Any]]:
    """The runs of `flow` that `dlm run` made (not a deployment's, scheduled or not)."""
    body = {"flows": {"name": {"any_": [flow]}}, "flow_runs": {"deployment_id": {"is_null_": True}}}
    return list(api(url, "/flow_runs/filter", body))


def _work_for_replicate(env: dict[str, str], root: Path, name: str, size: int = 2048) -> None:
    """One more LIQUID item on posix storage 'a' (storages 'a' and 'b' under `root`, added on
    first use): a `dlm run replicate` then has a copy to make, so it starts a flow run (with
    nothing to do it starts none)."""
    for storage in ("a", "b"):
        if not (root / storage).exists():
            (root / storage).mkdir(parents=True)
            run(env, "storage", "add", storage, "--kind", "posix", "--root", str(root / storage))
    (root / "a" / name).write_bytes(os.urandom(size))
    run(env, "ingest", "--storage", "a", str(root / "a" / name), "--phase", "LIQUID")


def test_runs_share_one_home_server_started_on_first_use(dlm_env: dict[str, str], tmp_path: Path) -> None:
    home = Path(dlm_env["DLM_HOME"])
    run(dlm_env, "init")
    _work_for_replicate(dlm_env, tmp_path, "x1.bin")
    assert _status(dlm_env)["running"] is False

    # two runs at once on a fresh home: one server starts, both use it
    procs = [
        subprocess.Popen(
            [*DLM, "run", "replicate"], env=dlm_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, (out, err)
        text = err.decode()
        # no Prefect INFO lines, no telemetry errors: only DLM's report
        assert "telemetry" not in text.lower() and "| INFO" not in text, text
    # both planned the copy and started a flow; one made it, the other found it done
    assert sorted(b"copied 1" in out for out, _ in outs) == [False, True], outs
    status = _status(dlm_env)
    assert status["running"] and status["answering"], status
    pid, url = status["pid"], status["url"]
    assert server_files(home).pid.read_text().strip() == str(pid)
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":4200/api")
    runs = _cli_runs(url)
    assert len(runs) == 2 and {r["state_type"] for r in runs} == {"COMPLETED"}, runs

    # later runs reuse it (no second server); -v shows Prefect's own lines
    _work_for_replicate(dlm_env, tmp_path, "x2.bin")
    again = run(dlm_env, "-v", "run", "replicate")
    assert "Finished in state Completed" in again.stderr, again.stderr
    assert _status(dlm_env)["pid"] == pid
    assert len(_cli_runs(url)) == 3

    stopped = run(dlm_env, "server", "stop")
    assert f"pid {pid}" in stopped.stdout
    assert not alive(pid)
    after = run(dlm_env, "server", "status", check=False)
    assert after.returncode == 1 and "no Prefect server runs" in after.stdout
    assert not server_files(home).url.exists()


def test_server_start_on_a_port_serves_the_ui_for_that_address(dlm_env: dict[str, str]) -> None:
    port = free_port()
    started = run(dlm_env, "server", "start", "--port", str(port))
    url = f"http://127.0.0.1:{port}/api"
    assert f"API {url}" in started.stdout and f"UI http://127.0.0.1:{port}" in started.stdout
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as resp:
        settings = json.load(resp)
    assert settings["api_url"] == url
    pid = _status(dlm_env)["pid"]

    # asked again on another port: refused, one line, the server left alone
    other = run(dlm_env, "server", "start", "--port", str(free_port()), check=False)
    assert other.returncode == 1 and other.stderr.count("\n") == 1, other.stderr
    assert f"already runs at {url}" in other.stderr
    assert run(dlm_env, "server", "start").stdout.startswith("Prefect server already running")

    # a server killed hard leaves stale files: the next run starts a new one
    os.killpg(pid, signal.SIGKILL)
    poll("the killed server to go", lambda: not alive(pid), 20)
    run(dlm_env, "run", "verify")  # (verify always starts a flow run)
    status = _status(dlm_env)
    assert status["answering"] and status["pid"] != pid


def test_serve_serves_on_the_home_server_and_leaves_it_running(
    dlm_env: dict[str, str], tmp_path: Path
) -> None:
    started = run(dlm_env, "server", "start")
    status = _status(dlm_env)
    url, pid = status["url"], status["pid"]
    assert f"API {url}" in started.stdout
    log = tmp_path / "serve.log"
    serve = start_serve(dlm_env, log)
    try:
        poll("the served deployments", lambda: deployment_names(url) >= SERVED, 120, log)
        # a second `dlm serve` for the same home is refused
        second = run(dlm_env, "serve", check=False, timeout=120)
        assert second.returncode == 1 and "already running for this DLM home" in second.stderr, second
        # `dlm run` while serving: the same server (verify always starts a flow run)
        run(dlm_env, "run", "verify")
        assert len(_cli_runs(url, "verify")) == 1
    finally:
        code = stop_serve(serve)
    assert code == 0, log.read_text()
    assert f"Prefect UI: {url.removesuffix('/api')}" in log.read_text()
    # the server outlives `dlm serve`, with its history
    assert alive(pid) and _status(dlm_env)["answering"]
    assert len(_cli_runs(url, "verify")) == 1


def _which_server(env: dict[str, str]) -> str:
    """The API URL a fresh `dlm` process would use, without starting a server."""
    code = "import os, pathlib; from deployments.server import api_url_for; "
    code += "print(api_url_for(pathlib.Path(os.environ['DLM_HOME']), start=False))"
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return res.stdout.strip()


def test_the_server_a_command_uses_env_then_profile_then_dlm_serve(
    dlm_env: dict[str, str], prefect_server: PrefectServer, tmp_path: Path
) -> None:
    home = Path(dlm_env["DLM_HOME"])
    home.mkdir(parents=True)
    assert _which_server(dlm_env) == ""  # none configured, none running, none started

    # a running `dlm serve` announced its server
    (home / "prefect-api-url").write_text(prefect_server.url + "\n")
    assert _which_server(dlm_env) == prefect_server.url
    # ... but one that died is not used
    (home / "prefect-api-url").write_text(f"http://127.0.0.1:{free_port()}/api\n")
    assert _which_server(dlm_env) == ""

    # the active Prefect profile's PREFECT_API_URL comes before it
    profiles = Path(dlm_env["PREFECT_HOME"]) / "profiles.toml"
    profiles.parent.mkdir(parents=True)
    profiles.write_text(
        'active = "ops"\n[profiles.ops]\nPREFECT_API_URL = "http://profile.example:4200/api"\n'
    )
    assert _which_server(dlm_env) == "http://profile.example:4200/api"
    # and the environment before everything
    assert _which_server({**dlm_env, "PREFECT_API_URL": "http://env.example/api"}) == "http://env.example/api"
    assert not server_files(home).pid.exists()  # nothing was started


def test_server_start_on_a_taken_port_is_one_line_and_starts_nothing(dlm_env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run(dlm_env, "server", "start", "--port", str(port), check=False)
    assert res.returncode == 2
    expected = f"dlm: error: cannot start a Prefect server on 127.0.0.1:{port}: the port is in use\n"
    assert res.stderr == expected
    assert not server_files(Path(dlm_env["DLM_HOME"])).pid.exists()


def test_run_against_a_configured_server_that_is_down_is_one_line(
    dlm_env: dict[str, str], tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/api"
    _work_for_replicate(dlm_env, tmp_path, "x.bin")
    res = run({**dlm_env, "PREFECT_API_URL": dead}, "run", "replicate", check=False)
    assert res.returncode == 1
    assert res.stderr == f"dlm: error: no Prefect server answers at {dead} (PREFECT_API_URL)\n"
    assert not server_files(Path(dlm_env["DLM_HOME"])).pid.exists()  # and none was started instead


def test_a_dry_run_plans_without_prefect_and_changes_nothing(dlm_env: dict[str, str], tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        run(dlm_env, "storage", "add", name, "--kind", "posix", "--root", str(tmp_path / name))
    (tmp_path / "a" / "d").mkdir()
    (tmp_path / "a" / "d" / "x.bin").write_bytes(os.urandom(2048))
    run(dlm_env, "ingest", "--storage", "a", str(tmp_path / "a" / "d" / "x.bin"), "--phase", "LIQUID")

    res = run(dlm_env, "run", "replicate", "--dry-run", "--json")

    report = json.loads(res.stdout)
    assert report["dry_run"] is True and report["plan"]["copies"] == 1
    (action,) = report["actions"]
    assert (action["action"], action["from"], action["to"], action["bytes"]) == ("copy", "a", "b", 2048)
    assert list((tmp_path / "b").rglob("*.bin")) == []  # nothing copied
    assert not server_files(Path(dlm_env["DLM_HOME"])).pid.exists()  # no Prefect server needed
    code = "import sys; from dlm.cli import main\ntry: main(sys.argv[1:])\nexcept SystemExit: pass\n"
    code += "print('prefect' in sys.modules)"
    probe = subprocess.run(
        [sys.executable, "-c", code, "run", "expire", "--dry-run", "--json"],
        env=dlm_env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert probe.stdout.strip().endswith("False"), probe.stdout


def test_a_run_with_nothing_to_do_needs_no_server(dlm_env: dict[str, str], tmp_path: Path) -> None:
    _work_for_replicate(dlm_env, tmp_path, "x.bin")
    run(dlm_env, "items", "set-phase", "x.bin", "GAS")  # one copy is enough now: nothing to do
    dead = f"http://127.0.0.1:{free_port()}/api"

    idle = run({**dlm_env, "PREFECT_API_URL": dead}, "run", "replicate")  # nothing to do

    assert "nothing to do: no flow run started" in idle.stdout and idle.stderr == ""
    assert _status(dlm_env)["running"] is False  # no server was started for it
    code = "import sys; from dlm.cli import main\ntry: main(sys.argv[1:])\nexcept SystemExit: pass\n"
    code += "print('prefect' in sys.modules)"
    probe = subprocess.run(
        [sys.executable, "-c", code, "run", "migrate", "--json"],
        env=dlm_env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert '"nothing_to_do": true' in probe.stdout and probe.stdout.strip().endswith("False"), probe.stdout


def test_a_run_killed_holding_slots_blocks_no_later_run_and_ends_crashed(
    dlm_env: dict[str, str], tmp_path: Path
) -> None:
    """kill -9 a `dlm run` while its batch holds the storages' only slots (leased for 10 min, so
    the server's repossessor cannot be what frees them): the next run releases them and copies
    everything at once, and the killed run shows Crashed, not Running."""
    env = {**dlm_env, "DLM_TRANSFER__STORAGE_SLOTS": "1", "DLM_TRANSFER__SLOT_LEASE_S": "600"}
    for i in range(12):  # a batch of 4 takes about 13 s at RCLONE_BWLIMIT below
        _work_for_replicate(env, tmp_path, f"k{i:02d}.bin", size=64 * 1024)
    run(env, "server", "start")
    url = _status(env)["url"]
    slow = {**env, "RCLONE_BWLIMIT": "20k", "DLM_TRANSFER__BATCH_FILES": "4", "DLM_TRANSFER__TRANSFERS": "1"}
    killed = subprocess.Popen(
        [*DLM, "run", "replicate"],
        env=slow,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # rclone too
    )
    try:
        poll(
            "the first run's batch to hold the slots",
            lambda: api(url, "/v2/concurrency_limits/storage:a", method="GET")["active_slots"] == 1,
            120,
        )
        (victim,) = _cli_runs(url)
        assert victim["state_type"] == "RUNNING"
        # and the server to have recorded its running copy task (task runs arrive as events,
        # sent in the background: a process killed too soon leaves no task run to clean up)
        running = {
            "flow_runs": {"id": {"any_": [victim["id"]]}},
            "task_runs": {"state": {"type": {"any_": ["RUNNING"]}}},
        }
        poll(
            "the server to record the batch's task run",
            lambda: bool(api(url, "/task_runs/filter", running)),
            60,
        )
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.communicate(timeout=30)

    started = time.monotonic()
    res = run({**env, "DLM_TRANSFER__SLOT_WAIT_S": "30"}, "run", "replicate", "--json")
    took = time.monotonic() - started

    report = json.loads(res.stdout)
    assert report["failed"] == 0 and report["below_target_after"] == 0, report
    assert took < 30, f"the next run took {took:.0f}s: it waited for the killed run's slots"
    for i in range(12):  # every second copy is there, whole
        name = f"k{i:02d}.bin"
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()
    for storage in ("a", "b"):  # no slot left taken
        assert api(url, f"/v2/concurrency_limits/storage:{storage}", method="GET")["active_slots"] == 0
    runs = {r["id"]: r for r in _cli_runs(url)}
    assert runs[victim["id"]]["state_type"] == "CRASHED", runs[victim["id"]]["state"]
    assert "is gone" in runs[victim["id"]]["state"]["message"]
    tasks = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [victim["id"]]}}})
    assert tasks and all(t["state_type"] != "RUNNING" for t in tasks), [t["state_type"] for t in tasks]
    assert [r["state_type"] for i, r in runs.items() if i != victim["id"]] == ["COMPLETED"]
    assert list((Path(env["DLM_HOME"]) / "runs").glob("*.json")) == []  # nothing left recorded
