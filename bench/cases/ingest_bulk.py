"""Bulk registration of a generated list (1,000,000 items at scale 1) on PostgreSQL and SQLite,
against the raw PostgreSQL COPY rate of the same item rows measured in the same run."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

TARGET_RATE = 50_000  # items/s on PostgreSQL
TARGET_RATIO = 0.2  # of the raw COPY rate
TARGET_RSS_MB = 500


def generate(path: Path, n: int) -> None:
    """A JSON-lines list of n items like run42/obs0001234.fits with sizes, md5s and small metadata."""
    with open(path, "wb") as f:
        for i in range(n):
            run = i % 97
            name = f"run{run}/obs{i:07d}.fits"
            f.write(
                orjson.dumps(
                    {
                        "name": name,
                        "size": 1_000_000 + (i * 7919) % 50_000_000,
                        "checksum": hashlib.md5(name.encode()).hexdigest(),
                        "metadata": {"run": run, "band": "griz"[i % 4], "exposure_s": 30 + i % 5},
                    }
                )
                + b"\n"
            )


def _child(url: str, path: str) -> None:
    """Register the list in this process and print seconds, count and this process's peak RSS."""
    from lifecycle.catalogue.bulk import register_from_list
    from lifecycle.catalogue.db import session_scope
    from lifecycle.catalogue.models import Storage

    started = time.perf_counter()
    with session_scope(url) as session:
        storage = Storage(name="bench", kind="posix", root="/data/bench")
        session.add(storage)
        result = register_from_list(session, storage=storage, source=Path(path))
    seconds = time.perf_counter() - started  # including the commit
    print(json.dumps({"count": result.count, "seconds": seconds, "rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS since exec. ru_maxrss is not used: Linux carries the forking
    parent's RSS over into it, so it would count the benchmark's own memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _register_in_child(url: str, path: Path) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cases.ingest_bulk", "--child", url, str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"registration child failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _item_copy_rows(path: Path) -> bytes:
    """The list's item rows in COPY text format, with the columns bulk registration writes (untimed)."""
    from lifecycle.catalogue.bulk_writers import TimeOrderedIds

    now = "2026-01-01T00:00:00+00:00"
    ids = TimeOrderedIds()
    out = []
    with open(path, "rb") as f:
        for line in f:
            o = orjson.loads(line)
            meta = orjson.dumps(o["metadata"]).decode()
            out.append(
                f"{ids.take(1)[0]:032x}\t{o['name']}\t1\t{o['size']}\t{o['checksum']}\tmd5\tfile\tGAS\t"
                f"\\N\t\\N\t{meta}\t[]\tREADY\t{now}\t{now}\n"
            )
    return "".join(out).encode()


def _raw_copy_rate(data: bytes, n: int, *, plain: bool) -> float:
    """Items/s of one COPY of the rows (and its commit) into a fresh database's item table, or
    into a plain table of the same columns without indexes or constraints."""
    import psycopg

    from devrig.postgres import fresh_postgres_database
    from lifecycle.catalogue.db import init_db

    columns = (
        "oid, name, version, size, checksum, checksum_algo, item_type, target_phase, expires_at, "
        "owner, meta, parents, state, created_at, updated_at"
    )
    with fresh_postgres_database("dlm_bench") as url:
        init_db(url)
        from lifecycle.catalogue.db import get_engine

        get_engine(url).dispose()
        dsn = url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn) as conn:
            table = "item"
            if plain:
                table = "item_plain"
                conn.execute(
                    "CREATE TABLE item_plain (oid uuid, name text, version int, size bigint, checksum text, "
                    "checksum_algo text, item_type text, target_phase text, expires_at timestamptz, "
                    "owner text, meta jsonb, parents jsonb, state text, created_at timestamptz, "
                    "updated_at timestamptz)"
                )
                conn.commit()
            started = time.perf_counter()
            with conn.cursor() as cur, cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                view = memoryview(data)
                for i in range(0, len(data), 1 << 20):
                    copy.write(view[i : i + (1 << 20)])
            conn.commit()
            return n / (time.perf_counter() - started)


def run(scale: float) -> list[dict[str, Any]]:
    from devrig.postgres import fresh_postgres_database
    from lifecycle.catalogue.db import get_engine, init_db

    n = max(1, int(1_000_000 * scale))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dlm-bench-") as tmp:
        path = Path(tmp) / "list.jsonl"
        generate(path, n)
        data = _item_copy_rows(path)
        copy_indexed = _raw_copy_rate(data, n, plain=False)
        copy_plain = _raw_copy_rate(data, n, plain=True)
        del data

        with fresh_postgres_database("dlm_bench") as url:
            init_db(url)
            get_engine(url).dispose()
            pg = _register_in_child(url, path)
        rate = pg["count"] / pg["seconds"]
        rows.append(
            {
                "case": "ingest_bulk",
                "backend": "postgresql",
                "metrics": {
                    "items": pg["count"],
                    "seconds": pg["seconds"],
                    "items_per_s": rate,
                    "peak_rss_mb": pg["rss_mb"],
                    "copy_plain_items_per_s": copy_plain,
                },
                "reference": (
                    "raw COPY of the same item rows (all item columns, one stream, commit included) into "
                    "the real, indexed item table of another fresh database, in items/s; the stricter "
                    f"plain-table COPY (no indexes or constraints) is shown as copy_plain_items_per_s "
                    f"(ratio to it {rate / copy_plain:.2f})"
                ),
                "reference_value": copy_indexed,
                "ratio": rate / copy_indexed,
                "targets": {
                    f">= {TARGET_RATE:,} items/s": rate >= TARGET_RATE,
                    f">= {TARGET_RATIO} of raw COPY": rate / copy_indexed >= TARGET_RATIO,
                    f"peak RSS < {TARGET_RSS_MB} MB": pg["rss_mb"] < TARGET_RSS_MB,
                },
            }
        )

        db = Path(tmp) / "catalogue.db"
        url = f"sqlite:///{db}"
        init_db(url)
        get_engine(url).dispose()
        lite = _register_in_child(url, path)
        rows.append(
            {
                "case": "ingest_bulk",
                "backend": "sqlite",
                "metrics": {
                    "items": lite["count"],
                    "seconds": lite["seconds"],
                    "items_per_s": lite["count"] / lite["seconds"],
                    "peak_rss_mb": lite["rss_mb"],
                },
                "targets": {f"peak RSS < {TARGET_RSS_MB} MB": lite["rss_mb"] < TARGET_RSS_MB},
            }
        )
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m bench.run ingest_bulk [--scale F]")
