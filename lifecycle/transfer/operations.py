"""DLM's own subprocess layer over the rclone binary: argv lists only, never a shell.

One rclone process moves, deletes or hashes a whole batch (`--files-from-raw`), and its
JSON log (`--use-json-log`) plus its `--combined` report tell, per file, what happened.
Remotes are defined by `RCLONE_CONFIG_<NAME>_*` environment variables from each storage's
`RcloneTarget`, so credentials never touch a file or an argv.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lifecycle.errors import (
    InvalidValueError,
    StorageUnavailableError,
)
from lifecycle.links import refused_paths as refused_paths_under
from lifecycle.transfer.log import (
    HASHES,
    LogReader,
    explain,
    is_not_found,
    object_info,
    one_line,
    parse_combined,
    raise_for,
    stderr_message,
)
from lifecycle.transfer.process import (
    batch_deadline,
    deadline_text,
    kill_group,
    popen,
    run,
    run_batch,
)
from lifecycle.transfer.target import ObjectInfo, RcloneTarget

# Flags every batch command shares: machine-readable logs on stderr (plus stall_flags()).
_COMMON_FLAGS = ("--use-json-log", "--stats", "0")
_LOG_INFO = ("--log-level", "INFO")
_LOG_DEBUG = ("--log-level", "DEBUG")


def refused_paths(target: RcloneTarget, files: Sequence[str]) -> dict[str, str]:
    """path -> why rclone must not be given it, for each of `files` (relative to target) that
    is, or goes through, a symbolic link on a local target (`target.local_root`); {} for
    remote targets. One lstat per path component, directories cached (no process)."""
    if target.local_root is None:
        return {}
    found = refused_paths_under(target.local_root, files)
    root = target.local_root
    return {path: f"{path!r} {why} on {root} (DLM never follows links)" for path, why in found.items()}


def directory_spec(spec: str) -> str:
    """A root spec with a trailing '/': rclone then takes it as a directory at once (without
    it, an S3 remote that refuses a HEAD on the prefix is taken for a file)."""
    return spec if spec.endswith((":", "/")) else spec + "/"


def _write_list(directory: str, files: Sequence[str]) -> str:
    path = os.path.join(directory, "files.txt")
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for name in files:
            if "\n" in name or "\r" in name:
                raise InvalidValueError(f"a file name contains a line break: {name[:80]!r}")
            f.write(name + "\n")
    return path


def _merged_env(*targets: RcloneTarget) -> dict[str, str]:
    env: dict[str, str] = {}
    for target in targets:
        env.update(target.env)
    return env


# --------------------------------------------------------------------------- copy / move


@dataclass
class CopyReport:
    """What one batch copy did. `ok`: paths now present and matching at the destination
    (copied, or skipped because already identical); `failed`: path -> one-line reason."""

    ok: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    duration_s: float = 0.0
    returncode: int = 0
    stderr_tail: str = ""
    # path -> (hash name, hex digest) rclone checked equal at both ends after the transfer
    hashes: dict[str, tuple[str, str]] = field(default_factory=dict)


def copy_files(
    src: RcloneTarget,
    dst: RcloneTarget,
    files: Sequence[str],
    *,
    transfers: int = 8,
    checkers: int = 8,
    checksum: bool = True,
    timeout: float | None = None,
    move: bool = False,
    traverse: bool = False,
    nbytes: int = 0,
    immutable: bool = True,
) -> CopyReport:
    """Copy (or with move=True, move) `files` (paths relative to src's root, kept relative at
    dst) in ONE rclone process, and report per file. `nbytes` (the files' total size) sets
    the batch's deadline (batch_deadline) unless `timeout` is given.

    With `immutable` (the default) a file already at the destination is never replaced: the
    same bytes count as copied (a killed run's retry), different bytes fail that file.

    Files listed but absent at the source, and every file of a batch that rclone could not
    run at all (unreachable endpoint, wrong credentials, a storage that stalled past the
    deadline), come back in `failed`; so do files whose path is, or goes through, a symbolic
    link on a local source or destination: they are left out of the rclone call, the rest of
    the batch proceeds. Raises RcloneNotFoundError and InvalidValueError (a name with a line
    break); storage failures are reported, not raised.
    """
    listed = list(dict.fromkeys(files))
    report = CopyReport()
    refused = {
        **{p: f"destination {why}" for p, why in refused_paths(dst, listed).items()},
        **{p: f"source {why}" for p, why in refused_paths(src, listed).items()},
    }
    report.failed.update(refused)
    listed = [p for p in listed if p not in refused]
    if not listed:
        return report
    if timeout is None:
        timeout = batch_deadline(files=len(listed), nbytes=nbytes)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dlm-rclone-") as tmp:
        list_file = _write_list(tmp, listed)
        combined = Path(tmp) / "combined.txt"
        args = [
            "move" if move else "copy",
            directory_spec(src.spec),
            directory_spec(dst.spec),
            "--files-from-raw",
            list_file,
            # traverse: list the destination directories of the listed files (a page per
            # 1000 objects) instead of one lookup per file; cheaper unless they are huge
            *(() if traverse else ("--no-traverse",)),
            "--checksum" if checksum else "--size-only",
            "--transfers",
            str(transfers),
            "--checkers",
            str(checkers),
            "--combined",
            str(combined),
            *(("--immutable",) if immutable else ()),
            *dst.upload_flags,
            *_COMMON_FLAGS,
            *_LOG_DEBUG,  # for the "<hash> = <hex> OK" lines
        ]
        reader = LogReader(set(listed))
        outcome = run_batch(args, env=_merged_env(src, dst), timeout=timeout, reader=reader)
        marks = parse_combined(combined)
    report.duration_s = time.monotonic() - started
    report.returncode = outcome.returncode
    log = reader.finish()
    report.stderr_tail = log.tail
    report.bytes = sum(log.done.values())
    report.hashes = {p: h for p, h in log.hashes.items() if p in log.done}
    identical = {path for path, mark in marks.items() if mark == "="}
    if outcome.timed_out:
        reason = (
            f"the storage stalled: rclone {args[0]} did not finish "
            f"{deadline_text(timeout, len(listed), nbytes)} and was stopped; the next run retries"
        )
    elif outcome.aborted:
        reason = outcome.aborted
    elif log.global_errors:
        reason = log.global_errors[-1]
    elif outcome.returncode != 0:
        last = log.tail.strip().splitlines()[-1:] or [""]
        reason = one_line(last[0]) or f"rclone exited with code {outcome.returncode}"
    else:
        reason = ""
    reason = explain(reason)
    for path in listed:
        if path in log.done or (path in identical and path not in log.errors):
            report.ok.add(path)
        elif path in log.errors:
            report.failed[path] = explain(log.errors[path])
            if "immutable file modified" in log.errors[path]:
                report.failed[path] = "a different file already exists at the destination (left as it is)"
        elif reason:
            report.failed[path] = reason
        else:
            report.failed[path] = "not found at the source"
    return report


def move_files(
    src: RcloneTarget,
    dst: RcloneTarget,
    files: Sequence[str],
    *,
    transfers: int = 8,
    checkers: int = 8,
    checksum: bool = True,
    timeout: float | None = None,
    nbytes: int = 0,
) -> CopyReport:
    """copy_files with `rclone move`: sources of files in `ok` are deleted. Same raises."""
    return copy_files(
        src,
        dst,
        files,
        transfers=transfers,
        checkers=checkers,
        checksum=checksum,
        timeout=timeout,
        move=True,
        nbytes=nbytes,
    )


# --------------------------------------------------------------------------- delete


@dataclass
class DeleteReport:
    """What one batch delete did: `ok` holds paths now absent (deleted, or already absent)."""

    ok: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)
    duration_s: float = 0.0
    returncode: int = 0
    stderr_tail: str = ""


def delete_files(
    target: RcloneTarget,
    files: Sequence[str],
    *,
    checkers: int = 8,
    timeout: float | None = None,
) -> DeleteReport:
    """Delete `files` (relative to target's root) in ONE rclone process; absent files count
    as deleted. A path that is, or goes through, a symbolic link on a local target is not
    deleted: it is reported failed. `timeout` defaults to batch_deadline() of the files.
    Raises RcloneNotFoundError; storage failures are reported per file."""
    listed = list(dict.fromkeys(files))
    report = DeleteReport()
    report.failed.update(refused_paths(target, listed))
    listed = [p for p in listed if p not in report.failed]
    if not listed:
        return report
    if timeout is None:
        timeout = batch_deadline(files=len(listed))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dlm-rclone-") as tmp:
        list_file = _write_list(tmp, listed)
        args = [
            "delete",
            directory_spec(target.spec),
            "--files-from-raw",
            list_file,
            "--no-traverse",
            "--checkers",
            str(checkers),
            *_COMMON_FLAGS,
            *_LOG_INFO,
        ]
        reader = LogReader(set(listed))
        outcome = run_batch(args, env=target.env, timeout=timeout, reader=reader)
    report.duration_s = time.monotonic() - started
    report.returncode = outcome.returncode
    log = reader.finish()
    report.stderr_tail = log.tail
    if outcome.timed_out:
        reason = (
            f"the storage stalled: rclone delete did not finish "
            f"{deadline_text(timeout, len(listed), 0)} and was stopped; the next run retries"
        )
    elif outcome.aborted:
        reason = outcome.aborted
    elif log.global_errors and (outcome.returncode != 0 or not log.deleted):
        reason = log.global_errors[-1]
    elif outcome.returncode != 0:
        reason = f"rclone exited with code {outcome.returncode}"
    else:
        reason = ""
    reason = explain(reason)
    for path in listed:
        if path in log.deleted:
            report.ok.add(path)
        elif path in log.errors:
            report.failed[path] = explain(log.errors[path])
        elif reason and not is_not_found(reason):
            report.failed[path] = reason
        else:
            report.ok.add(path)
    return report


def lsjson(
    target: RcloneTarget,
    *,
    recursive: bool = True,
    hash: bool = False,
    files_only: bool = True,
    hash_types: Sequence[str] = ("md5",),
    metadata: bool = False,
    timeout: float | None = None,
    links: list[str] | None = None,
) -> Iterator[ObjectInfo]:
    """Stream the objects under target (paths relative to it), parsed as rclone prints them.

    With hash=True each ObjectInfo carries the first of `hash_types` the remote gives
    (computed by reading local files; native on S3). Symbolic links on a local target are
    never followed nor listed; when the listing completes, their paths are appended to
    `links` if given. `timeout` bounds the whole listing; whatever it is, rclone is stopped
    when it prints nothing for batch_deadline() seconds while the caller waits for its next
    entry (a stalled storage).

    Raises, when rclone fails, CredentialsError, StorageUnavailableError (also when the
    storage stalled) or RcloneError (e.g. directory not found, unknown remote;
    `is_not_found(str(exc))` tells the former).
    """
    local = target.local_root is not None
    # On a local target rclone's NOTICEs name the links it skipped: keep them, as JSON. NOTICE
    # also carries rclone's final "Failed to lsjson: <why>".
    log = ("--use-json-log", "--log-level", "NOTICE") if local else ("--log-level", "NOTICE")
    args = ["lsjson", directory_spec(target.spec), *log]
    if recursive:
        args.append("-R")
    if files_only:
        args.append("--files-only")
    if hash:
        args.append("--hash")
        for name in hash_types:
            args += ["--hash-type", name]
    if metadata:
        args.append("--metadata")
    idle = batch_deadline()
    with (
        tempfile.TemporaryFile(prefix="dlm-rclone-err-") as errfile,
        popen(args, env=target.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errfile) as proc,
    ):
        assert proc.stdout is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        waiting: list[float | None] = [None]  # since when we wait for rclone's next line
        stalled = threading.Event()
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.5):
                since = waiting[0]
                if since is not None and time.monotonic() - since > idle:
                    stalled.set()
                    kill_group(proc)
                    return

        watcher = threading.Thread(target=watch, name="dlm-lsjson-watchdog", daemon=True)
        watcher.start()
        try:
            while True:
                waiting[0] = time.monotonic()
                raw = proc.stdout.readline()
                waiting[0] = None
                if not raw:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise StorageUnavailableError(
                        f"the storage stalled: rclone lsjson did not finish within {timeout:g}s"
                    )
                line = raw.strip().rstrip(b",")
                if not line.startswith(b"{"):
                    continue
                entry = json.loads(line)
                if isinstance(entry, dict) and (not files_only or not entry.get("IsDir")):
                    yield object_info(entry)
            proc.wait()
        finally:
            done.set()
            if proc.poll() is None:
                kill_group(proc)
                proc.wait()
        if stalled.is_set():
            raise StorageUnavailableError(
                f"the storage stalled: rclone lsjson of {target.spec} printed nothing for {idle:g}s "
                "and was stopped"
            )
        if proc.returncode != 0:
            errfile.seek(0)
            message = stderr_message(errfile.read()) or f"rclone exited with code {proc.returncode}"
            raise_for(message, f"rclone could not list {target.spec}")
        if local and links is not None:
            errfile.seek(0)
            links.extend(_skipped_links(errfile))


def _skipped_links(stderr: Iterable[bytes]) -> Iterator[str]:
    """The paths of the symbolic links rclone's local backend skipped, from its JSON log."""
    for raw in stderr:
        if b"symlink" not in raw or not raw.startswith(b"{"):
            continue
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(raw)
            obj = entry.get("object") if isinstance(entry, dict) else None
            if isinstance(obj, str) and obj and entry.get("level") == "notice":
                yield obj


def hashsum(
    target: RcloneTarget,
    files: Sequence[str],
    algo: str,
    *,
    download: bool | None = None,
    timeout: float | None = None,
    nbytes: int = 0,
) -> dict[str, str]:
    """path -> hex digest of `algo` for each of `files` found under target, in one process
    (plus one `--download` pass for files whose remote keeps no such hash). Files absent at
    the target, and on a local target paths that are or go through a symbolic link (never
    read: `refused_paths` tells them), are absent from the result. download=True always
    reads the bytes. `nbytes` (the files' total size) sets each process's deadline unless
    `timeout` is given.

    Raises InvalidValueError for an algorithm rclone lacks, CredentialsError,
    StorageUnavailableError or RcloneError when rclone fails as a whole.
    """
    if algo not in HASHES:
        raise InvalidValueError(f"rclone cannot compute {algo!r}: use one of {', '.join(HASHES)}")
    listed = list(dict.fromkeys(files))
    refused = refused_paths(target, listed)
    listed = [p for p in listed if p not in refused]
    if not listed:
        return {}
    if timeout is None:
        timeout = batch_deadline(files=len(listed), nbytes=nbytes)
    result = _hashsum(target, listed, algo, bool(download), timeout)
    if download is None:
        missing_hash = [p for p in listed if p in result and not result[p]]
        if missing_hash:
            result.update(_hashsum(target, missing_hash, algo, True, timeout))
    return {path: value for path, value in result.items() if value}


def _hashsum(
    target: RcloneTarget, files: list[str], algo: str, download: bool, timeout: float | None
) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="dlm-rclone-") as tmp:
        list_file = _write_list(tmp, files)
        args = [
            "hashsum",
            algo,
            directory_spec(target.spec),
            "--files-from-raw",
            list_file,
            "--log-level",
            "ERROR",
        ]
        if download:
            args.append("--download")
        proc = run(args, env=target.env, timeout=timeout)
    wanted = set(files)
    result: dict[str, str] = {}
    for line in proc.stdout.decode("utf-8", "surrogateescape").splitlines():
        digest, sep, path = line.partition("  ")
        if sep and path in wanted:
            digest = digest.strip()
            # rclone prints blanks (or UNSUPPORTED) where the remote has no such hash.
            result[path] = digest if re.fullmatch(r"[0-9a-f]+", digest) else ""
    if proc.returncode != 0 and not result:
        message = stderr_message(proc.stderr)
        if "unsupported" in message.lower() and not download:
            return _hashsum(target, files, algo, True, timeout)
        raise_for(message, f"rclone could not hash files on {target.spec}")
    return result
