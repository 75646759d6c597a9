"""The REST API on a large catalogue: 1,000,000 items (at scale 1) bulk-registered on PostgreSQL,
`dlm api` as a real server process, an owner's token.

1. The first page of `GET /api/items?where=meta.field = 'fNNNN'` (one item in 1,000 matches,
   90% of them the token owner's), requests one after another from this process: p50 and p95
   over 200 different values. Also the first page of a filter one item in four matches
   (`meta.band = 'g'`) and of a numeric one (`meta.run = 42`).
2. Sustained load from a second process on loopback (threads, one connection each), bounded by
   a request count and a time limit: requests/s and p99, for that first page and for
   `GET /api/items/{oid}/download-url` (a presigned S3 URL) over 1,000 of the owner's items.

Target: the selective filter's first page p95 <= 50 ms.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson

TARGET_P95_MS = 50.0
FIELDS = 1000  # distinct values of meta.field
LATENCY_REQUESTS = 200
LOAD_THREADS = 4
LOAD_REQUESTS = 4000
LOAD_SECONDS = 30.0
S3_ENV = "BENCH_S3"  # the storage's credentials prefix (presigning needs keys, no server)


def generate(path: Path, n: int) -> None:
    """A JSON-lines list of n READY items: 90% owned by alice, metadata with a field of 1,000
    values, a band of four and a numeric run of 97."""
    with open(path, "wb") as f:
        for i in range(n):
            name = f"run{i % 97}/obs{i:07d}.fits"
            f.write(
                orjson.dumps(
                    {
                        "name": name,
                        "size": 1_000_000 + (i * 7919) % 50_000_000,
                        "checksum": f"{i:032x}",
                        "owner": "bob" if (i // 7) % 10 == 9 else "alice",
                        "metadata": {"field": f"f{i % FIELDS:04d}", "band": "griz"[i % 4], "run": i % 97},
                    }
                )
                + b"\n"
            )


def _register(url: str, path: Path) -> float:
    """Register the list (bulk path, COPY) onto an S3 storage row; returns seconds."""
    from sqlalchemy import text

    from lifecycle.catalogue.bulk import register_from_list
    from lifecycle.catalogue.db import get_engine, session_scope
    from lifecycle.catalogue.models import Storage

    started = time.perf_counter()
    with session_scope(url) as session:
        storage = Storage(
            name="archive",
            kind="s3",
            root="bench-archive",
            endpoint="http://127.0.0.1:9",  # presigning never connects
            credentials_env=S3_ENV,
        )
        session.add(storage)
        register_from_list(session, storage=storage, source=path)
    seconds = time.perf_counter() - started
    with get_engine(url).begin() as conn:
        conn.execute(text("ANALYZE"))
    return seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _items_path(where: str) -> str:
    return f"/api/items?limit=100&where={quote(where)}"


def _first_pages(base: str, token: str, wheres: list[str]) -> list[float]:
    """Milliseconds of each first page, one request after another (answers checked)."""
    import httpx

    times = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        c.get(_items_path(wheres[0]))  # a warm connection
        for where in wheres:
            t = time.perf_counter()
            r = c.get(_items_path(where))
            times.append((time.perf_counter() - t) * 1000)
            if r.status_code != 200 or not r.json()["items"]:
                raise RuntimeError(f"{where}: {r.status_code} {r.text[:300]}")
    return times


def _load(
    base: str, token: str, paths: list[str], count: int, seconds: float, threads: int
) -> dict[str, Any]:
    """Run in the load process: `threads` clients take paths round-robin until `count` requests
    are done or `seconds` have passed; requests/s, p50, p99 (ms) and errors."""
    import httpx

    lock = threading.Lock()
    times: list[float] = []
    errors = [0]
    next_i = [0]
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
            while time.perf_counter() < deadline:
                with lock:
                    i = next_i[0]
                    if i >= count:
                        return
                    next_i[0] += 1
                t = time.perf_counter()
                r = c.get(paths[i % len(paths)])
                took = (time.perf_counter() - t) * 1000
                with lock:
                    times.append(took)
                    errors[0] += r.status_code != 200

    started = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    wall = time.perf_counter() - started
    return {
        "requests": len(times),
        "seconds": wall,
        "rps": len(times) / wall,
        "p50_ms": _percentile(times, 0.5),
        "p99_ms": _percentile(times, 0.99),
        "errors": errors[0],
    }


def _load_in_child(base: str, token: str, paths: list[str], count: int, seconds: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"base": base, "token": token, "paths": paths, "count": count, "seconds": seconds}, f)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.cases.api_latency", "--load", f.name],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
            timeout=seconds + 120,
            check=False,
        )
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"load process failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run(scale: float) -> list[dict[str, Any]]:
    import httpx
    from sqlalchemy import text

    from devrig.postgres import fresh_postgres_database
    from lifecycle.catalogue.db import dispose_engines, get_engine, init_db, session_scope
    from lifecycle.catalogue.tokens import TokenCreate, create_token

    n = max(10_000, int(1_000_000 * scale))
    root = Path(__file__).resolve().parents[2]
    with (
        tempfile.TemporaryDirectory(prefix="dlm-bench-api-") as tmp,
        fresh_postgres_database("dlm_bench") as url,
    ):
        init_db(url)
        path = Path(tmp) / "list.jsonl"
        generate(path, n)
        register_s = _register(url, path)
        with session_scope(url) as s:
            token = create_token(TokenCreate(owner="alice"), session=s).secret
        with get_engine(url).connect() as conn:
            oids = [
                str(o)
                for o in conn.execute(
                    text("SELECT oid FROM item WHERE owner = 'alice' ORDER BY md5(oid::text) LIMIT 1000")
                ).scalars()
            ]
        dispose_engines()
        port = _free_port()
        env = {
            **os.environ,
            "PYTHONPATH": str(root),
            "DLM_DATABASE_URL": url,
            "DLM_HOME": str(Path(tmp) / "home"),
            f"{S3_ENV}_ACCESS_KEY_ID": "bench",
            f"{S3_ENV}_SECRET_ACCESS_KEY": "bench-secret",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "dlm.cli", "api", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/api/openapi.json", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("dlm api did not start")
                time.sleep(0.2)
            selective = [f"meta.field = 'f{(i * 7) % FIELDS:04d}'" for i in range(LATENCY_REQUESTS)]
            sel = _first_pages(base, token, selective)
            band = _first_pages(base, token, [f"meta.band = '{'griz'[i % 4]}'" for i in range(50)])
            numeric = _first_pages(base, token, [f"meta.run = {i % 97}" for i in range(50)])
            list_load = _load_in_child(
                base, token, [_items_path(w) for w in selective], LOAD_REQUESTS, LOAD_SECONDS
            )
            url_load = _load_in_child(
                base,
                token,
                [f"/api/items/{oid}/download-url" for oid in oids],
                LOAD_REQUESTS,
                LOAD_SECONDS,
            )
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    p95 = _percentile(sel, 0.95)
    return [
        {
            "case": "api_latency",
            "backend": "postgresql",
            "metrics": {
                "items": n,
                "register_s": register_s,
                "field_p50_ms": statistics.median(sel),
                "field_p95_ms": p95,
                "band_p95_ms": _percentile(band, 0.95),
                "run_p95_ms": _percentile(numeric, 0.95),
                "list_rps": list_load["rps"],
                "list_p99_ms": list_load["p99_ms"],
                "list_errors": list_load["errors"],
                "url_rps": url_load["rps"],
                "url_p99_ms": url_load["p99_ms"],
                "url_errors": url_load["errors"],
            },
            "reference": (
                f"first pages (100 items) through `dlm api` on loopback; field = one item in "
                f"{FIELDS:,}, band = one in 4, run = one in 97 (numeric); load: {LOAD_THREADS} "
                f"threads of a second process, at most {LOAD_REQUESTS:,} requests or "
                f"{LOAD_SECONDS:g} s per route ({list_load['requests']:,} list requests in "
                f"{list_load['seconds']:.1f} s, {url_load['requests']:,} download-url requests in "
                f"{url_load['seconds']:.1f} s)"
            ),
            "targets": {
                f"first page p95 <= {TARGET_P95_MS:g} ms (meta.field = ...)": p95 <= TARGET_P95_MS,
                "no failed request under load": list_load["errors"] == 0 and url_load["errors"] == 0,
            },
        }
    ]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--load":
        spec = json.loads(Path(sys.argv[2]).read_text())
        print(
            json.dumps(
                _load(
                    spec["base"], spec["token"], spec["paths"], spec["count"], spec["seconds"], LOAD_THREADS
                )
            )
        )
    else:
        sys.exit("usage: python -m bench.run api_latency [--scale F]")
