"""Read what rclone said: its JSON log, its --combined report and lsjson entries, and which
DLM error an rclone message stands for.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from lifecycle.errors import (
    CredentialsError,
    DLMError,
    StorageError,
    StorageUnavailableError,
)
from lifecycle.transfer.target import ObjectInfo

_TAIL_CHARS = 4000
# "Copied (new)", "Moved ...", and for files over rclone's multi-thread cutoff (256 MiB)
# "Multi-thread Copied (new)".
DONE = re.compile(r"^(Multi-thread )?(Copied|Moved)")
_MAX_REASON = 500


class RcloneError(StorageError):
    """An rclone command failed."""


# After each transfer rclone compares the source's hash with the destination's and, at DEBUG
# level, logs "<hash> = <hex> OK" on the file: the digest both sides agreed on.
_HASH_OK = re.compile(r"^([a-z0-9]+) = ([0-9a-f]+) OK$")


def one_line(text: str) -> str:
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


class LogReader:
    """Reads rclone's JSON log line by line, as it comes (one parse per line, orjson): per
    file, what was copied, deleted or failed and which hashes rclone found equal; `finish()`
    gives the _Log."""

    def __init__(self, listed: set[str]) -> None:
        self.listed = listed
        self.log = _Log()
        self._kept: list[str] = []  # what the tail shows: everything but DEBUG chatter

    def feed(self, raw: bytes) -> dict[str, Any] | None:
        """Take one line of the log; returns its JSON object unless it is DEBUG chatter or not
        JSON."""
        log = self.log
        if b'"level":"debug"' in raw:
            if b' OK","' in raw:  # a '"msg":"<hash> = <hex> OK",' line
                with contextlib.suppress(ValueError):
                    entry = orjson.loads(raw)
                    obj = entry.get("object") if isinstance(entry, dict) else None
                    found = _HASH_OK.match(str(entry.get("msg", ""))) if isinstance(obj, str) else None
                    if found and obj in self.listed:
                        log.hashes[obj] = (found.group(1), found.group(2))
            return None
        line = raw.decode("utf-8", "replace").strip()
        self._kept.append(line)
        if not line.startswith("{"):
            if "ERROR" in line or "CRITICAL" in line:
                log.global_errors.append(one_line(line))
            return None
        try:
            entry = orjson.loads(line)
        except ValueError:
            return None
        if not isinstance(entry, dict):
            return None
        msg = str(entry.get("msg", "")).strip()
        obj = entry.get("object")
        level = entry.get("level", "")
        if isinstance(obj, str) and obj in self.listed:
            if level in ("error", "critical"):
                log.errors.setdefault(obj, one_line(msg))
            elif DONE.match(msg):
                size = entry.get("size")
                log.done[obj] = size if isinstance(size, int) else 0
            elif msg.startswith("Deleted"):
                log.deleted.add(obj)
        elif level in ("error", "critical"):
            log.global_errors.append(one_line(_ATTEMPT.sub("", msg)))
        return entry

    def finish(self) -> _Log:
        self.log.tail = "\n".join(self._kept)[-_TAIL_CHARS:]
        return self.log


def parse_log(stderr: bytes, listed: set[str]) -> _Log:
    """What a whole rclone JSON log says (LogReader over its lines)."""
    reader = LogReader(listed)
    for raw in stderr.splitlines():
        reader.feed(raw)
    return reader.finish()


def parse_combined(path: Path) -> dict[str, str]:
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


def object_info(entry: Mapping[str, object], prefix: str = "") -> ObjectInfo:
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


def raise_for(message: str, what: str) -> None:
    cls = error_class(message)
    raise cls(f"{what}: {explain(one_line(message))}")


def stderr_message(stderr: bytes | str) -> str:
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
    return one_line(best)


# rclone's names of the hashes DLM can ask for (lifecycle.checksum.ALGORITHMS minus blake2b).
HASHES = ("md5", "sha1", "sha256")


_STALL_HINTS = re.compile(r"timeout|deadline exceeded|timed out", re.IGNORECASE)


def explain(message: str) -> str:
    """An rclone error, said plainly when it means the storage stopped answering."""
    if _STALL_HINTS.search(message) and not message.startswith("the storage stalled"):
        return one_line(f"the storage stalled (no answer within the timeout): {message}")
    return message
