"""Times `dlm run replicate` as a user runs it, 5,000 files of 4 KiB posix to posix, against
bare `rclone copy` of the same files.

A fresh DLM home (temporary directory) on a fresh PostgreSQL catalogue, two posix storages a and
b, the files bulk-registered LIQUID on a (`dlm ingest --from-list`), so each needs a second copy
on b; the home's Prefect server is started first (`dlm server start`), as it is on any machine
where DLM has run before, and it serves one untimed run first (20 other files, under warm/,
left out of the bare copies). Then one `dlm run replicate --json` process is timed, wall clock, and
the same command with nothing left to do (median of 3) is subtracted: what is left is the
replication's cost, without Python's and the CLI's start-up that every command pays.

Reference, in the same run: bare `rclone copy SRC DST --transfers N` (N = DLM's transfers) of
storage a's tree to a fresh directory, the mean of one run before DLM's and one after. Checks
that every item has a READY replica on b and that a sample of them equals the source byte for
byte.
"""

from __future__ import annotations

import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.helpers import REPO, dlm_env, profiled

DLM = [sys.executable, "-m", "dlm.cli"]
FILES = 5_000
FILE_SIZE = 4 * 1024
TARGET_VS_RCLONE = 1.3
IDLE_REPEAT = 3
# A first, untimed run copies WARM_FILES other files (under WARM/ on a, left out of the bare
# copies), so the timed run is not the first the server serves, as on a machine where DLM ran.
WARM = "warm"
WARM_FILES = 20
SAMPLE = 50


def _dlm(
    env: dict[str, str], *args: str, timeout: float = 1800, profile: str | None = None
) -> tuple[str, float]:
    """(stdout, wall seconds) of one `dlm` process (under py-spy as `profile`, see profiled)."""
    argv = profiled([*DLM, *args], profile) if profile else [*DLM, *args]
    started = time.perf_counter()
    res = subprocess.run(
        argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    seconds = time.perf_counter() - started
    if res.returncode != 0:
        raise RuntimeError(f"dlm {' '.join(args)}: exit {res.returncode}\n{res.stdout}\n{res.stderr[-3000:]}")
    return res.stdout, seconds


def _files(root: Path, n: int, folder: str = "repl", seed: int = 11) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        name = f"{folder}/d{i // 1000:02d}/f{i:05d}.bin"
        data = rng.randbytes(FILE_SIZE)
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append({"name": name, "size": FILE_SIZE, "checksum": hashlib.md5(data).hexdigest()})
    return rows


def _bare(src: Path, dst: Path, transfers: int) -> float:
    from lifecycle.transfer.binary import rclone_binary

    argv = [
        rclone_binary(),
        "copy",
        f"{src}/",
        f"{dst}/",
        "--transfers",
        str(transfers),
        "--exclude",
        f"{WARM}/**",
    ]
    started = time.perf_counter()
    proc = subprocess.run(argv, env={**os.environ, "RCLONE_CONFIG": ""}, capture_output=True, check=False)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"bare rclone failed: {proc.stderr.decode()[-2000:]}")
    return seconds


def _stage_summary(report: dict[str, Any]) -> str:
    from bench.cases.replicate_small import stage_summary

    return stage_summary(report)


def run(scale: float) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    from devrig.postgres import fresh_postgres_database
    from lifecycle.settings import get_settings

    n = max(10, int(FILES * scale))
    transfers = get_settings().transfer.transfers
    with (
        tempfile.TemporaryDirectory(prefix="dlm-bench-rposix-") as tmp,
        fresh_postgres_database("dlm_bench_rposix") as url,
    ):
        base = Path(tmp)
        env = dlm_env(base, url)
        _dlm(env, "init")
        for name in ("a", "b"):
            (base / name).mkdir()
            _dlm(env, "storage", "add", name, "--kind", "posix", "--root", str(base / name))
        warm = base / "warm.jsonl"
        warm.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in _files(base / "a", WARM_FILES, WARM, 3)))
        rows = _files(base / "a", n)
        listing = base / "list.jsonl"
        listing.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
        try:
            _dlm(env, "ingest", "--storage", "a", "--phase", "LIQUID", "--from-list", str(warm))
            _dlm(env, "server", "start", timeout=300)
            _dlm(env, "run", "replicate")
            _dlm(env, "ingest", "--storage", "a", "--phase", "LIQUID", "--from-list", str(listing))
            _bare(base / "a", base / "warmup", transfers)
            bare_before = _bare(base / "a", base / "bare1", transfers)
            out, dlm_s = _dlm(env, "run", "replicate", "--json", profile="replicate_posix")
            report = orjson.loads(out)
            idle = []
            for _ in range(IDLE_REPEAT):
                again, seconds = _dlm(env, "run", "replicate")
                if "nothing to do" not in again:
                    raise RuntimeError(f"a second run did not find it had nothing to do:\n{again}")
                idle.append(seconds)
            bare_after = _bare(base / "a", base / "bare2", transfers)
        finally:
            _dlm(env, "server", "stop", timeout=120)
        engine = sa.create_engine(url)
        with engine.connect() as c:
            ready = (
                int(
                    c.execute(
                        sa.text(
                            "SELECT count(*) FROM replica r JOIN storage s ON s.id = r.storage_id "
                            "WHERE s.name = 'b' AND r.state = 'READY'"
                        )
                    ).scalar_one()
                )
                - WARM_FILES
            )
            paths = [p for (p,) in c.execute(sa.text("SELECT r.path FROM replica r JOIN storage s "
                                                       "ON s.id = r.storage_id WHERE s.name = 'b' "
                                                       "AND r.state = 'READY'"))]  # fmt: skip
        paths = [p for p in paths if not p.startswith(f"{WARM}/")]
        engine.dispose()
        sample = random.Random(5).sample(paths, min(SAMPLE, len(paths)))
        same = sum((base / "a" / p).read_bytes() == (base / "b" / p).read_bytes() for p in sample)
    idle_s = statistics.median(idle)
    net = dlm_s - idle_s
    bare = (bare_before + bare_after) / 2
    return [
        {
            "case": "replicate_posix",
            "backend": "dlm run, postgresql",
            "metrics": {
                "files": n,
                "dlm run s": round(dlm_s, 2),
                "idle run s": round(idle_s, 2),
                "seconds": round(net, 2),
                "files_per_s": round(n / net, 1),
                "ready_b_replicas": ready,
                "failed_copies": report.get("failed", 0),
                "bytes ok": f"{same}/{len(sample)}",
            },
            "reference": (
                f"bare `rclone copy SRC/ DST/ --transfers {transfers}` of storage a's tree to a fresh "
                f"directory, mean of one run before DLM's and one after ({bare_before:.2f} s, "
                f"{bare_after:.2f} s); DLM's seconds = one `dlm run replicate` process minus the median "
                f"of {IDLE_REPEAT} runs with nothing to do ({', '.join(f'{t:.2f}' for t in idle)} s); "
                f"an untimed run copied {WARM_FILES} other files first (left out of the bare copies). "
                f"{_stage_summary(report)}"
            ),
            "reference_value": round(bare, 3),
            "ratio": round(net / bare, 2),
            "targets": {
                f"DLM / bare rclone <= {TARGET_VS_RCLONE}": net / bare <= TARGET_VS_RCLONE,
                "no failed copies": not report.get("failed"),
                f"all {n:,} items have a READY replica on b": ready == n,
                f"{len(sample)} sampled copies match byte for byte": len(sample) > 0 and same == len(sample),
            },
        }
    ]
