"""The benchmark runner: `python -m bench.run [CASE ...] [--scale F]`; prints one table, saves JSON.

A case is a module in bench/cases/ with `run(scale: float) -> list[dict]`; each row has `case`,
`backend`, `metrics` (name -> number), and optionally `reference` (what the case measured in the
same run to compare against), `reference_value`, `ratio` and `targets` (description -> met?).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys
import time
from pathlib import Path
from typing import Any

import bench.cases

RESULTS = Path(__file__).parent / "results"


def available_cases() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(bench.cases.__path__) if not m.name.startswith("_"))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render(rows: list[dict[str, Any]]) -> str:
    """One plain-text table: case, backend, the union of metric columns, reference, ratio, targets."""
    metrics: list[str] = []
    for row in rows:
        for key in row.get("metrics", {}):
            if key not in metrics:
                metrics.append(key)
    header = ["case", "backend", *metrics, "reference", "ratio", "targets met"]
    table = [header]
    notes: list[str] = []
    for row in rows:
        targets = row.get("targets") or {}
        met = f"{sum(targets.values())}/{len(targets)}" if targets else "-"
        table.append(
            [
                row["case"],
                row["backend"],
                *(_fmt(row.get("metrics", {}).get(m)) for m in metrics),
                _fmt(row.get("reference_value")),
                _fmt(row.get("ratio")),
                met,
            ]
        )
        if row.get("reference"):
            notes.append(f"  {row['case']}/{row['backend']} reference: {row['reference']}")
        for text, ok in targets.items():
            notes.append(f"  {row['case']}/{row['backend']} target {text}: {'met' if ok else 'MISSED'}")
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + (["", *notes] if notes else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "cases", nargs="*", help=f"cases to run (default: all of {', '.join(available_cases())})"
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="work size factor (1.0 = full; 0.01 = smoke)"
    )
    args = parser.parse_args(argv)
    names = args.cases or available_cases()
    unknown = sorted(set(names) - set(available_cases()))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: choose from {', '.join(available_cases())}")
    rows: list[dict[str, Any]] = []
    for name in names:
        module = importlib.import_module(f"bench.cases.{name}")
        started = time.perf_counter()
        print(f"running {name} at scale {args.scale} ...", file=sys.stderr, flush=True)
        rows.extend(module.run(args.scale))
        print(f"  {name} took {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    print(render(rows))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = RESULTS / f"{stamp}-{'-'.join(names)}-x{args.scale:g}.json"
    out.write_text(
        json.dumps(
            {
                "scale": args.scale,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"\nresults: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
