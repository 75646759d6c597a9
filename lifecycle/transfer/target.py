"""How rclone reaches a root (RcloneTarget) and what a listing says about one object (ObjectInfo)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime


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
