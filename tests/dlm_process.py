"""`dlm` as a real subprocess against the test catalogue and the Prefect harness's server: for
the tests that run pipelines (`dlm run ...`), which must not run in-process beside the
Prefect server tests."""

from __future__ import annotations

import os
import subprocess
import sys

DLM = [sys.executable, "-m", "dlm.cli"]


def prefect_api_url() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "the Prefect harness must be running (the flows_env fixture)"
    return str(url)


def run_dlm(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `dlm ARGS` to the end (DLM_OWNER=runner); the catalogue is the test's
    DLM_DATABASE_URL, inherited from the environment."""
    full = {**os.environ, "PREFECT_API_URL": prefect_api_url(), "DLM_OWNER": "runner", **(env or {})}
    return subprocess.run(
        [*DLM, *args], env=full, capture_output=True, text=True, timeout=timeout, check=False
    )
