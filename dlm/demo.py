"""`dlm demo`: the whole lifecycle on the embedded default (SQLite, posix volumes, a local S3)."""

from __future__ import annotations

import json
import os
import random
import shlex
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.markup import escape

from dlm import render
from lifecycle.catalogue.db import dispose_engines
from lifecycle.settings import reset_settings

DEMO_CREDENTIALS = "DLM_DEMO_S3"

# The tour, one `dlm` command a line ({base}, {src} and {endpoint} are filled in); lines
# starting with '#' are printed as headings.
TOUR = """
# A catalogue on SQLite, three posix volumes on two sites and an S3 archive (SeaweedFS)
init
storage add disk-a --kind posix --root {base}/disk-a --tier hot --location site-a --capacity 64MiB
storage add disk-b --kind posix --root {base}/disk-b --tier warm --location site-a --capacity 64MiB
storage add disk-c --kind posix --root {base}/disk-c --tier warm --location site-b --capacity 64MiB
storage add s3-archive --kind s3 --root dlm-demo/archive --endpoint {endpoint} --credentials-env DLM_DEMO_S3 \
    --tier cold --location site-b
storage list
# Ingest: upload raw frames with metadata, a calibration file, a product; register a file in place
ingest --storage disk-a --upload {src}/run001/raw/frame001.fits --name run001/raw/frame001.fits \
    --meta-json {src}/raw-meta.json --meta exposure=30 --phase LIQUID
ingest --storage disk-a --upload {src}/run001/raw/frame002.fits --name run001/raw/frame002.fits \
    --meta-json {src}/raw-meta.json --meta exposure=60 --phase LIQUID
ingest --storage disk-a --upload {src}/run001/raw/frame003.fits --name run001/raw/frame003.fits \
    --meta-json {src}/raw-meta.json --meta exposure=60 --phase LIQUID
ingest --storage disk-b --upload {src}/run001/cal/flat.fits --name run001/cal/flat.fits \
    --meta kind=cal --phase SOLID
ingest --storage s3-archive --upload {src}/run001/products/image.fits --name run001/products/image.fits \
    --meta kind=product --meta band=r --lifetime 30d
ingest --storage disk-b {base}/disk-b/run001/notes.txt --meta kind=log
# Ingesting a name again makes version 2; version 1 is never modified
ingest --storage disk-a --upload {src}/run001/raw/frame001.fits --name run001/raw/frame001.fits \
    --meta-json {src}/raw-meta.json --meta reprocessed=true --phase LIQUID
# Query the catalogue
items list
items list --where "meta.kind = 'raw' and meta.exposure >= 60"
items list --where "name ~ 'run001/raw/*' and version > 1 or storage = 's3-archive'"
datasets create raw-frames --where "meta.kind = 'raw'"
datasets show raw-frames
status
# Replicate: every item gets the copies its phase asks for (a dry run first)
run replicate --dry-run
run replicate
items show run001/cal/flat.fits
status
# A phase change: the product becomes SOLID (3 copies, 2 sites, one on a cold tier)
items set-phase run001/products/image.fits SOLID
run replicate
# An expiry: the observing log expires; its copies are deleted and a tombstone stays
items set-expiry run001/notes.txt --at 2000-01-01
run expire
items list --where "state = 'DELETED'"
# A drain: disk-b is emptied onto the others (copy first, delete once the copies are READY), then retired
storage drain disk-b
run rebalance
run rebalance
run rebalance
storage retire disk-b
# Checkout: fetch a dataset, verified against the catalogue
checkout --dataset raw-frames {base}/checkout
status
"""


def _sample_files(src: Path) -> None:
    """A small observation run: raw frames, a calibration file and a processed product."""
    rng = random.Random(42)
    for i in range(1, 4):
        p = src / f"run001/raw/frame{i:03d}.fits"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(64 * 1024 + i * 1000))
    cal = src / "run001/cal/flat.fits"
    cal.parent.mkdir(parents=True, exist_ok=True)
    cal.write_bytes(rng.randbytes(32 * 1024))
    prod = src / "run001/products/image.fits"
    prod.parent.mkdir(parents=True, exist_ok=True)
    prod.write_bytes(rng.randbytes(128 * 1024))
    (src / "raw-meta.json").write_text(json.dumps({"instrument": "cam1", "kind": "raw"}))


def tour_commands(base: Path, src: Path, endpoint: str) -> list[list[str] | str]:
    """The tour as argv lists (headings as plain strings)."""
    out: list[list[str] | str] = []
    text = TOUR.replace("\\\n", " ").format(base=base, src=src, endpoint=endpoint)
    for line in text.strip().splitlines():
        line = line.strip()
        if line.startswith("#"):
            out.append(line.lstrip("# "))
        elif line:
            out.append(shlex.split(line))
    return out


def run_demo(
    workdir: Path | None,
    *,
    app: Callable[..., Any],
    extra: Callable[[Callable[..., None]], None] | None = None,
) -> None:
    """Set up the demo estate in `workdir` (or a temp dir), then walk through the lifecycle with
    `app`, the `dlm` command (passed in by dlm.cli, so the demo does not import the CLI back).

    Raises SystemExit with the failing command's code when a step fails.
    """
    from deployments.server import stop_home_server
    from devrig.seaweed import SeaweedServer

    base = Path(workdir or tempfile.mkdtemp(prefix="dlm-demo-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    os.environ["DLM_HOME"] = str(base / "home")
    os.environ.pop("DLM_DATABASE_URL", None)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    reset_settings()
    dispose_engines()

    def dlm(*args: str) -> None:
        shown = " ".join(f'"{a}"' if (" " in a or "'" in a) else a for a in args)
        render.out.print(f"\n[bold cyan]$ dlm {shown}[/]", markup=True, highlight=False)
        try:
            app(args=list(args), standalone_mode=False)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise

    render.out.print(
        f"[bold]DLM demo[/] in {escape(str(base))} "
        f"(catalogue: SQLite at {escape(str(base / 'home' / 'dlm.db'))})",
        markup=True,
    )
    render.out.print("starting a local SeaweedFS S3 server ...")
    try:
        with SeaweedServer(base / "s3") as s3:
            os.environ[f"{DEMO_CREDENTIALS}_ACCESS_KEY_ID"] = s3.access_key
            os.environ[f"{DEMO_CREDENTIALS}_SECRET_ACCESS_KEY"] = s3.secret_key
            s3.create_bucket("dlm-demo")
            for d in ("disk-a", "disk-b", "disk-c"):
                (base / d).mkdir(exist_ok=True)
            src = base / "incoming"
            _sample_files(src)
            notes = base / "disk-b" / "run001" / "notes.txt"
            notes.parent.mkdir(parents=True, exist_ok=True)
            notes.write_text("observing log: clear skies\n")
            for step in tour_commands(base, src, s3.endpoint):
                if isinstance(step, str):
                    render.out.print(f"\n[bold magenta]# {step}[/]", markup=True)
                else:
                    dlm(*step)
            if extra is not None:
                extra(dlm)
    finally:
        # The runs started this home's Prefect server; their history stays in its database
        # (`DLM_HOME={base}/home dlm server start` shows it again in the UI).
        stop_home_server(base / "home")
    render.out.print(
        f"\n[bold green]demo complete[/]: catalogue, volumes and run history kept in {escape(str(base))}",
        markup=True,
    )
