"""Times DLM's replicate flow on 4 files of 256 MiB, posix to S3, against the cheapest bare rclone
that gives the same end-to-end guarantee.

DLM's guarantee: every copy's MD5, as the destination holds it, equals the catalogue's. For
objects this size rclone's default multi-thread upload stores no MD5 at all, so a bare copy
with default flags can only be checked by reading it back. The cheapest bare way to the same
guarantee is the S3 backend's own multipart upload (`--multi-thread-streams 0`: it hashes the
source, stores the MD5 with the object and compares it after the copy) with `--checksum`:
exactly DLM's copy flags, and the reference. Measured too, in the same run: the default
(multi-thread) copy, weaker, and that copy followed by `rclone check --download` (same
guarantee by reading every byte back)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.cases.replicate_small import (
    CREDS,
    WARM_FILES,
    bare_rclone,
    build_catalogue,
    environ,
    make_files,
    prefect_server,
    ready_on,
    run_replicate,
    s3_server,
    s3_target,
    same_bytes,
    stage_summary,
    warm_up,
)
from lifecycle.storage.s3 import S3_UPLOAD_FLAGS

FILES = 4
FILE_SIZE = 256 * 1024 * 1024
TARGET_VS_RCLONE = 1.2


def check_download(src_root: Path, target: Any, names: Sequence[str], checkers: int) -> float:
    """Seconds of one `rclone check SRC DST --files-from LIST --download --checkers N`."""
    return bare_rclone(src_root, target, names, ["--download", "--checkers", str(checkers)], verb="check")


def run(scale: float) -> list[dict[str, Any]]:
    from devrig.postgres import fresh_postgres_database
    from lifecycle.settings import get_settings, reset_settings

    size = max(1 << 20, int(FILE_SIZE * scale))
    with tempfile.TemporaryDirectory(prefix="dlm-bench-large-") as tmp_name:
        tmp = Path(tmp_name)
        src_root = tmp / "src"
        payloads = make_files(src_root, FILES, size)
        warm = make_files(src_root, WARM_FILES, 4096, prefix="warm/", seed=1)
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
            t = get_settings().transfer
            estate = build_catalogue(url, server, src_root, "bench-dlm", "dlm", [*payloads, *warm])
            server.create_bucket("bench-ref")
            # The flags DLM's copy_files passes that change what is moved or how (its logging
            # and report flags aside), its S3 upload flags included: the cheapest bare rclone
            # whose copies carry an MD5 that rclone compares with the source's after the copy.
            common = ["--no-traverse", "--checksum", "--transfers", str(t.transfers)]
            common += ["--checkers", str(t.checkers)]
            flags = [*common, *S3_UPLOAD_FLAGS]
            bare_rclone(src_root, s3_target(server, "bench-ref", "warmup"), names[:1], flags)
            bare_before = bare_rclone(src_root, s3_target(server, "bench-ref", "bare1"), names, flags)
            with prefect_server() as startup_s:
                warm_up(url, warm)
                dlm_s, _, report = run_replicate("replicate_large")
            bare_after = bare_rclone(src_root, s3_target(server, "bench-ref", "bare2"), names, flags)
            plain_target = s3_target(server, "bench-ref", "plain")
            plain_s = bare_rclone(src_root, plain_target, names, common)
            check_s = check_download(src_root, plain_target, names, t.checkers)
            ready = ready_on(url, estate.s3_storage_id) - len(warm)
            intact = same_bytes(server, estate, payloads)
        reset_settings()

    bare = (bare_before + bare_after) / 2
    total = FILES * size
    err = next((b["first error"] for b in report["batches"] if b.get("first error")), "")
    copy_s = max((b["seconds"] for b in report["batches"] if b["kind"] == "copy"), default=0.0)
    return [
        {
            "case": "replicate_large",
            "backend": "dlm-flow",
            "metrics": {
                "files": FILES,
                "mib_each": size / 2**20,
                "seconds": dlm_s,
                "mib_per_s": total / 2**20 / dlm_s,
                "default_copy_s": plain_s,
                "default_copy_check_s": plain_s + check_s,
                "copy_and_verify_s": copy_s,
                "prefect_startup_s": startup_s,
                "ready_s3_replicas": ready,
                "failed_copies": report.get("failed", 0),
            },
            "reference": (
                f"bare `rclone copy SRC DST --files-from LIST {' '.join(flags)}` (DLM's copy flags: the "
                f"cheapest bare rclone whose copies carry an MD5 it checks against the source's) of the "
                f"same files to a fresh prefix, mean of one run before DLM's and one after "
                f"({bare_before:.2f} s, {bare_after:.2f} s). For comparison, same run: the default "
                f"multi-thread copy (`{' '.join(common)}`, objects without an MD5: weaker) {plain_s:.2f} s, "
                f"plus `rclone check --download` to get the same guarantee by reading back: "
                f"{plain_s + check_s:.2f} s. copy_and_verify_s is DLM's batch "
                f"(rclone copy, its hash check against the catalogue); Prefect start-up "
                f"({startup_s:.1f} s) is not in DLM's time, and an untimed run copied {len(warm)} small "
                "files first (the server has served a run). "
                f"{stage_summary(report)}"
            ),
            "reference_value": bare,
            "ratio": dlm_s / bare,
            "targets": {
                f"DLM / bare rclone <= {TARGET_VS_RCLONE}": dlm_s / bare <= TARGET_VS_RCLONE,
                "no failed copies" + (f" (first error: {err})" if err else ""): not report.get("failed"),
                f"all {FILES} items have a READY S3 replica": ready == FILES,
                "every object matches byte for byte": intact,
            },
        }
    ]
