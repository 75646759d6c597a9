"""Streaming checksums of payloads.

The default algorithm is MD5: integrity here guards against accidental corruption, not an
adversary, and MD5 is the hash that S3 (single-part ETag) and rclone both compute natively,
so an rclone `--checksum` transfer verifies end to end against the catalogue's value without
reading the bytes a second time. sha256 (and sha1, blake2b) can be chosen with
DLM_CHECKSUM_ALGO; the algorithm is recorded per item.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

from lifecycle.errors import InvalidValueError, UnreadableFileError

ALGORITHMS = ("md5", "sha1", "sha256", "blake2b")
CHUNK = 1024 * 1024


def new_hasher(algo: str) -> hashlib._Hash:
    if algo not in ALGORITHMS:
        raise InvalidValueError(f"unknown checksum algorithm {algo!r}: use one of {', '.join(ALGORITHMS)}")
    return hashlib.new(algo)


def checksum_stream(stream: BinaryIO, algo: str) -> tuple[str, int]:
    """(hex digest, bytes read) of a stream, read in 1 MiB chunks."""
    h = new_hasher(algo)
    size = 0
    while chunk := stream.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size


def checksum_file(path: Path, algo: str) -> tuple[str, int]:
    """(hex digest, size) of a local file.

    Raises FileNotFoundError, NotADirectoryError, IsADirectoryError as open() does (callers say
    which storage or source is missing), UnreadableFileError for any other failure to read
    (permission denied, an I/O error).
    """
    try:
        with open(path, "rb") as f:
            return checksum_stream(f, algo)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise
    except OSError as exc:
        raise UnreadableFileError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
