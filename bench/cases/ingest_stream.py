"""Items ingested one at a time while `dlm serve` runs: seconds until every item has its second
copy, and how many flow runs that took.

A fresh DLM home (temporary directory) on a fresh PostgreSQL catalogue, two posix storages, and
`dlm serve` as a subprocess (it starts the home's Prefect server). A child process then ingests
1,000 files of 1 KiB (at scale 1) one at a time through the `dlm ingest` command's own function
called in-process (plan, register, then `announce_items_ready`, one `dlm.item.ready` HTTP
request per item), so the loop is not dominated by 1,000 Python start-ups. The case polls the
catalogue until every item has two READY replicas (LIQUID wants two copies), then counts the
flow runs of the `replicate-on-ready` and `replicate` deployments through Prefect's REST API,
and compares a sample of the second copies byte for byte with the originals.

Reference, in the same run: the same number of files ingested in bulk into another fresh home
and catalogue, then one `dlm run replicate` process (on the same Prefect server) timed.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.helpers import REPO, dlm_env

DLM = [sys.executable, "-m", "dlm.cli"]
FILE_SIZE = 1024
SAMPLE = 50  # second copies compared byte for byte
READY_WINDOW_S = 10  # deployments.serve.READY_WINDOW_S: one on-ready run per burst window
DEPLOYMENTS = ("replicate-on-ready", "replicate")
CHILD = "from bench.cases.ingest_stream import _stream_child; _stream_child"


def _dlm(env: dict[str, str], *args: str, timeout: float = 900) -> str:
    res = subprocess.run(
        [*DLM, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"dlm {' '.join(args)}: exit {res.returncode}\n{res.stdout}\n{res.stderr}")
    return res.stdout


def _estate(base: Path, url: str, items: int) -> tuple[dict[str, str], list[str]]:
    """A DLM home on `url` with posix storages a and b, and `items` files of FILE_SIZE on a."""
    env = dlm_env(base, url)
    _dlm(env, "init")
    for name in ("a", "b"):
        (base / name).mkdir()
        _dlm(env, "storage", "add", name, "--kind", "posix", "--root", str(base / name))
    rng = random.Random(7)
    files = []
    for i in range(items):
        path = base / "a" / "stream" / f"d{i // 500:02d}" / f"f{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(FILE_SIZE))
        files.append(str(path))
    return env, files


def _stream_child(listing: str) -> None:
    """In the child: `dlm ingest --storage a --phase LIQUID PATH` per file, in-process; prints
    the wall clock of the first and after the last ingest as JSON."""
    from dlm.commands_catalogue import ingest

    paths = Path(listing).read_text().split("\n")
    sink = open(os.devnull, "w")  # noqa: SIM115 (the command prints one READY line per item)
    saved, sys.stdout = sys.stdout, sink
    first = time.time()
    for p in paths:
        ingest(paths=[p], storage="a", phase="LIQUID", json_=False)
    last = time.time()
    sys.stdout = saved
    print(json.dumps({"first": first, "last": last}), flush=True)


def _copies(engine: Any) -> int:
    """Items with at least two READY replicas."""
    import sqlalchemy as sa

    with engine.connect() as c:
        return int(
            c.execute(
                sa.text(
                    "SELECT count(*) FROM (SELECT item_oid FROM replica WHERE state = 'READY' "
                    "GROUP BY item_oid HAVING count(*) >= 2) t"
                )
            ).scalar_one()
        )


def _flow_runs(api: str) -> Counter[tuple[str, str]]:
    """(deployment name, state type) -> flow runs, for the replicate deployments."""
    import httpx

    with httpx.Client(base_url=api.rstrip("/") + "/", timeout=30) as http:
        deps = http.post("deployments/filter", json={"limit": 200}).raise_for_status().json()
        names = {d["id"]: d["name"] for d in deps if d["name"] in DEPLOYMENTS}
        tally: Counter[tuple[str, str]] = Counter()
        offset = 0
        while True:
            page = (
                http.post(
                    "flow_runs/filter",
                    json={
                        "flow_runs": {"deployment_id": {"any_": list(names)}},
                        "limit": 200,
                        "offset": offset,
                    },
                )
                .raise_for_status()
                .json()
            )
            for r in page:
                tally[(names[r["deployment_id"]], (r.get("state") or {}).get("type", "?"))] += 1
            offset += len(page)
            if len(page) < 200:
                return tally


def _wait_served(api: str, timeout: float = 180) -> None:
    """Until the on-ready deployment and its trigger's automation exist on the server."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            deps = httpx.post(f"{api}/deployments/filter", json={"limit": 200}, timeout=10).json()
            autos = httpx.post(f"{api}/automations/filter", json={}, timeout=10).json()
            if any(d["name"] == DEPLOYMENTS[0] for d in deps) and any(
                DEPLOYMENTS[0] in a["name"] for a in autos
            ):
                return
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        time.sleep(1)
    raise RuntimeError("dlm serve did not register the replicate-on-ready deployment and trigger")


def _check_bytes(engine: Any, base: Path, n: int) -> tuple[int, int]:
    """(sampled second copies whose bytes equal the first's, sampled)."""
    import sqlalchemy as sa

    with engine.connect() as c:
        rows = c.execute(
            sa.text(
                "SELECT sa.name, ra.path, sb.name, rb.path FROM replica ra "
                "JOIN replica rb ON rb.item_oid = ra.item_oid AND rb.storage_id <> ra.storage_id "
                "JOIN storage sa ON sa.id = ra.storage_id JOIN storage sb ON sb.id = rb.storage_id "
                "WHERE sa.name = 'a' AND sb.name = 'b' AND rb.state = 'READY' ORDER BY rb.path"
            )
        ).all()
    sample = random.Random(3).sample(rows, min(n, len(rows)))
    same = sum((base / a / pa).read_bytes() == (base / b / pb).read_bytes() for a, pa, b, pb in sample)
    return same, len(sample)


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()  # dlm serve stops the way Ctrl-C stops it
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def run(scale: float) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    from devrig.postgres import fresh_postgres_database

    items = max(10, int(1000 * scale))
    with (
        tempfile.TemporaryDirectory(prefix="dlm-bench-stream-") as tmp,
        fresh_postgres_database("dlm_bench_stream") as url,
        fresh_postgres_database("dlm_bench_stream_ref") as ref_url,
    ):
        base = Path(tmp) / "stream"
        base.mkdir()
        env, files = _estate(base, url, items)
        listing = base / "files.txt"
        listing.write_text("\n".join(files))
        engine = sa.create_engine(url)
        serve = subprocess.Popen(
            [*DLM, "serve"], env=env, cwd=REPO, stdout=open(base / "serve.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            url_file = base / "home" / "prefect-api-url"
            deadline = time.monotonic() + 180
            while not url_file.exists() and time.monotonic() < deadline:
                if serve.poll() is not None:
                    raise RuntimeError(f"dlm serve exited:\n{(base / 'serve.log').read_text()[-3000:]}")
                time.sleep(0.5)
            api = url_file.read_text().strip()
            _wait_served(api)
            time.sleep(2)  # the trigger reaches the server's event loop
            child = subprocess.Popen(
                [sys.executable, "-c", f"{CHILD}({str(listing)!r})"],
                env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            done_at = None
            deadline = time.monotonic() + 900 + items
            while time.monotonic() < deadline:
                if _copies(engine) >= items:
                    done_at = time.time()
                    break
                if child.poll() is not None and child.returncode != 0:
                    raise RuntimeError(f"the ingest loop failed:\n{child.stderr.read()[-3000:]}")
                time.sleep(0.5)
            out, err = child.communicate(timeout=600)
            if child.returncode != 0:
                raise RuntimeError(f"the ingest loop failed:\n{err[-3000:]}")
            stamps = json.loads(out.strip().splitlines()[-1])
            reached = _copies(engine)
            runs_at_done = _flow_runs(api)
            # let the runs in flight finish before counting them for good
            settle = time.monotonic() + 120
            while time.monotonic() < settle and any(
                state in ("RUNNING", "PENDING") for (_, state) in _flow_runs(api)
            ):
                time.sleep(1)
            runs = _flow_runs(api)
            same, sampled = _check_bytes(engine, base, SAMPLE)
            engine.dispose()
        finally:
            _stop(serve)
        try:
            # reference: the same number of files ingested in bulk, one `dlm run replicate`
            ref_base = Path(tmp) / "bulk"
            ref_base.mkdir()
            ref_env, ref_files = _estate(ref_base, ref_url, items)
            t0 = time.perf_counter()
            for start in range(0, len(ref_files), 500):
                _dlm(
                    ref_env, "ingest", "--storage", "a", "--phase", "LIQUID", *ref_files[start : start + 500]
                )
            bulk_ingest_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = _dlm({**ref_env, "PREFECT_API_URL": api}, "run", "replicate")
            ref_s = time.perf_counter() - t0
            if f"copied {items}" not in report:
                raise RuntimeError(f"the reference run did not copy the {items} items:\n{report}")
        finally:
            _dlm(env, "server", "stop", timeout=120)
    ingest_s = stamps["last"] - stamps["first"]
    all_s = (done_at - stamps["first"]) if done_at else math.nan
    on_ready = sum(n for (name, state), n in runs.items() if name == DEPLOYMENTS[0] and state != "SCHEDULED")
    scheduled = sum(n for (name, state), n in runs.items() if name == DEPLOYMENTS[1] and state != "SCHEDULED")
    failed = sum(n for (_, state), n in runs.items() if state in ("FAILED", "CRASHED"))
    at_done = sum(n for (_, state), n in runs_at_done.items() if state != "SCHEDULED")
    windows = math.ceil(ingest_s / READY_WINDOW_S) + 1
    return [
        {
            "case": "ingest_stream",
            "backend": "postgresql, dlm serve",
            "metrics": {
                "items": items,
                "ingest s": round(ingest_s, 1),
                "ingest/s": round(items / ingest_s, 1) if ingest_s else None,
                "all 2 copies s": round(all_s, 1),
                "after last ingest s": round(all_s - ingest_s, 1),
                "on-ready runs": on_ready,
                "cron runs": scheduled,
                "runs by then": at_done,
                "failed runs": failed,
                "bytes ok": f"{same}/{sampled}",
                "bulk ingest s": round(bulk_ingest_s, 1),
            },
            "reference": (
                f"one `dlm run replicate` process (start-up included) over {items} items ingested in "
                f"bulk (`dlm ingest` of 500 paths at a time) into another fresh home and catalogue, "
                f"same Prefect server (the bulk ingest itself: 'bulk ingest s'); ingest here is "
                f"`dlm ingest`'s function called in-process "
                f"per item, each announced with one dlm.item.ready; ratio = all-copies s / reference"
            ),
            "reference_value": round(ref_s, 1),
            "ratio": round(all_s / ref_s, 2) if done_at else None,
            "targets": {
                "every item has 2 READY copies": reached >= items,
                "sampled second copies equal the originals": sampled > 0 and same == sampled,
                "no failed flow runs": failed == 0,
                f"on-ready runs <= one per {READY_WINDOW_S} s of ingest + 1 ({windows})": on_ready <= windows,
            },
        }
    ]
