"""Times each planner over 1,000,000 items and 2,000,000 replicas on PostgreSQL, in a process of its own."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.helpers import peak_rss_mb, run_child

ITEMS = 1_000_000
# seconds per pipeline (issue 12)
TARGET_S = {"replicate": 4.0, "migrate": 3.0, "expire": 3.0, "rebalance": 3.0}
TARGET_RSS_MB = 500
PIPELINES = ("replicate", "migrate", "expire", "rebalance")
_ROWS_PER_WRITE = 50_000

# Storages: name, kind, tier, location, state. "over" gets a capacity that puts it above the
# high-water mark once loaded; "drain" is draining.
STORAGES = (
    ("hot-a", "posix", "hot", "site-a", "online"),
    ("hot-b", "posix", "hot", "site-a", "online"),
    ("obj-b", "s3", "warm", "site-b", "online"),
    ("cold-c", "s3", "cold", "site-c", "online"),
    ("over", "s3", "warm", "site-b", "online"),
    ("drain", "posix", "hot", "site-a", "draining"),
)
# Where a two-copy item lives, in rotation (indexes into STORAGES).
_PAIRS = ((0, 2), (1, 2), (0, 3), (1, 3), (0, 1), (2, 3))

# The mix, by i % 100: (share, label). Replica rows per 100 items: 200.
MIX = (
    (80, "at target (LIQUID, 2 copies)"),
    (5, "below target (LIQUID, 1 copy)"),
    (2, "item expired (2 copies)"),
    (1, "a copy on the draining storage"),
    (2, "a copy on the over-full storage"),
    (1, "surplus (LIQUID, 3 copies)"),
    (2, "SOLID at target (3 copies, 3 sites, one cold)"),
    (1, "at target plus a DELETED replica row (history)"),
    (1, "an expired scratch copy (3 copies)"),
    (5, "at target, expiring in the future"),
)


def _kind(i: int) -> int:
    """Which MIX entry item i belongs to."""
    r, acc = i % 100, 0
    for k, (share, _) in enumerate(MIX):
        acc += share
        if r < acc:
            return k
    raise AssertionError


def _uuid(base: int, n: int) -> str:
    return f"{base + n:032x}"


def _rows(
    n: int, storage_ids: list[str], now: datetime, items: Callable[[bytes], Any], reps: Callable[[bytes], Any]
) -> dict[int, int]:
    """COPY text for n items and their replicas, handed in chunks of bytes to `items` and `reps`
    as it is made (memory stays bounded at any n); returns the bytes per storage index."""
    item_base = 0x0193_0000_0000_7000_8000_0000_0000_0000
    rep_base = 0x0193_0000_0001_7000_8000_0000_0000_0000
    past = (now - timedelta(days=3)).isoformat()
    future = (now + timedelta(days=300)).isoformat()
    used: dict[int, int] = dict.fromkeys(range(len(STORAGES)), 0)
    ibuf: list[str] = []
    rbuf: list[str] = []
    r = 0
    for i in range(n):
        kind = _kind(i)
        oid = _uuid(item_base, i)
        name = f"run{i % 997}/obs{i:07d}.fits"
        size = 1_000_000 + (i * 7919) % 50_000_000
        created = (now - timedelta(days=1 + i % 400)).isoformat()
        a, b = _PAIRS[i % len(_PAIRS)]
        phase, expires = "LIQUID", "\\N"
        copies: list[tuple[int, str, str]] = []  # (storage index, state, expires_at)
        if kind == 0 or kind == 9:
            copies = [(a, "READY", "\\N"), (b, "READY", "\\N")]
            if kind == 9:
                expires = future
        elif kind == 1:
            copies = [(a, "READY", "\\N")]
        elif kind == 2:
            expires = past
            copies = [(a, "READY", "\\N"), (b, "READY", "\\N")]
        elif kind == 3:
            copies = [(a, "READY", "\\N"), (5, "READY", "\\N")]
        elif kind == 4:
            copies = [(a, "READY", "\\N"), (4, "READY", "\\N")]
        elif kind == 5:
            copies = [(0, "READY", "\\N"), (2, "READY", "\\N"), (3, "READY", "\\N")]
        elif kind == 6:
            phase = "SOLID"
            copies = [(0, "READY", "\\N"), (2, "READY", "\\N"), (3, "READY", "\\N")]
        elif kind == 7:
            c = ({0, 1, 2, 3} - {a, b}).pop()
            copies = [(a, "READY", "\\N"), (b, "READY", "\\N"), (c, "DELETED", "\\N")]
        elif kind == 8:
            c = ({0, 1, 2, 3} - {a, b}).pop()
            copies = [(a, "READY", "\\N"), (b, "READY", "\\N"), (c, "READY", past)]
        ibuf.append(
            f"{oid}\t{name}\t1\t{size}\t{i:032x}\tmd5\tfile\t{phase}\t{expires}\t\\N\t"
            f'{{"run": {i % 997}}}\t[]\tREADY\t{created}\t{created}\n'
        )
        for s, state, rexp in copies:
            rbuf.append(
                f"{_uuid(rep_base, r)}\t{oid}\t{storage_ids[s]}\t{name}\t{state}\t{rexp}\t\\N\t"
                f"{created}\t{created}\n"
            )
            r += 1
            if state == "READY":
                used[s] += size
        if len(ibuf) >= _ROWS_PER_WRITE:
            items("".join(ibuf).encode())
            ibuf = []
        if len(rbuf) >= _ROWS_PER_WRITE:
            reps("".join(rbuf).encode())
            rbuf = []
    items("".join(ibuf).encode())
    reps("".join(rbuf).encode())
    return used


def load(url: str, n: int) -> dict[str, Any]:
    """Migrate a fresh database, add the storages, COPY n items and ~2n replicas, ANALYZE."""
    import psycopg

    from lifecycle.catalogue.db import get_engine, init_db, session_scope
    from lifecycle.catalogue.models import StorageCreate
    from lifecycle.catalogue.storages import add_storage, set_storage_state
    from lifecycle.states import StorageState

    init_db(url)
    ids: list[str] = []
    with session_scope(url) as s:
        for name, kind, tier, location, _ in STORAGES:
            root = f"/data/{name}" if kind == "posix" else f"bench-{name}"
            st = add_storage(
                StorageCreate(name=name, kind=kind, root=root, tier=tier, location=location),
                check=False,
                session=s,
            )
            ids.append(st.id.hex)
        for name, *_, state in STORAGES:
            if state != "online":
                set_storage_state(name, StorageState(state), session=s)
    get_engine(url).dispose()
    now = datetime.now(UTC)
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    started = time.perf_counter()
    with psycopg.connect(dsn) as conn, tempfile.TemporaryFile() as spill:
        # Foreign-key triggers off for the load (the rows are consistent by construction). The
        # item rows stream into their COPY as they are made; the replica rows wait in a file.
        conn.execute("SET session_replication_role = replica")
        with conn.cursor() as cur:
            with cur.copy(
                "COPY item (oid, name, version, size, checksum, checksum_algo, item_type, target_phase, "
                "expires_at, owner, meta, parents, state, created_at, updated_at) FROM STDIN"
            ) as copy:
                used = _rows(n, ids, now, copy.write, spill.write)
            spill.seek(0)
            with cur.copy(
                "COPY replica (uid, item_oid, storage_id, path, state, expires_at, verified_at, "
                "created_at, updated_at) FROM STDIN"
            ) as copy:
                while chunk := spill.read(1 << 20):
                    copy.write(chunk)
        conn.execute("SET session_replication_role = origin")
        over = next(i for i, st in enumerate(STORAGES) if st[0] == "over")
        for k, sid in enumerate(ids):
            capacity = int(used[k] / 0.9) if k == over else None  # 90% full: above high water
            conn.execute(
                "UPDATE storage SET used_bytes = %s, capacity_bytes = %s WHERE id = %s",
                (used[k], capacity, sid),
            )
        conn.commit()
        load_s = time.perf_counter() - started
        conn.autocommit = True
        started = time.perf_counter()
        conn.execute("ANALYZE")
        analyze_s = time.perf_counter() - started
        n_items = conn.execute("SELECT count(*) FROM item").fetchone()[0]  # type: ignore[index]
        n_reps = conn.execute("SELECT count(*) FROM replica").fetchone()[0]  # type: ignore[index]
    return {
        "items": n_items,
        "replicas": n_reps,
        "load_s": load_s,
        "analyze_s": analyze_s,
    }


def _child(url: str, pipeline: str) -> None:
    """Plan one pipeline in this process; print seconds, peak RSS and the plan's summary."""
    os.environ["DLM_DATABASE_URL"] = url
    from lifecycle.catalogue.db import get_engine, session_scope
    from lifecycle.planning.pipelines import make_plan
    from lifecycle.settings import reset_settings

    reset_settings()
    with get_engine(url).connect() as conn:  # connect (and load the dialect) outside the clock
        conn.exec_driver_sql("SELECT 1")
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    with session_scope(url) as s:
        plan = make_plan(s, pipeline)
    seconds = time.perf_counter() - started
    rss = peak_rss_mb()
    out = {
        "seconds": seconds,
        "rss_mb": rss,
        "rss_before_mb": rss_before,
        "summary": plan.summary(),
        "counters": plan.counters,
    }
    print(json.dumps(out))


def _plan_in_child(url: str, pipeline: str) -> dict[str, Any]:
    return run_child("bench.cases.plan_scale", url, pipeline, what=f"planning child ({pipeline})")


def work(pipeline: str, summary: dict[str, int]) -> int:
    """The actions of a plan (its summary): what the plan holds in memory."""
    if pipeline == "replicate" or pipeline == "rebalance":
        return summary["copies"] + summary["deletes"]
    if pipeline == "expire":
        return summary["deletes"] + summary["expired_items"]
    return summary["copies"] + summary["deletes"] + summary["phase_changes"]


@contextmanager
def _catalogue(n: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """A loaded catalogue of n items: a fresh database, dropped after; or, with
    DLM_BENCH_PLAN_KEEP=NAME, database NAME, loaded once and kept for the next run (for
    iterating on the planners; delete it by hand: DROP DATABASE NAME)."""
    import sqlalchemy as sa

    from devrig.postgres import DEFAULT_PG, fresh_postgres_database

    keep = os.environ.get("DLM_BENCH_PLAN_KEEP")
    if not keep:
        with fresh_postgres_database("dlm_bench_plan") as url:
            yield url, load(url, n)
        return
    admin_url = sa.engine.make_url(os.environ.get("DLM_TEST_POSTGRES_URL", DEFAULT_PG))
    if admin_url.drivername == "postgresql":
        admin_url = admin_url.set(drivername="postgresql+psycopg")
    url = admin_url.set(database=keep).render_as_string(hide_password=False)
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        there = conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": keep}).first()
        if there is None:
            conn.execute(sa.text(f'CREATE DATABASE "{keep}"'))
    admin.dispose()
    stamp = Path(os.environ.get("TMPDIR", "/tmp")) / f"{keep}.loaded.json"
    if there is not None and stamp.exists():
        loaded = json.loads(stamp.read_text())
        if loaded.get("n") == n:
            yield url, loaded
            return
        raise RuntimeError(f"database {keep} holds {loaded.get('n')} items, not {n}: drop it first")
    loaded = {**load(url, n), "n": n}
    stamp.write_text(json.dumps(loaded))
    yield url, loaded


def run(scale: float) -> list[dict[str, Any]]:
    n = max(1000, int(ITEMS * scale))
    rows: list[dict[str, Any]] = []
    with _catalogue(n) as (url, loaded):
        mix = "; ".join(f"{share}% {label}" for share, label in MIX)
        for pipeline in PIPELINES:
            got = _plan_in_child(url, pipeline)
            summary = got["summary"]
            rows.append(
                {
                    "case": "plan_scale",
                    "backend": f"postgresql/{pipeline}",
                    "metrics": {
                        "items": loaded["items"],
                        "replicas": loaded["replicas"],
                        "seconds": got["seconds"],
                        "peak_rss_mb": got["rss_mb"],
                        "rss_before_mb": got["rss_before_mb"],
                        "actions": work(pipeline, summary),
                        "shortfalls": summary["shortfalls"],
                        "deferred": summary["deferred"],
                    },
                    "reference": (
                        f"make_plan('{pipeline}') in a child process (peak RSS is the child's own VmHWM, "
                        f"imports included; rss_before_mb is before planning). Catalogue generated and "
                        f"loaded by COPY in {loaded['load_s']:.1f} s + ANALYZE {loaded['analyze_s']:.1f} s; "
                        f"mix: {mix}. "
                        f"Plan: {summary}"
                    )
                    if pipeline == "replicate"
                    else f"make_plan('{pipeline}') in a child process. Plan: {summary}",
                    "targets": {
                        f"<= {TARGET_S[pipeline]:g} s": got["seconds"] <= TARGET_S[pipeline],
                        f"peak RSS <= {TARGET_RSS_MB} MB": got["rss_mb"] <= TARGET_RSS_MB,
                    },
                }
            )
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m bench.run plan_scale [--scale F]")
