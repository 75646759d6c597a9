"""List named files on a storage in one rclone process."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from lifecycle.errors import InvalidValueError
from lifecycle.transfer.log import error_class
from lifecycle.transfer.operations import directory_spec, refused_paths
from lifecycle.transfer.process import batch_deadline, run
from lifecycle.transfer.target import RcloneTarget

# --------------------------------------------------------------------------- rclone helpers


def list_files(
    target: RcloneTarget,
    paths: Sequence[str],
    *,
    metadata: bool = False,
    hash_type: str | None = None,
    timeout: float | None = None,
) -> dict[str, dict[str, Any]]:
    """path -> rclone's lsjson entry for each of `paths` present under target, in ONE process
    (`--files-from-raw --no-traverse`); absent paths, and on a local target paths that are
    or go through a symbolic link, are absent from the result. With
    metadata=True entries carry `Metadata`, with hash_type their `Hashes` (native on S3,
    computed by reading elsewhere). Every call carries rclone's stall flags
    (lifecycle.rclone.stall_flags), so an unreachable endpoint fails it in seconds.

    Raises InvalidValueError (a path with a line break), CredentialsError,
    StorageUnavailableError or RcloneError when rclone fails as a whole.
    """
    refused = refused_paths(target, paths)  # a link is never listed as the copy
    wanted = [p for p in dict.fromkeys(paths) if p not in refused]
    if not wanted:
        return {}
    for p in wanted:
        if "\n" in p or "\r" in p:
            raise InvalidValueError(f"a file name contains a line break: {p[:80]!r}")
    spec = directory_spec(target.spec)
    with tempfile.TemporaryDirectory(prefix="dlm-verify-") as tmp:
        list_file = os.path.join(tmp, "files.txt")
        with open(list_file, "w", encoding="utf-8", newline="\n") as f:
            f.write("".join(p + "\n" for p in wanted))
        args = ["lsjson", spec, "-R", "--files-only", "--no-traverse", "--files-from-raw", list_file]
        if metadata:
            args.append("--metadata")
        if hash_type:
            args += ["--hash", "--hash-type", hash_type]
        limit = batch_deadline(files=len(wanted)) if timeout is None else timeout
        proc = run([*args, "--log-level", "ERROR"], env=target.env, timeout=limit)
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        message = " ".join((lines[-1] if lines else f"exit code {proc.returncode}").split())[:500]
        raise error_class(message)(f"rclone could not list files on {target.spec}: {message}")
    entries = json.loads(proc.stdout or b"[]")
    found: dict[str, dict[str, Any]] = {}
    want = set(wanted)
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and entry.get("Path") in want and not entry.get("IsDir"):
            found[str(entry["Path"])] = entry
    return found
