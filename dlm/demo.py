"""`dlm demo`: the lifecycle on the embedded default (SQLite, two posix volumes, a local S3)."""

from __future__ import annotations

import json
import os
import random
import shlex
import tempfile
from collections.abc import Callable
from pathlib import Path

from dlm import render
from lifecycle.db import dispose_engines
from lifecycle.settings import reset_settings

DEMO_CREDENTIALS = "DLM_DEMO_S3"


def _sample_files(src: Path) -> list[Path]:
    """A small observation run: raw frames, a calibration file and a processed product."""
    rng = random.Random(42)
    files = []
    for i in range(1, 5):
        p = src / f"run001/raw/frame{i:03d}.fits"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rng.randbytes(64 * 1024 + i * 1000))
        files.append(p)
    cal = src / "run001/cal/flat.fits"
    cal.parent.mkdir(parents=True, exist_ok=True)
    cal.write_bytes(rng.randbytes(32 * 1024))
    files.append(cal)
    prod = src / "run001/products/image.fits"
    prod.parent.mkdir(parents=True, exist_ok=True)
    prod.write_bytes(rng.randbytes(128 * 1024))
    files.append(prod)
    return files


def run_demo(
    workdir: Path | None, *, steps: list[Callable[[Callable[..., None]], None]] | None = None
) -> None:
    """Set up the demo estate in `workdir` (or a temp dir), then walk through the lifecycle.

    Raises DLMError when a step fails (the CLI prints it as one line).
    """
    from dlm.cli import app
    from lifecycle.seaweed import SeaweedServer

    base = Path(workdir or tempfile.mkdtemp(prefix="dlm-demo-")).resolve()
    base.mkdir(parents=True, exist_ok=True)
    os.environ["DLM_HOME"] = str(base / "home")
    os.environ.pop("DLM_DATABASE_URL", None)
    reset_settings()
    dispose_engines()

    def dlm(*args: str) -> None:
        render.out.print(f"\n[bold cyan]$ dlm {shlex.join(args)}[/]")
        try:
            app(args=list(args), standalone_mode=False)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise

    render.out.print(f"[bold]DLM demo[/] in {base} (catalogue: SQLite at {base / 'home' / 'dlm.db'})")
    render.out.print("starting a local SeaweedFS S3 server ...")
    with SeaweedServer(base / "s3") as s3:
        os.environ[f"{DEMO_CREDENTIALS}_ACCESS_KEY_ID"] = s3.access_key
        os.environ[f"{DEMO_CREDENTIALS}_SECRET_ACCESS_KEY"] = s3.secret_key
        s3.create_bucket("dlm-demo")
        for d in ("disk-a", "disk-b", "incoming"):
            (base / d).mkdir(exist_ok=True)
        files = _sample_files(base / "incoming")
        (base / "incoming/raw-meta.json").write_text(json.dumps({"instrument": "cam1", "kind": "raw"}))

        dlm("init")
        dlm(
            "storage",
            "add",
            "disk-a",
            "--kind",
            "posix",
            "--root",
            str(base / "disk-a"),
            "--tier",
            "hot",
            "--location",
            "site-a",
            "--capacity",
            "64MiB",
        )
        dlm(
            "storage",
            "add",
            "disk-b",
            "--kind",
            "posix",
            "--root",
            str(base / "disk-b"),
            "--tier",
            "warm",
            "--location",
            "site-a",
            "--capacity",
            "64MiB",
        )
        dlm(
            "storage",
            "add",
            "s3-archive",
            "--kind",
            "s3",
            "--root",
            "dlm-demo/archive",
            "--endpoint",
            s3.endpoint,
            "--credentials-env",
            DEMO_CREDENTIALS,
            "--tier",
            "cold",
            "--location",
            "site-b",
        )
        dlm("storage", "list")
        raw = [str(f) for f in files if "/raw/" in f.as_posix()]
        dlm(
            "ingest",
            "--storage",
            "disk-a",
            "--upload",
            *raw[:1],
            "--name",
            "run001/raw/frame001.fits",
            "--meta-json",
            str(base / "incoming/raw-meta.json"),
            "--meta",
            "exposure=30",
            "--phase",
            "LIQUID",
        )
        for f in raw[1:]:
            dlm(
                "ingest",
                "--storage",
                "disk-a",
                "--upload",
                f,
                "--name",
                f"run001/raw/{Path(f).name}",
                "--meta-json",
                str(base / "incoming/raw-meta.json"),
                "--meta",
                "exposure=60",
                "--phase",
                "LIQUID",
            )
        dlm(
            "ingest",
            "--storage",
            "disk-b",
            "--upload",
            str(files[4]),
            "--name",
            "run001/cal/flat.fits",
            "--meta",
            "kind=cal",
            "--phase",
            "SOLID",
        )
        dlm(
            "ingest",
            "--storage",
            "s3-archive",
            "--upload",
            str(files[5]),
            "--name",
            "run001/products/image.fits",
            "--meta",
            "kind=product",
            "--meta",
            "band=r",
            "--lifetime",
            "30d",
        )
        # a file that is already on a storage is registered in place
        inplace = base / "disk-b" / "run001" / "notes.txt"
        inplace.parent.mkdir(parents=True, exist_ok=True)
        inplace.write_text("observing log: clear skies\n")
        dlm("ingest", "--storage", "disk-b", str(inplace), "--meta", "kind=log")
        dlm(
            "ingest",
            "--storage",
            "disk-a",
            "--upload",
            raw[0],
            "--name",
            "run001/raw/frame001.fits",
            "--meta",
            "kind=raw",
            "--meta",
            "reprocessed=true",
            "--phase",
            "LIQUID",
        )
        dlm("items", "list")
        dlm("items", "list", "--where", "meta.kind = 'raw' and meta.exposure >= 60")
        dlm("items", "list", "--where", "name ~ 'run001/raw/*' and version > 1 or storage = 's3-archive'")
        dlm("datasets", "create", "raw-frames", "--where", "meta.kind = 'raw'")
        dlm("datasets", "show", "raw-frames")
        dlm("items", "show", "run001/raw/frame001.fits")
        dlm("status")
        for step in steps or []:
            step(dlm)
    render.out.print(f"\n[bold green]demo complete[/]: catalogue and volumes kept in {base}")
