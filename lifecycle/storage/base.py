"""The Storage protocol every backend implements, and the factory from a catalogue row."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from lifecycle.transfer.target import ObjectInfo, RcloneTarget


@runtime_checkable
class StorageBackend(Protocol):
    """One storage volume. Paths are relative, validated names (lifecycle.names)."""

    name: str

    def check(self) -> None:
        """Reach the storage and its root. Raises CredentialsError, StorageUnavailableError,
        StorageError (e.g. root or bucket does not exist)."""

    def resolve(self, user_path: str) -> str:
        """The root-relative path of a user's path (absolute inside the root, or relative).
        Raises InvalidNameError if it lies outside the root."""

    def stat(self, path: str) -> ObjectInfo:
        """Raises SourceNotFoundError if absent."""

    def open(self, path: str) -> BinaryIO:
        """A binary stream to read. Raises SourceNotFoundError."""

    def put(
        self, path: str, src: Path | BinaryIO, *, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Write an object (from a local file or a stream); returns what was stored."""

    def delete(self, path: str) -> None:
        """Remove an object; absent is not an error."""

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under prefix, recursively."""

    def checksum(self, path: str, algo: str) -> str:
        """Recompute the checksum from the bytes (streaming). Raises SourceNotFoundError."""

    def url(self, path: str, expires_s: int = 3600) -> str:
        """A URL to fetch the object (presigned for S3, file:// for posix)."""

    def rclone_target(self) -> RcloneTarget:
        """How rclone reaches this storage's root."""
