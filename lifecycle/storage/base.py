"""The Storage protocol every backend implements, and the factory from a catalogue row."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lifecycle.models import Storage


@dataclass(frozen=True)
class ObjectInfo:
    """What a storage says about one object; `path` is relative to the storage root."""

    path: str
    size: int
    mtime: datetime | None = None
    # A checksum the storage itself keeps (S3 ETag of a single-part upload is MD5), if any.
    checksum: str | None = None
    checksum_algo: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RcloneTarget:
    """How rclone reaches a storage: a remote spec ('name:path' or a local path) and the
    RCLONE_CONFIG_* environment variables that define the remote (credentials stay in env)."""

    spec: str
    env: Mapping[str, str] = field(default_factory=dict)
    # Flags rclone needs when this storage is the destination of a copy.
    upload_flags: tuple[str, ...] = ()
    # For a local directory (a posix storage, a local checkout destination): its real path.
    # Every path rclone is given under it is first checked for symbolic links
    # (lifecycle.storage.links); a path that is or goes through one is refused.
    local_root: str | None = None


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


def backend_for(storage: Storage) -> StorageBackend:
    """The backend for a catalogue Storage row. Raises InvalidValueError for an unknown kind."""
    from lifecycle.errors import InvalidValueError
    from lifecycle.states import StorageKind

    kind = StorageKind(storage.kind)
    if kind is StorageKind.POSIX:
        from lifecycle.storage.posix import PosixStorage

        return PosixStorage(storage.name, storage.root)
    if kind is StorageKind.S3:
        from lifecycle.storage.s3 import S3Storage

        return S3Storage(
            storage.name,
            storage.root,
            endpoint=storage.endpoint,
            region=storage.region,
            credentials_env=storage.credentials_env,
        )
    if kind is StorageKind.RCLONE:
        from lifecycle.storage.rclone import RcloneStorage

        return RcloneStorage(storage.name, storage.root)
    if kind is StorageKind.MEMORY:
        from lifecycle.storage.memory import MemoryStorage

        return MemoryStorage.named(storage.name)
    raise InvalidValueError(f"unknown storage kind {storage.kind!r}")
