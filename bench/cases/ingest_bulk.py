"""Bulk registration of a generated list (1,000,000 items at scale 1) on PostgreSQL and SQLite,
against the raw PostgreSQL COPY rate of the same item rows measured in the same run (before and
after the registration, the mean), and the raw COPY of all three tables registration writes."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.helpers import cpu_seconds, peak_rss_mb, run_child

TARGET_RATE = 60_000  # items/s, on PostgreSQL and on SQLite (issue 12)
TARGET_RATIO = 0.35  # of the raw COPY rate of the item rows alone
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
    """Register the list in this process and print seconds, count, this process's peak RSS and,
    on PostgreSQL, the CPU seconds of its server process over the same span (when this host
    runs the server and may read its /proc entry)."""
    from sqlalchemy import text

    from lifecycle.catalogue.bulk import register_from_list
    from lifecycle.catalogue.db import session_scope
    from lifecycle.catalogue.models import Storage

    server: float | None = None
    started = time.perf_counter()
    with session_scope(url) as session:
        pid = None
        if url.startswith("postgresql"):
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar()
            server = cpu_seconds(pid)
        storage = Storage(name="bench", kind="posix", root="/data/bench")
        session.add(storage)
        result = register_from_list(session, storage=storage, source=Path(path))
    seconds = time.perf_counter() - started  # including the commit
    if server is not None:
        after = cpu_seconds(pid)
        server = None if after is None else after - server
    print(
        json.dumps(
            {"count": result.count, "seconds": seconds, "rss_mb": peak_rss_mb(), "server_cpu_s": server}
        )
    )


def _register_in_child(url: str, path: Path) -> dict[str, Any]:
    return run_child("bench.cases.ingest_bulk", url, str(path), what="registration child")


ITEM_COLUMNS = (
    "oid, name, version, size, checksum, checksum_algo, item_type, target_phase, expires_at, "
    "owner, meta, parents, state, created_at, updated_at"
)
REPLICA_COLUMNS = "uid, item_oid, storage_id, path, state, created_at, updated_at"
EVENT_COLUMNS = "ts, kind, item_oid, replica_uid, storage_id, actor, details"
STORAGE_ID = "00000000000070008000000000000001"


def _copy_rows(path: Path, out: Path) -> dict[str, Path]:
    """The list's item rows, and the replica and event rows registration writes beside them, in
    COPY text format: one file per table in `out` (untimed)."""
    from lifecycle.catalogue.bulk_writers import TimeOrderedIds

    now = "2026-01-01T00:00:00+00:00"
    ids = TimeOrderedIds()
    files = {table: out / f"{table}.copy" for table in ("item", "replica", "event")}
    with (
        open(path, "rb") as f,
        open(files["item"], "w") as items,
        open(files["replica"], "w") as replicas,
        open(files["event"], "w") as events,
    ):
        for line in f:
            o = orjson.loads(line)
            meta = orjson.dumps(o["metadata"]).decode()
            oid, uid = (f"{v:032x}" for v in ids.take(2))
            items.write(
                f"{oid}\t{o['name']}\t1\t{o['size']}\t{o['checksum']}\tmd5\tfile\tGAS\t"
                f"\\N\t\\N\t{meta}\t[]\tREADY\t{now}\t{now}\n"
            )
            replicas.write(f"{uid}\t{oid}\t{STORAGE_ID}\t{o['name']}\tREADY\t{now}\t{now}\n")
            events.write(f'{now}\titem.ready\t{oid}\t{uid}\t{STORAGE_ID}\tuser\t{{"bulk": true}}\n')
    return files


def _raw_copy_rate(rows: dict[str, Path], n: int, *, tables: str) -> float:
    """Items/s of COPY (one stream per table, and the commit) into a fresh catalogue: "item"
    its item table alone, "all" its item, replica and event tables (what registration writes),
    "plain" a table of the item columns without indexes or constraints."""
    import psycopg

    from devrig.postgres import fresh_postgres_database
    from lifecycle.catalogue.db import get_engine, init_db

    with fresh_postgres_database("dlm_bench") as url:
        init_db(url)
        get_engine(url).dispose()
        dsn = url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn) as conn:
            streams = [("item", ITEM_COLUMNS, rows["item"])]
            if tables == "plain":
                conn.execute(
                    "CREATE TABLE item_plain (oid uuid, name text, version int, size bigint, checksum text, "
                    "checksum_algo text, item_type text, target_phase text, expires_at timestamptz, "
                    "owner text, meta jsonb, parents jsonb, state text, created_at timestamptz, "
                    "updated_at timestamptz)"
                )
                streams = [("item_plain", ITEM_COLUMNS, rows["item"])]
            elif tables == "all":
                conn.execute(
                    "INSERT INTO storage (id, name, kind, root, tier, used_bytes, state, created_at, "
                    "trust_stored_checksums) VALUES (%s, 'bench', 'posix', '/data/bench', 'hot', 0, "
                    "'online', now(), false)",
                    (STORAGE_ID,),
                )
                streams += [
                    ("replica", REPLICA_COLUMNS, rows["replica"]),
                    ("event", EVENT_COLUMNS, rows["event"]),
                ]
            conn.commit()
            started = time.perf_counter()
            with conn.cursor() as cur:
                for table, columns, data in streams:
                    with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy, open(data, "rb") as f:
                        while chunk := f.read(1 << 20):
                            copy.write(chunk)
            conn.commit()
            return n / (time.perf_counter() - started)


def _sqlite_floor(path: Path, out: Path) -> float:
    """Items/s of SQLite alone writing the item, replica and event rows registration writes into
    a fresh catalogue (DLM's connection settings and the page cache registration sets): the rows
    are first loaded into temporary tables without indexes (untimed), then one INSERT ... SELECT
    per table and the commit are timed, so no Python runs per row."""
    from lifecycle.catalogue.bulk_writers import SQLITE_CACHE_KIB, TimeOrderedIds
    from lifecycle.catalogue.db import get_engine, init_db

    now = "2026-01-01 00:00:00.000000"
    ids = TimeOrderedIds()
    rows: dict[str, list[tuple[Any, ...]]] = {"item": [], "replica": [], "event": []}
    with open(path, "rb") as f:
        for line in f:
            o = orjson.loads(line)
            oid, uid = (f"{v:032x}" for v in ids.take(2))
            meta = orjson.dumps(o["metadata"]).decode()
            rows["item"].append(
                (
                    oid,
                    o["name"],
                    1,
                    o["size"],
                    o["checksum"],
                    "md5",
                    "file",
                    "GAS",
                    meta,
                    "[]",
                    "READY",
                    now,
                    now,
                )
            )
            rows["replica"].append((uid, oid, STORAGE_ID, o["name"], "READY", now, now))
            rows["event"].append((now, "item.ready", oid, uid, STORAGE_ID, "user", '{"bulk": true}'))
    columns = {
        "item": "oid, name, version, size, checksum, checksum_algo, item_type, target_phase, meta, "
        "parents, state, created_at, updated_at",
        "replica": REPLICA_COLUMNS,
        "event": EVENT_COLUMNS,
    }
    url = f"sqlite:///{out / 'floor.db'}"
    init_db(url)
    engine = get_engine(url)
    with engine.connect() as connection:
        conn: Any = connection.connection.driver_connection
        conn.execute(f"PRAGMA cache_size = -{SQLITE_CACHE_KIB}")
        conn.execute(
            "INSERT INTO storage (id, name, kind, root, tier, used_bytes, state, created_at, "
            "trust_stored_checksums) VALUES (?, 'bench', 'posix', '/data/bench', 'hot', 0, 'online', ?, 0)",
            (STORAGE_ID, now),
        )
        for table, names in columns.items():
            marks = ", ".join("?" * len(rows[table][0]))
            conn.execute(f"CREATE TEMP TABLE staged_{table} AS SELECT {names} FROM {table} WHERE 0")
            conn.executemany(f"INSERT INTO staged_{table} VALUES ({marks})", rows[table])
        started = time.perf_counter()
        conn.execute("BEGIN")
        for table, names in columns.items():
            conn.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM staged_{table}")
        conn.execute("COMMIT")
        seconds = time.perf_counter() - started
    engine.dispose()
    return len(rows["item"]) / seconds


def run(scale: float) -> list[dict[str, Any]]:
    from devrig.postgres import fresh_postgres_database
    from lifecycle.catalogue.db import get_engine, init_db

    n = max(1, int(1_000_000 * scale))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dlm-bench-") as tmp:
        path = Path(tmp) / "list.jsonl"
        generate(path, n)
        rows_data = _copy_rows(path, Path(tmp))
        copy_before = _raw_copy_rate(rows_data, n, tables="item")
        copy_plain = _raw_copy_rate(rows_data, n, tables="plain")
        copy_all = _raw_copy_rate(rows_data, n, tables="all")

        with fresh_postgres_database("dlm_bench") as url:
            init_db(url)
            get_engine(url).dispose()
            pg = _register_in_child(url, path)
        copy_after = _raw_copy_rate(rows_data, n, tables="item")
        copy_indexed = (copy_before + copy_after) / 2
        rate = pg["count"] / pg["seconds"]
        server = pg.get("server_cpu_s")
        rows.append(
            {
                "case": "ingest_bulk",
                "backend": "postgresql",
                "metrics": {
                    "items": pg["count"],
                    "seconds": pg["seconds"],
                    "items_per_s": rate,
                    "peak_rss_mb": pg["rss_mb"],
                    "server_busy": None if server is None else server / pg["seconds"],
                    "copy_all_items_per_s": copy_all,
                    "copy_plain_items_per_s": copy_plain,
                },
                "reference": (
                    "raw COPY of the same item rows (all item columns, one stream, commit included) into "
                    "the real, indexed item table of another fresh database, in items/s, the mean of one "
                    f"COPY before the registration and one after ({copy_before:,.0f} and {copy_after:,.0f}); "
                    "copy_all_items_per_s is the raw COPY of everything registration writes (the item, "
                    "replica and event rows into a fresh catalogue: the database's own floor, ratio to it "
                    f"{rate / copy_all:.2f}); copy_plain_items_per_s the item rows into a plain table "
                    f"without indexes or constraints (ratio to it {rate / copy_plain:.2f}); server_busy "
                    "the CPU seconds of the registration's PostgreSQL server process per second of it"
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
        lite_rate = lite["count"] / lite["seconds"]
        floor = _sqlite_floor(path, Path(tmp))
        rows.append(
            {
                "case": "ingest_bulk",
                "backend": "sqlite",
                "metrics": {
                    "items": lite["count"],
                    "seconds": lite["seconds"],
                    "items_per_s": lite_rate,
                    "peak_rss_mb": lite["rss_mb"],
                },
                "reference": (
                    "SQLite alone writing the same item, replica and event rows into a fresh "
                    "catalogue (DLM's connection settings; staged beforehand in temporary tables, "
                    "then one INSERT ... SELECT per table and the commit, timed): the database's "
                    "own floor, in items/s"
                ),
                "reference_value": floor,
                "ratio": lite_rate / floor,
                "targets": {
                    f">= {TARGET_RATE:,} items/s": lite_rate >= TARGET_RATE,
                    f"peak RSS < {TARGET_RSS_MB} MB": lite["rss_mb"] < TARGET_RSS_MB,
                },
            }
        )
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m bench.run ingest_bulk [--scale F]")
