"""Run rclone: argv lists only, never a shell.

Every wait is bounded (stall flags, a deadline per batch, a process group killed on
timeout) and a circuit breaker stops a batch whose storage went away mid-way.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import orjson

from lifecycle.errors import (
    StorageUnavailableError,
)
from lifecycle.settings import get_settings
from lifecycle.transfer.binary import rclone_binary, user_config
from lifecycle.transfer.log import DONE, LogReader, RcloneError, error_class, explain, one_line
from lifecycle.units import format_size

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


def deadline_text(timeout: float, files: int, nbytes: int) -> str:
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


def run_batch(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    timeout: float | None,
    reader: LogReader | None = None,
) -> _Outcome:
    """Run an rclone batch command, reading its JSON log as it comes (each line parsed once,
    by `reader` when given: what it says per file is then in reader.finish()); kill its
    process group at the deadline or when the circuit breaker trips, keeping what it printed
    so far."""
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
                if reader is not None:
                    entry = reader.feed(raw)
                    if aborted is not None or entry is None or "object" not in entry:
                        continue
                else:
                    if aborted is not None or not raw.startswith(b"{") or b'"level":"debug"' in raw:
                        continue
                    try:
                        entry = orjson.loads(raw)
                    except ValueError:
                        continue
                    if not isinstance(entry, dict) or "object" not in entry:
                        continue
                msg = str(entry.get("msg", ""))
                if DONE.match(msg) or msg.startswith("Deleted"):
                    successes += 1
                    in_a_row.clear()
                elif entry.get("level") in ("error", "critical"):
                    cls = error_class(msg)
                    if successes == 0 and cls is not RcloneError:
                        systemic.append(msg)
                        if len(systemic) >= _BREAKER_ERRORS or _DEAD_HINTS.search(msg):
                            aborted = explain(one_line(msg))
                            kill_group(proc)
                    elif cls is StorageUnavailableError:
                        in_a_row.append(msg)
                        if len(in_a_row) >= _BREAKER_ERRORS:
                            aborted = one_line(f"the storage stalled or went away mid-batch: {msg}")
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
