"""Times `dlm run replicate` with nothing to do (steady state), as a user runs it: a `dlm`
process on a SQLite catalogue whose items all have their copies, against the DLM home's
long-lived Prefect server; also with `--dry-run` (a plan without Prefect), and while `dlm serve`
runs. Such a run finds it has nothing to do without Prefect and starts no flow run (the case
checks that it says so).

Reference, in the same run: `python -c "import prefect"` (the floor of every run that starts a
flow). Target: each median at most 2 s.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TARGET_S = 2.0
REPEAT = 5
DLM = [sys.executable, "-m", "dlm.cli"]


def _wall(argv: list[str], env: dict[str, str], repeat: int = REPEAT) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, check=False)
        times.append(time.perf_counter() - started)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {res.returncode}\n{res.stdout}\n{res.stderr}")
    return times


def _dlm(env: dict[str, str], *args: str) -> str:
    res = subprocess.run([*DLM, *args], env=env, capture_output=True, text=True, timeout=300, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"dlm {' '.join(args)}: exit {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res.stdout


def _estate(base: Path, items: int) -> dict[str, str]:
    """A DLM home with two posix storages and `items` LIQUID items, replicated once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "PREFECT_"))}
    env.update(DLM_HOME=str(base / "home"), DLM_OWNER="bench", PREFECT_HOME=str(base / "client-prefect"))
    _dlm(env, "init")
    for name in ("a", "b"):
        (base / name).mkdir()
        _dlm(env, "storage", "add", name, "--kind", "posix", "--root", str(base / name))
    files = []
    for i in range(items):
        path = base / "a" / "idle" / f"f{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(1024))
        files.append(str(path))
    for start in range(0, len(files), 200):
        _dlm(env, "ingest", "--storage", "a", "--phase", "LIQUID", *files[start : start + 200])
    return env


def _wait_serving(home: Path, since: datetime, timeout: float = 180) -> None:
    """Until `dlm serve` serves (its runner has polled the replicate deployment since `since`):
    the steady state, not its start-up, which shares the CPU with the runs timed."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        announced = home / "prefect-api-url"
        if announced.exists():
            url = announced.read_text().strip()
            try:
                found = httpx.get(f"{url}/deployments/name/replicate/replicate", timeout=5)
                polled = found.json().get("last_polled") if found.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                polled = None
            if polled and datetime.fromisoformat(polled.replace("Z", "+00:00")) > since:
                return
        time.sleep(0.5)
    raise RuntimeError(f"dlm serve did not start serving within {timeout:g} s")


def _row(backend: str, times: list[float], reference: float, note: str) -> dict[str, Any]:
    median = statistics.median(times)
    return {
        "case": "run_idle",
        "backend": backend,
        "metrics": {"median s": round(median, 3), "min s": round(min(times), 3), "runs": len(times)},
        "reference": f"`python -c 'import prefect'`, median of {REPEAT} in the same run; {note}",
        "reference_value": round(reference, 3),
        "ratio": round(median / reference, 2),
        "targets": {f"median <= {TARGET_S:g} s": median <= TARGET_S},
    }


def run(scale: float) -> list[dict[str, Any]]:
    from deployments.server import stop_home_server

    items = max(10, int(1000 * scale))
    with tempfile.TemporaryDirectory(prefix="dlm-bench-idle-") as tmp:
        base = Path(tmp)
        env = _estate(base, items)
        home = Path(env["DLM_HOME"])
        try:
            started = time.perf_counter()
            first = _dlm(env, "run", "replicate")  # starts the home's server, copies everything
            first_s = time.perf_counter() - started
            if f"copied {items}" not in first:
                raise RuntimeError(f"the first run did not copy the {items} items:\n{first}")
            again = _dlm(env, "run", "replicate")
            if "nothing to do" not in again:
                raise RuntimeError(f"a second run did not find it had nothing to do:\n{again}")
            reference = statistics.median(_wall([sys.executable, "-c", "import prefect"], env))
            idle = _wall([*DLM, "run", "replicate"], env)
            dry = _wall([*DLM, "run", "replicate", "--dry-run"], env)
            since = datetime.now(UTC)
            serve = subprocess.Popen(
                [*DLM, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            try:
                _wait_serving(home, since)
                served = _wall([*DLM, "run", "replicate"], env)
            finally:
                serve.terminate()
                serve.wait(60)
        finally:
            stop_home_server(home)
    note = f"{items} items at their target; the first run (server start and copies) took {first_s:.1f} s"
    return [
        _row("home server", idle, reference, note),
        _row("home server, --dry-run", dry, reference, note),
        _row("while dlm serve runs", served, reference, note),
    ]
