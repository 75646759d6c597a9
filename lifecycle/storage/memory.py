"""An in-memory storage for fast unit tests of planners and flows (never for real data)."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, ClassVar

from lifecycle.checksum import new_hasher
from lifecycle.errors import SourceNotFoundError, StorageError, StorageUnavailableError
from lifecycle.names import validate_name
from lifecycle.transfer.target import ObjectInfo, RcloneTarget


@dataclass
class _Blob:
    data: bytes
    mtime: datetime
    metadata: dict[str, str] = field(default_factory=dict)


class MemoryStorage:
    """Bytes in a dict. One instance per name (`named`), so a flow and its test share it.

    Set `available = False` to make every operation raise StorageUnavailableError.
    """

    _registry: ClassVar[dict[str, MemoryStorage]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, name: str) -> None:
        self.name = name
        self.objects: dict[str, _Blob] = {}
        self.available = True
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStorage({self.name!r}, {len(self.objects)} objects)"

    @classmethod
    def named(cls, name: str) -> MemoryStorage:
        """The one instance for `name`, created on first use."""
        with cls._registry_lock:
            if name not in cls._registry:
                cls._registry[name] = cls(name)
            return cls._registry[name]

    @classmethod
    def reset_all(cls) -> None:
        """Forget every instance and its objects."""
        with cls._registry_lock:
            cls._registry.clear()

    def _reachable(self) -> None:
        if not self.available:
            raise StorageUnavailableError(f"storage '{self.name}' is unavailable")

    def _blob(self, path: str) -> _Blob:
        self._reachable()
        blob = self.objects.get(validate_name(path, what="path"))
        if blob is None:
            raise SourceNotFoundError(f"{path!r} not found on storage '{self.name}'")
        return blob

    def check(self) -> None:
        """Raises StorageUnavailableError when `available` is False."""
        self._reachable()

    def resolve(self, user_path: str) -> str:
        """A relative name, or `memory://<name>/<path>`. Raises InvalidNameError."""
        prefix = f"memory://{self.name}/"
        if user_path.startswith(prefix):
            user_path = user_path[len(prefix) :]
        return validate_name(user_path, what="path")

    def _info(self, path: str, blob: _Blob) -> ObjectInfo:
        return ObjectInfo(
            path=path,
            size=len(blob.data),
            mtime=blob.mtime,
            checksum=hashlib.md5(blob.data).hexdigest(),
            checksum_algo="md5",
            metadata=dict(blob.metadata),
        )

    def stat(self, path: str) -> ObjectInfo:
        """Raises SourceNotFoundError, StorageUnavailableError."""
        return self._info(validate_name(path, what="path"), self._blob(path))

    def open(self, path: str) -> BinaryIO:
        """Raises SourceNotFoundError, StorageUnavailableError."""
        return io.BytesIO(self._blob(path).data)

    def put(
        self, path: str, src: Path | BinaryIO, *, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Raises SourceNotFoundError (src file missing), InvalidNameError,
        StorageUnavailableError."""
        self._reachable()
        name = validate_name(path, what="path")
        if isinstance(src, Path):
            try:
                data = src.read_bytes()
            except FileNotFoundError as exc:
                raise SourceNotFoundError(f"source file {src} not found") from exc
        else:
            data = src.read()
        blob = _Blob(data, datetime.now(UTC), dict(metadata or {}))
        with self._lock:
            self.objects[name] = blob
        return self._info(name, blob)

    def delete(self, path: str) -> None:
        """Absent is fine. Raises InvalidNameError, StorageUnavailableError."""
        self._reachable()
        with self._lock:
            self.objects.pop(validate_name(path, what="path"), None)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects under the directory `prefix`, in name order."""
        self._reachable()
        start = validate_name(prefix, what="path") + "/" if prefix else ""
        with self._lock:
            items = sorted(self.objects.items())
        for name, blob in items:
            if name.startswith(start):
                yield self._info(name, blob)

    def checksum(self, path: str, algo: str) -> str:
        """Raises SourceNotFoundError, InvalidValueError (unknown algorithm)."""
        h = new_hasher(algo)
        h.update(self._blob(path).data)
        return h.hexdigest()

    def url(self, path: str, expires_s: int = 3600) -> str:
        """A memory:// URL (only meaningful inside this process)."""
        self._blob(path)
        return f"memory://{self.name}/{validate_name(path, what='path')}"

    def rclone_target(self) -> RcloneTarget:
        """Always raises StorageError: rclone cannot reach process memory."""
        raise StorageError("memory storage cannot be reached by rclone")
