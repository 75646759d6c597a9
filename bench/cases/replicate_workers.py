"""Times replicate of 20,000 files of 1 KiB on `prefect worker` processes: one worker and one run,
then two workers and one run partitioned in two; prints both times, their ratio, and Prefect's
overhead per copy batch."""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.cases.replicate_small import (
    CREDS,
    Estate,
    Payload,
    build_catalogue,
    environ,
    make_files,
    ready_on,
    s3_server,
    same_bytes,
)

FILES = 20_000
FILE_SIZE = 1024
SAMPLE = 50
TARGET_SPEEDUP = 1.2  # one worker / two workers, at least (on a machine with cores to spare)


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def batch_overhead(server: Any, url: str, run_ids: Sequence[str]) -> tuple[int, float]:
    """(copy batches, mean seconds per batch that Prefect adds): a copy-batch task run's
    duration minus the span the catalogue records for its batch (claimed -> last settled),
    i.e. task orchestration, slot acquisition and release."""
    from sqlalchemy import func, select
    from sqlmodel import col

    from lifecycle.catalogue.db import session_scope
    from lifecycle.catalogue.models import Transfer

    tasks: list[float] = []
    offset = 0
    while True:
        page = server.post(
            "/task_runs/filter",
            {
                "flow_runs": {"id": {"any_": list(run_ids)}},
                "task_runs": {"name": {"like_": "copy-"}},
                "limit": 200,
                "offset": offset,
            },
        )
        for t in page:
            start, end = _ts(t.get("start_time")), _ts(t.get("end_time"))
            if start and end:
                tasks.append((end - start).total_seconds())
        offset += len(page)
        if len(page) < 200:
            break
    with session_scope(url) as s:
        spans = [
            (last - first).total_seconds()
            for first, last in s.execute(
                select(col(Transfer.started_at), func.max(Transfer.finished_at))
                .where(col(Transfer.flow_run_id).in_(list(run_ids)), col(Transfer.kind) == "copy")
                .group_by(Transfer.started_at, Transfer.flow_run_id)
            ).all()
            if last is not None
        ]
    if not tasks or not spans:
        return len(spans), float("nan")
    return len(spans), statistics.mean(tasks) - statistics.mean(spans)


def one_round(
    server: Any,
    tmp: Path,
    s3: Any,
    payloads: Sequence[Payload],
    *,
    workers: int,
    partitions: int,
) -> dict[str, Any]:
    """A fresh catalogue, `workers` workers, one replicate run with `partitions`; its numbers."""
    from devrig.postgres import fresh_postgres_database
    from devrig.workers import REPO, running_workers

    bucket = f"bench-w{workers}"
    with fresh_postgres_database("dlm_bench") as url:
        env = {
            "DLM_DATABASE_URL": url,
            "DLM_CODE_DIR": str(REPO),
            "DLM_HOME": str(tmp / f"home-{workers}"),
            "PYTHONPATH": str(REPO),
            "PREFECT_LOGGING_LEVEL": "WARNING",
            f"{CREDS}_ACCESS_KEY_ID": s3.access_key,
            f"{CREDS}_SECRET_ACCESS_KEY": s3.secret_key,
        }
        with environ(env):  # this process registers the items and checks the bytes
            estate: Estate = build_catalogue(url, s3, tmp / "src", bucket, "dlm", payloads)
        names = tuple(f"w{i + 1}" for i in range(workers))
        with running_workers(server, tmp / f"workers-{workers}", env, names, limit=2):
            time.sleep(2)  # the workers have polled once
            started = time.perf_counter()
            parent = server.create_flow_run("replicate/replicate", {"partitions": partitions})
            run = server.wait_run(parent, timeout=3600)
            seconds = time.perf_counter() - started
        parts = [
            r["id"]
            for r in server.flow_runs("replicate/replicate")
            if r["name"].startswith("replicate-part-")
        ]
        mine = [parent, *parts]
        batches, overhead = batch_overhead(server, url, mine)
        ready = ready_on(url, estate.s3_storage_id)
        sample = random.Random(7).sample(list(payloads), min(SAMPLE, len(payloads)))
        with environ(env):
            intact = same_bytes(s3, estate, sample)
    return {
        "state": run["state_type"],
        "seconds": seconds,
        "batches": batches,
        "overhead_s": overhead,
        "ready": ready,
        "intact": intact,
    }


def run(scale: float) -> list[dict[str, Any]]:
    from sqlalchemy.engine import make_url

    from devrig.postgres import fresh_postgres_database
    from devrig.workers import REPO, PrefectServer

    n = max(20, int(FILES * scale))
    with tempfile.TemporaryDirectory(prefix="dlm-bench-workers-") as tmp_name:
        tmp = Path(tmp_name)
        payloads = make_files(tmp / "src", n, FILE_SIZE)
        with s3_server(tmp / "weed") as s3, fresh_postgres_database("prefect_bench") as purl:
            server = PrefectServer(
                tmp / "prefect", make_url(purl).set(drivername="postgresql+asyncpg").render_as_string(False)
            )
            try:
                server.start()
                server.prefect("work-pool", "create", "dlm-process", "--type", "process")
                server.prefect("deploy", "--all", extra={"DLM_CODE_DIR": str(REPO)})
                one = one_round(server, tmp, s3, payloads, workers=1, partitions=1)
                two = one_round(server, tmp, s3, payloads, workers=2, partitions=2)
            finally:
                server.stop()

    ratio = one["seconds"] / two["seconds"]
    rows = []
    for label, r in (("1-worker", one), ("2-workers-2-partitions", two)):
        rows.append(
            {
                "case": "replicate_workers",
                "backend": label,
                "metrics": {
                    "files": n,
                    "seconds": r["seconds"],
                    "files_per_s": n / r["seconds"],
                    "copy_batches": r["batches"],
                    "prefect_s_per_batch": r["overhead_s"],
                    "ready_s3_replicas": r["ready"],
                },
                "targets": {
                    "run completed": r["state"] == "COMPLETED",
                    f"all {n:,} items have a READY S3 replica": r["ready"] == n,
                    f"{SAMPLE} sampled objects match byte for byte": r["intact"],
                },
            }
        )
    rows[1]["reference"] = (
        f"the same replicate on one worker, unpartitioned ({one['seconds']:.1f} s); ratio = one worker's "
        "seconds / two workers' (both runs timed from create_flow_run to the parent's final state, "
        "worker pick-up and flow process start included); Prefect s/batch = a copy-batch task run's "
        "duration minus its batch's claim-to-settle span in the catalogue"
    )
    rows[1]["reference_value"] = one["seconds"]
    rows[1]["ratio"] = ratio
    rows[1]["targets"][f"1 worker / 2 workers >= {TARGET_SPEEDUP}"] = ratio >= TARGET_SPEEDUP
    return rows
