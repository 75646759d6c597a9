"""The backend for a catalogue Storage row: posix, S3, rclone remote or memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lifecycle.catalogue.models import Storage
from lifecycle.storage.base import StorageBackend
from lifecycle.transfer.target import RcloneTarget


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


def upload_target(storage: Storage, largest: int) -> RcloneTarget:
    """How rclone reaches `storage` as the destination of a copy of files of at most `largest`
    bytes: its rclone_target(), and on an S3 service that checks upload digests, for files
    uploaded in one PUT, without a HEAD after each upload (S3Storage.upload_target)."""
    from lifecycle.storage.s3 import S3Storage

    backend = backend_for(storage)
    if isinstance(backend, S3Storage):
        return backend.upload_target(largest)
    return backend.rclone_target()


def copy_needs_read_back(src_kind: str | None, dst_kind: str, size: int) -> bool:
    """Whether rclone's own digest of a copy of `size` bytes into a storage of `dst_kind` may
    be the source's *stored* hash rather than one of the bytes it read, so that the copy must
    be hashed from its bytes at the destination. rclone takes the digest of a file it uploads
    to S3 in parts (s3.RCLONE_UPLOAD_CUTOFF or more) from the source's stored MD5 when the
    source is not a local directory; an rclone-kind destination may do the same at any size
    (its backend and part size are the user's). `src_kind` None: not known (recovery), taken
    as not local."""
    from lifecycle.states import StorageKind
    from lifecycle.storage import s3

    if dst_kind == StorageKind.POSIX.value or src_kind == StorageKind.POSIX.value:
        return False
    return dst_kind == StorageKind.RCLONE.value or size >= s3.RCLONE_UPLOAD_CUTOFF
