"""Times DLM's replicate flow on 10,000 files of 4 KiB, posix to S3, against bare and per-file rclone."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.helpers import cpu_meter, profiling

FILES = 10_000
FILE_SIZE = 4 * 1024
PER_FILE_SUBSET = 500
TARGET_VS_RCLONE = 1.3  # DLM / bare rclone, at most
TARGET_PER_FILE = 20.0  # per-file rclone / DLM, at least
TARGET_TASK_RUNS = 100  # per 10,000 items, at most
SAMPLE = 50  # objects compared byte for byte at the end
# Files copied by an untimed run before the timed one, so the Prefect server has served a run
# (as a user's has) and the timed run does not pay for its first requests on each API route.
WARM_FILES = 20
SETTLE_S = 10  # then a pause, as between a user's runs: the server writes the first run's events
CREDS = "DLM_BENCH_S3"  # the S3 storage's credentials_env prefix


# --------------------------------------------------------------------------- shared with replicate_large


@dataclass(frozen=True)
class Payload:
    name: str
    size: int
    md5: str


def make_files(
    root: Path, n: int, size: int, *, per_dir: int = 1000, seed: int = 42, prefix: str = ""
) -> list[Payload]:
    """n files of `size` random bytes under root/prefix (per_dir per directory), with their MD5s."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = f"{prefix}d{i // per_dir:03d}/f{i:06d}.bin"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        md5 = hashlib.md5()
        with open(path, "wb") as f:
            left = size
            while left:
                chunk = rng.randbytes(min(left, 1 << 22))
                md5.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        out.append(Payload(name, size, md5.hexdigest()))
    return out


@contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then restore what was there."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Estate:
    """A catalogue on a fresh PostgreSQL database: a posix source, an S3 destination, items on the source."""

    url: str
    src_root: Path
    bucket: str
    prefix: str
    s3_storage_id: uuid.UUID


def build_catalogue(
    url: str, server: Any, src_root: Path, bucket: str, prefix: str, payloads: Sequence[Payload]
) -> Estate:
    """Migrate, add a posix and an S3 storage, and register the payloads (LIQUID) on posix."""
    from lifecycle.catalogue.bulk import register_from_list
    from lifecycle.catalogue.db import init_db, session_scope
    from lifecycle.catalogue.models import StorageCreate
    from lifecycle.catalogue.storages import add_storage
    from lifecycle.states import Phase

    init_db(url)
    listing = src_root.parent / f"{src_root.name}.jsonl"
    with open(listing, "wb") as f:
        for p in payloads:
            f.write(orjson.dumps({"name": p.name, "size": p.size, "checksum": p.md5}) + b"\n")
    server.create_bucket(bucket)
    with session_scope(url) as s:
        src = add_storage(StorageCreate(name="bench-posix", kind="posix", root=str(src_root)), session=s)
        dst = add_storage(
            StorageCreate(
                name="bench-s3",
                kind="s3",
                root=f"{bucket}/{prefix}",
                endpoint=server.endpoint,
                credentials_env=CREDS,
                tier="warm",
            ),
            session=s,
        )
        result = register_from_list(s, storage=src, source=listing, phase=Phase.LIQUID)
        if result.ready != len(payloads):
            raise RuntimeError(f"registered {result.ready} READY items, expected {len(payloads)}")
        s3_id = dst.id
    return Estate(url, src_root, bucket, prefix, s3_id)


@contextmanager
def s3_server(workdir: Path) -> Iterator[Any]:
    """A SeaweedFS S3 server in workdir, stopped at the end."""
    from devrig.seaweed import SeaweedServer

    with SeaweedServer(workdir) as server:
        yield server


@contextmanager
def prefect_server() -> Iterator[float]:
    """A Prefect server as `dlm run` uses one: a DLM home's own (`dlm server start`: its SQLite
    database and slot leases on disk), in a temporary home, that this process's flows talk to;
    yields its start-up seconds. (Prefect's test harness, used before, answered a slot request
    in 2.4 s at times where this server answers in milliseconds.)"""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.server import start_home_server, stop_home_server

    with tempfile.TemporaryDirectory(prefix="dlm-bench-prefect-") as home:
        started = time.perf_counter()
        server, _ = start_home_server(Path(home), timeout=120)
        try:
            with temporary_settings(updates={PREFECT_API_URL: server.url}):
                yield time.perf_counter() - started
        finally:
            stop_home_server(Path(home))


def run_replicate(profile: str = "replicate") -> tuple[float, uuid.UUID, dict[str, Any]]:
    """Run the real replicate flow as `dlm run` runs it (in this process, flow run heartbeats
    off: dlm.server_cli.use_prefect_server); returns (wall seconds, flow run id, its report,
    failures included). Profiled as `profile` under DLM_BENCH_PROFILE (bench/helpers.profiling)."""
    from prefect.settings import temporary_settings

    from flows.pipelines import replicate

    started = time.perf_counter()
    with temporary_settings(updates={"flows.heartbeat_frequency": None}), profiling(profile):
        state = replicate(return_state=True)
    seconds = time.perf_counter() - started
    report = state.result().as_json()
    flow_run_id = state.state_details.flow_run_id
    return seconds, flow_run_id, report


def warm_up(url: str, payloads: Sequence[Payload]) -> None:
    """Replicate the payloads' items alone, untimed, so the Prefect server has served a run with
    copy batches before the timed one (see WARM_FILES)."""
    from prefect.settings import temporary_settings
    from sqlalchemy import select
    from sqlmodel import col

    from flows.pipelines import replicate
    from lifecycle.catalogue.db import session_scope
    from lifecycle.catalogue.models import Item

    with session_scope(url) as s:
        oids = s.execute(select(Item.oid).where(col(Item.name).in_([p.name for p in payloads]))).scalars()
        items = [str(o) for o in oids]
    with temporary_settings(updates={"flows.heartbeat_frequency": None}):
        report = replicate(items=items, return_state=True).result().as_json()
    if report.get("failed") or report.get("copied") != len(payloads):
        raise RuntimeError(f"the warm-up run did not copy its {len(payloads)} files: {report}")
    time.sleep(SETTLE_S)


def count_task_runs(flow_run_id: uuid.UUID, *, settle_s: float = 15.0) -> int:
    """Task runs of the flow run as the Prefect API records them (polled until the count settles)."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def count() -> int:
        flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        total = 0
        async with get_client() as client:
            while True:  # the API returns at most 200 per call
                page = await client.read_task_runs(
                    flow_run_filter=flt, sort=TaskRunSort.ID_DESC, limit=200, offset=total
                )
                total += len(page)
                if len(page) < 200:
                    return total

    deadline = time.monotonic() + settle_s
    last, stable = -1, 0
    while time.monotonic() < deadline:
        n = anyio.run(count)
        stable = stable + 1 if n == last and n > 0 else 0
        if stable >= 2:
            return n
        last = n
        time.sleep(1.0)
    return last


def s3_target(server: Any, bucket: str, prefix: str, name: str = "bench-ref") -> Any:
    """An rclone remote for bucket/prefix configured exactly as DLM configures its S3 storages."""
    from lifecycle.storage.s3 import S3Storage

    return S3Storage(
        name, f"{bucket}/{prefix}", endpoint=server.endpoint, credentials_env=CREDS
    ).rclone_target()


def rclone_env(target: Any) -> dict[str, str]:
    return {**os.environ, "RCLONE_CONFIG": "", **target.env}


def bare_rclone(
    src_root: Path, target: Any, names: Sequence[str], flags: Sequence[str], verb: str = "copy"
) -> float:
    """Seconds of one `rclone VERB SRC DST --files-from LIST *flags` of the names (copy by default)."""
    from lifecycle.transfer.binary import rclone_binary

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("".join(n + "\n" for n in names))
    try:
        argv = [rclone_binary(), verb, str(src_root), target.spec, "--files-from", f.name, *flags]
        started = time.perf_counter()
        proc = subprocess.run(argv, env=rclone_env(target), capture_output=True, check=False)
        seconds = time.perf_counter() - started
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"bare rclone {verb} failed: {proc.stderr.decode()[-2000:]}")
    return seconds


def ready_on(url: str, storage_id: uuid.UUID) -> int:
    """READY replicas the catalogue holds on the storage."""
    from sqlalchemy import func, select
    from sqlmodel import col

    from lifecycle.catalogue.db import session_scope
    from lifecycle.catalogue.models import Replica

    with session_scope(url) as s:
        return int(
            s.execute(
                select(func.count())
                .select_from(Replica)
                .where(col(Replica.storage_id) == storage_id, col(Replica.state) == "READY")
            ).scalar_one()
        )


def same_bytes(server: Any, estate: Estate, sample: Sequence[Payload]) -> bool:
    """Whether each sampled object on S3 is byte for byte its source file."""
    client = server.client()
    for p in sample:
        try:
            body = client.get_object(Bucket=estate.bucket, Key=f"{estate.prefix}/{p.name}")["Body"].read()
        except client.exceptions.NoSuchKey:
            return False
        if body != (estate.src_root / p.name).read_bytes():
            return False
    return True


def stage_summary(report: Mapping[str, Any]) -> str:
    """Where DLM's time went: the run's stages and, summed over its copy batches, theirs."""
    run = ", ".join(f"{k} {v:.2f}" for k, v in report.get("stages", {}).items())
    sums: dict[str, float] = {}
    for b in report["batches"]:
        for key, value in b.items():
            if key.endswith(" s") and isinstance(value, int | float):
                sums[key[:-2]] = sums.get(key[:-2], 0.0) + value
    per_batch = ", ".join(f"{k} {v:.2f}" for k, v in sums.items())
    return f"DLM run stages (s): {run}; copy batches, summed (s): {per_batch}"


def cpu_summary(dlm: Mapping[str, float], dlm_s: float, bare: Mapping[str, float], bare_s: float) -> str:
    """Whose CPU filled the host during DLM's run and during the bare copy before it
    (bench.helpers.cpu_meter): when the host is busy all along, every CPU second DLM adds to
    rclone's and the S3 server's lengthens the run by about 1/cores of a second."""

    def spent(c: Mapping[str, float], seconds: float, *, dlm_run: bool) -> str:
        other = c["host"] - c["self"] - c["children"] - c["postgres"] - c["weed"]
        own = f"DLM's process {c['self']:.1f}, PostgreSQL {c['postgres']:.1f}, " if dlm_run else ""
        return (
            f"{seconds:.2f} s wall, host busy {c['host'] / (c['cores'] * seconds):.0%} of "
            f"{c['cores']:.0f} cores: rclone {c['children']:.1f}, SeaweedFS {c['weed']:.1f}, {own}"
            f"other {other:.1f} CPU s"
        )

    return (
        f"CPU during DLM's run: {spent(dlm, dlm_s, dlm_run=True)}; "
        f"during the bare copy before it: {spent(bare, bare_s, dlm_run=False)}"
    )


# --------------------------------------------------------------------------- this case


def _per_file(src_root: Path, target: Any, names: Sequence[str]) -> float:
    """Seconds of one `rclone copyto SRC/f DST/f` process per file, one after another."""
    from lifecycle.transfer.binary import rclone_binary

    binary, env = rclone_binary(), rclone_env(target)
    started = time.perf_counter()
    for name in names:
        proc = subprocess.run(
            [binary, "copyto", str(src_root / name), f"{target.spec}/{name}"],
            env=env,
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"rclone copyto {name} failed: {proc.stderr.decode()[-1000:]}")
    return time.perf_counter() - started


def run(scale: float) -> list[dict[str, Any]]:
    from devrig.postgres import fresh_postgres_database
    from lifecycle.settings import get_settings, reset_settings

    n = max(10, int(FILES * scale))
    subset = min(n, max(20, int(PER_FILE_SUBSET * scale)))
    with tempfile.TemporaryDirectory(prefix="dlm-bench-repl-") as tmp_name:
        tmp = Path(tmp_name)
        src_root = tmp / "src"
        payloads = make_files(src_root, n, FILE_SIZE)
        warm = make_files(src_root, WARM_FILES, FILE_SIZE, prefix="warm/", seed=1)
        names = [p.name for p in payloads]
        with (
            s3_server(tmp / "weed") as server,
            fresh_postgres_database("dlm_bench") as url,
            environ(
                {
                    "DLM_DATABASE_URL": url,
                    "DLM_HOME": str(tmp / "home"),
                    f"{CREDS}_ACCESS_KEY_ID": server.access_key,
                    f"{CREDS}_SECRET_ACCESS_KEY": server.secret_key,
                }
            ),
        ):
            reset_settings()
            transfers = get_settings().transfer.transfers
            estate = build_catalogue(url, server, src_root, "bench-dlm", "dlm", [*payloads, *warm])
            server.create_bucket("bench-ref")
            flags = ["--transfers", str(transfers)]
            # Warm the server up (volume allocation, connections) before anything is timed.
            bare_rclone(src_root, s3_target(server, "bench-ref", "warmup"), names[: min(n, 200)], flags)
            with cpu_meter() as bare_cpu:
                bare_before = bare_rclone(src_root, s3_target(server, "bench-ref", "bare1"), names, flags)
            with prefect_server() as startup_s:
                warm_up(url, warm)
                with cpu_meter() as dlm_cpu:
                    dlm_s, flow_run_id, report = run_replicate("replicate_small")
                task_runs = count_task_runs(flow_run_id)
            bare_after = bare_rclone(src_root, s3_target(server, "bench-ref", "bare2"), names, flags)
            # DLM's rclone skips the HEAD after each upload on a service that checks Content-MD5
            # (SeaweedFS does): bare rclone with that one flag, for the like-for-like ratio
            no_head = bare_rclone(
                src_root, s3_target(server, "bench-ref", "bare3"), names, [*flags, "--s3-no-head"]
            )
            per_file_subset_s = _per_file(src_root, s3_target(server, "bench-ref", "perfile"), names[:subset])
            ready = ready_on(url, estate.s3_storage_id) - len(warm)
            sample = random.Random(7).sample(payloads, min(SAMPLE, n))
            intact = same_bytes(server, estate, sample)
        reset_settings()

    bare = (bare_before + bare_after) / 2
    per_file = per_file_subset_s * n / subset
    return [
        {
            "case": "replicate_small",
            "backend": "dlm-flow",
            "metrics": {
                "files": n,
                "seconds": dlm_s,
                "files_per_s": n / dlm_s,
                "prefect_startup_s": startup_s,
                "task_runs": task_runs,
                "copy_batches": sum(1 for b in report["batches"] if b["kind"] == "copy"),
                "ready_s3_replicas": ready,
                "failed_copies": report.get("failed", 0),
                "host_busy": dlm_cpu["host"] / (dlm_cpu["cores"] * dlm_s),
                "bare_host_busy": bare_cpu["host"] / (bare_cpu["cores"] * bare_before),
                "vs_bare_no_head": dlm_s / no_head,
            },
            "reference": (
                f"bare `rclone copy SRC DST --files-from LIST --transfers {transfers}` of the same files "
                f"to a fresh prefix, mean of one run before DLM's and one after ({bare_before:.2f} s, "
                f"{bare_after:.2f} s); Prefect start-up ({startup_s:.1f} s) is not in DLM's time, and "
                f"an untimed run copied {len(warm)} other files first (the server has served a run). "
                f"DLM's rclone does not HEAD each upload here (the server checks Content-MD5); bare "
                f"rclone with `--s3-no-head` took {no_head:.2f} s (vs_bare_no_head). "
                f"{stage_summary(report)}. {cpu_summary(dlm_cpu, dlm_s, bare_cpu, bare_before)}"
            ),
            "reference_value": bare,
            "ratio": dlm_s / bare,
            "targets": {
                f"DLM / bare rclone <= {TARGET_VS_RCLONE}": dlm_s / bare <= TARGET_VS_RCLONE,
                f"task runs <= {TARGET_TASK_RUNS} (for 10,000 items)": task_runs <= TARGET_TASK_RUNS,
                "no failed copies": not report.get("failed"),
                f"all {n:,} items have a READY S3 replica": ready == n,
                f"{len(sample)} sampled objects match byte for byte": intact,
            },
        },
        {
            "case": "replicate_small",
            "backend": "rclone-per-file",
            "metrics": {
                "files": n,
                "seconds": per_file,
                "files_per_s": n / per_file,
            },
            "reference": (
                f"one `rclone copyto` process per file, run on {subset:,} files ({per_file_subset_s:.1f} s) "
                f"and EXTRAPOLATED to {n:,}; ratio = per-file seconds / DLM seconds"
            ),
            "reference_value": dlm_s,
            "ratio": per_file / dlm_s,
            "targets": {f"per-file / DLM >= {TARGET_PER_FILE:g}": per_file / dlm_s >= TARGET_PER_FILE},
        },
    ]
