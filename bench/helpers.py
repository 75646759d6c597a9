"""Helpers the benchmark cases share: a child process per measured step, its peak RSS, a server
process's CPU time, and a PostgreSQL catalogue's size on disk."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def peak_rss_mb() -> float:
    """This process's own peak RSS since exec (VmHWM). ru_maxrss is not used: Linux carries the
    forking parent's RSS over into it, so it would count the benchmark's own memory."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds(pid: Any) -> float | None:
    """User and system CPU seconds of a process on this host, or None if it cannot be read."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _host_busy_s() -> float:
    """CPU seconds this host's cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _programs_cpu_s(names: tuple[str, ...]) -> dict[str, float]:
    """CPU seconds of the live processes of this host per program name (/proc/PID/comm)."""
    out = dict.fromkeys(names, 0.0)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in out:
            out[comm] += cpu_seconds(entry.name) or 0.0
    return out


@contextlib.contextmanager
def cpu_meter(programs: tuple[str, ...] = ("postgres", "weed")) -> Iterator[dict[str, float]]:
    """CPU seconds spent during the block, filled in at its end: `self` (this process),
    `children` (its child processes that ended, e.g. rclone), each of `programs` (its live
    processes, e.g. the database and S3 servers), `host` (every core of the host busy) and
    `cores` (the host's); so a run whose host was busy all along (host close to cores x wall)
    shows whose work filled it."""
    out: dict[str, float] = {}
    me0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    progs0, host0 = _programs_cpu_s(programs), _host_busy_s()
    try:
        yield out
    finally:
        me1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        progs1, host1 = _programs_cpu_s(programs), _host_busy_s()
        out["self"] = me1.ru_utime + me1.ru_stime - me0.ru_utime - me0.ru_stime
        out["children"] = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
        out.update({p: progs1[p] - progs0[p] for p in programs})
        out["host"] = host1 - host0
        out["cores"] = float(os.cpu_count() or 1)


def run_child(module: str, *args: str, what: str = "child") -> dict[str, Any]:
    """Run `python -m module --child args...` (this tree first on the path) and return the JSON
    object its last line of output prints. Raises RuntimeError with its stderr if it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", module, "--child", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def pg_sizes(url: str, tables: tuple[str, ...] = ("item", "replica", "event")) -> dict[str, int]:
    """Bytes on disk of the database (pg_database_size) and of each table with its indexes and
    TOAST (pg_total_relation_size), keyed "database" and the table names."""
    import psycopg

    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")  # dirty buffers to disk, so the files hold what was written
        out = {"database": conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]}  # type: ignore[index]
        for table in tables:
            out[table] = conn.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchone()[0]  # type: ignore[index]
    return out


REPO = Path(__file__).resolve().parents[1]


def dlm_env(base: Path, url: str) -> dict[str, str]:
    """The environment of a `dlm` process a case runs as a user: a DLM home and Prefect client
    home under `base`, catalogue `url`, this checkout importable; no DLM_/PREFECT_ leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "PREFECT_"))}
    env.update(
        DLM_HOME=str(base / "home"),
        DLM_DATABASE_URL=url,
        DLM_OWNER="bench",
        PREFECT_HOME=str(base / "client-prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    return env


def _spy(out: str, name: str) -> list[str]:
    spy = str(Path(sys.executable).with_name("py-spy"))
    return [spy, "record", "--rate", "250", "--idle", "--format", "raw", "-o", f"{out}/{name}.txt"]


def profiled(argv: list[str], name: str) -> list[str]:
    """`argv` as is, or, when DLM_BENCH_PROFILE names a directory, run under py-spy (sampling
    at 250 Hz, idle threads included) writing collapsed stacks to <dir>/<name>.txt, for
    `python -m bench.profile_top` to summarise. Profiling slows the run: its figures are not
    the benchmark's."""
    out = os.environ.get("DLM_BENCH_PROFILE")
    if not out:
        return argv
    Path(out).mkdir(parents=True, exist_ok=True)
    return [*_spy(out, name), "--", *argv]


@contextlib.contextmanager
def profiling(name: str) -> Iterator[None]:
    """Profile this process for the duration of the block (py-spy attached to it, idle threads
    included) when DLM_BENCH_PROFILE names a directory: collapsed stacks to <dir>/<name>.txt,
    as profiled() writes them."""
    out = os.environ.get("DLM_BENCH_PROFILE")
    if not out:
        yield
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    argv = [*_spy(out, name), "--pid", str(os.getpid())]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached before the block starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file as it stops
        proc.wait(timeout=60)
