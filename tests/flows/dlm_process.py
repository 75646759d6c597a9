"""Driving `dlm` as a user does, in a subprocess (a flow run never shares this process with
the session's Prefect harness): its environment, a command, `dlm run --json` read back into
its typed report, and the files a storage root holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lifecycle.reports import parse_report


def dlm_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without DLM's and Prefect's settings, DLM_HOME `home`, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "PREFECT_"))}
    env.update(
        DLM_HOME=str(home), DLM_OWNER="tester", COLUMNS="200", PREFECT_SERVER_ANALYTICS_ENABLED="false"
    )
    env.update(extra)
    return env


def dlm(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`dlm ARGS...` in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "dlm.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def run_json(env: dict[str, str], *args: str) -> tuple[dict[str, Any], Any]:
    """`dlm run ARGS... --json`, which must succeed: its JSON and the report parsed from it."""
    res = dlm(env, "run", *args, "--json")
    assert res.returncode == 0, f"dlm run {' '.join(args)}: {res.returncode}\n{res.stdout}\n{res.stderr}"
    data = json.loads(res.stdout)
    report = parse_report(res.stdout)
    assert report.as_json() == data  # the model reads back exactly what the CLI printed
    return data, report


def files(root: Path) -> list[str]:
    """The files under a storage root (DLM's own `.dlm*` files left out), relative, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".dlm" not in p.name)
