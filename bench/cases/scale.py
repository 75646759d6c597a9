"""Registration and planning as the catalogue grows: 100,000, 1,000,000 and 5,000,000 items (at
scale 1) on PostgreSQL. Per size, the real bulk registration (register_from_list of a generated
list, as ingest_bulk runs it) and then each planner (make_plan, as plan_scale runs it, over that
case's mix of items and replicas), each in a child process: seconds, seconds per 1M items (so
linear-or-better growth shows), the child's peak RSS, and the catalogue's size on disk."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.cases import ingest_bulk, plan_scale
from bench.helpers import pg_sizes, run_child

SIZES = (100_000, 1_000_000, 5_000_000)
GROWTH = 1.2  # per-item cost at the largest size over that at the middle one (5M over 1M), at most
RSS_MB = 1024  # peak RSS of any child at the largest size, under
RSS_FLAT = 1.25  # peak RSS at the largest size over that at the middle one, at most
TOTAL_S = 15 * 60  # registration and the four planners at the largest size (scaled), under
MB = 1 << 20


def _label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000}k"
    return str(n)


def _register(n: int, tmp: Path) -> dict[str, Any]:
    """register_from_list of n generated items on a fresh catalogue (in a child); its result and
    the catalogue's sizes."""
    from devrig.postgres import fresh_postgres_database
    from lifecycle.catalogue.db import get_engine, init_db

    path = tmp / "list.jsonl"
    ingest_bulk.generate(path, n)
    try:
        with fresh_postgres_database("dlm_bench_scale") as url:
            init_db(url)
            get_engine(url).dispose()
            got = run_child("bench.cases.ingest_bulk", url, str(path), what="registration child")
            got["sizes"] = pg_sizes(url)
    finally:
        path.unlink()
    return got


def _plan(n: int) -> dict[str, Any]:
    """plan_scale's mix of n items COPY-loaded into a fresh catalogue, each planner in a child."""
    from devrig.postgres import fresh_postgres_database

    with fresh_postgres_database("dlm_bench_scale_plan") as url:
        loaded = plan_scale.load(url, n)
        loaded["sizes"] = pg_sizes(url)
        loaded["plans"] = {
            p: run_child("bench.cases.plan_scale", url, p, what=f"planning child ({p})")
            for p in plan_scale.PIPELINES
        }
    return loaded


def _sizes_mb(sizes: dict[str, int]) -> dict[str, float]:
    return {f"{k}_mb": v / MB for k, v in sizes.items()}


def _mix(cat: dict[str, Any]) -> str:
    sizes = ", ".join(f"{k} {v / MB:,.0f} MB" for k, v in cat["mix"].items() if k != "event")
    return f"{cat['replicas']:,} replicas, {sizes}"


def run(scale: float) -> list[dict[str, Any]]:
    sizes = [max(1000, int(n * scale)) for n in SIZES]
    largest, middle = sizes[-1], sizes[len(sizes) // 2]
    steps: dict[int, dict[str, dict[str, Any]]] = {}  # size -> step -> seconds, rss, per_m, ...
    catalogues: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="dlm-bench-scale-") as tmp:
        for n in sizes:
            reg = _register(n, Path(tmp))
            plans = _plan(n)
            per = {"register": {"items": reg["count"], "seconds": reg["seconds"], "rss": reg["rss_mb"]}}
            server = reg.get("server_cpu_s")
            per["register"]["server_busy"] = None if server is None else server / reg["seconds"]
            for p, got in plans["plans"].items():
                per[p] = {
                    "items": plans["items"],
                    "seconds": got["seconds"],
                    "rss": got["rss_mb"],
                    "rss_before": got["rss_before_mb"],
                    "actions": plan_scale.work(p, got["summary"]),
                }
            for measured in per.values():
                measured["per_m"] = measured["seconds"] / measured["items"] * 1e6
            steps[n] = per
            catalogues[n] = {"registered": reg["sizes"], "mix": plans["sizes"], "replicas": plans["replicas"]}

    rows: list[dict[str, Any]] = []
    for n in sizes:
        label = _label(n)
        for step, got in steps[n].items():
            ref = steps[middle][step]["per_m"]
            metrics = {
                "items": got["items"],
                "seconds": got["seconds"],
                "s_per_1M_items": got["per_m"],
                "peak_rss_mb": got["rss"],
            }
            if "actions" in got:  # the plan held in memory: what a planner's RSS grows with
                metrics["actions"] = got["actions"]
                metrics["rss_before_mb"] = got["rss_before"]
            if step == "register":
                metrics["items_per_s"] = got["items"] / got["seconds"]
                metrics["server_busy"] = got["server_busy"]
            row: dict[str, Any] = {
                "case": "scale",
                "backend": f"postgresql {label}/{step}",
                "metrics": metrics,
                "reference_value": ref,
                "ratio": got["per_m"] / ref,
            }
            if n == sizes[0] and step in ("register", "replicate"):
                row["reference"] = (
                    f"seconds per 1M items of the same step at {_label(middle)} items; ratio is this size's "
                    "over it (at most 1 at a larger size: linear or better)"
                    + (
                        ". register: register_from_list of a generated list (ingest_bulk's) on a fresh "
                        "catalogue in a child process, server_busy its server's CPU per second"
                        if step == "register"
                        else ". replicate, migrate, expire, rebalance: make_plan in a child process each, "
                        "over plan_scale's mix (about 2 replicas per item) COPY-loaded into another fresh "
                        "catalogue and ANALYZEd"
                    )
                )
            if n == largest:
                mid, at = steps[middle][step], _label(middle)
                row["targets"] = {
                    f"per-item cost <= {GROWTH}x that at {at}": got["per_m"] <= GROWTH * mid["per_m"],
                    f"peak RSS < {RSS_MB} MB": got["rss"] < RSS_MB,
                    f"peak RSS <= {RSS_FLAT}x that at {at} (flat)": got["rss"] <= RSS_FLAT * mid["rss"],
                }
            rows.append(row)
        cat = catalogues[n]
        total = sum(s["seconds"] for s in steps[n].values())
        row = {
            "case": "scale",
            "backend": f"postgresql {label}/total",
            "metrics": {
                "items": n,
                "seconds": total,
                "s_per_1M_items": total / n * 1e6,
                **_sizes_mb(cat["registered"]),
            },
        }
        if n == sizes[0]:
            row["reference"] = (
                "seconds: registration and the four planners; *_mb: the registered catalogue on disk "
                "(pg_database_size after a CHECKPOINT; each table with its indexes and TOAST, one replica "
                "and one event per item). The planners' mix catalogue: "
                + "; ".join(
                    f"{_label(m)}: {catalogues[m]['replicas']:,} replicas, "
                    + ", ".join(
                        f"{k} {v / MB:,.0f} MB" for k, v in catalogues[m]["mix"].items() if k != "event"
                    )
                    for m in sizes
                )
            )
        if n == largest:
            row["targets"] = {f"registration and planners < {TOTAL_S * scale:g} s": total < TOTAL_S * scale}
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit("usage: python -m bench.run scale [--scale F]")
