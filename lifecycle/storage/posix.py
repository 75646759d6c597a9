"""A storage that is a directory of a POSIX file system; nothing may escape its root."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from lifecycle.checksum import checksum_file
from lifecycle.errors import ConflictError, InvalidNameError, SourceNotFoundError, StorageError
from lifecycle.names import validate_name
from lifecycle.storage.base import ObjectInfo, RcloneTarget

_TMP_PREFIX = ".dlm-tmp-"  # constant: recovery finds dead processes' temp files by it
# User metadata is kept, where the file system allows, as extended attributes user.dlm.<key>.
_XATTR_PREFIX = "user.dlm."


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class PosixStorage:
    """A directory tree: objects are files under `root`, written atomically."""

    def __init__(self, name: str, root: str | os.PathLike[str]) -> None:
        self.name = name
        self.root = Path(os.path.abspath(root))
        self._real_root = os.path.realpath(self.root)

    def __repr__(self) -> str:
        return f"PosixStorage({self.name!r}, {str(self.root)!r})"

    # ----------------------------------------------------------------- paths

    def _full(self, path: str) -> Path:
        """The file of a root-relative name. Raises InvalidNameError if the name is invalid
        or if, through a symlink, it would land outside the root."""
        name = validate_name(path, what="path")
        full = self.root / name
        if not _inside(os.path.realpath(full), self._real_root):
            raise InvalidNameError(f"path {path!r} leads outside storage '{self.name}' ({self.root})")
        return full

    def resolve(self, user_path: str) -> str:
        """The root-relative name of an absolute path inside the root (symlinks resolved) or
        of a path relative to the root. Raises InvalidNameError if it lies outside."""
        if "\x00" in user_path:
            raise InvalidNameError(f"path {user_path[:80]!r} contains a NUL character")
        if os.path.isabs(user_path):
            real = os.path.realpath(user_path)
            if not _inside(real, self._real_root) or real == self._real_root:
                raise InvalidNameError(
                    f"path {user_path!r} is outside storage '{self.name}' (root {self.root})"
                )
            lexical = os.path.normpath(user_path)
            if _inside(lexical, str(self.root)) and lexical != str(self.root):
                rel = os.path.relpath(lexical, self.root)
            else:
                rel = os.path.relpath(real, self._real_root)
            rel = rel.replace(os.sep, "/")
        else:
            rel = user_path
        try:
            self._full(rel)
        except InvalidNameError as exc:
            raise InvalidNameError(
                f"path {user_path!r} is not inside storage '{self.name}' (root {self.root}): {exc}"
            ) from exc
        return validate_name(rel, what="path")

    # ----------------------------------------------------------------- operations

    def check(self) -> None:
        """Raises StorageError if the root is missing, not a directory, or not writable."""
        if not self.root.exists():
            raise StorageError(f"storage '{self.name}': root {self.root} does not exist")
        if not self.root.is_dir():
            raise StorageError(f"storage '{self.name}': root {self.root} is not a directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"storage '{self.name}': root {self.root} is not writable")

    def stat(self, path: str) -> ObjectInfo:
        """Size, mtime and metadata of a file. Raises SourceNotFoundError, InvalidNameError."""
        full = self._full(path)
        try:
            st = full.stat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise SourceNotFoundError(f"{path!r} not found on storage '{self.name}'") from exc
        if not full.is_file():
            raise SourceNotFoundError(f"{path!r} on storage '{self.name}' is not a file")
        return ObjectInfo(
            path=validate_name(path, what="path"),
            size=st.st_size,
            mtime=datetime.fromtimestamp(st.st_mtime, tz=UTC),
            metadata=_read_xattrs(full),
        )

    def open(self, path: str) -> BinaryIO:
        """The file opened for reading. Raises SourceNotFoundError, InvalidNameError."""
        full = self._full(path)
        try:
            if full.is_dir():
                raise IsADirectoryError(path)
            return open(full, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise SourceNotFoundError(f"{path!r} not found on storage '{self.name}'") from exc

    def put(
        self, path: str, src: Path | BinaryIO, *, metadata: Mapping[str, str] | None = None
    ) -> ObjectInfo:
        """Write a new file, never over an existing one: the bytes go to a temp file in the
        same directory (`.dlm-tmp-<host>-<pid>-<random>`), are fsynced, then linked to the
        final name, which fails if that name exists (a no-clobber rename). Creates parents.
        Raises ConflictError (the path already exists), SourceNotFoundError (src file
        missing), InvalidNameError, StorageError."""
        full = self._full(path)
        try:
            full.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), dir=full.parent)
        except OSError as exc:
            raise StorageError(f"storage '{self.name}': cannot write {path!r}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as out:
                if isinstance(src, Path):
                    try:
                        with open(src, "rb") as f:
                            shutil.copyfileobj(f, out, 1024 * 1024)
                    except FileNotFoundError as exc:
                        raise SourceNotFoundError(f"source file {src} not found") from exc
                else:
                    shutil.copyfileobj(src, out, 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            _write_xattrs(Path(tmp), metadata or {})
            try:
                _link_no_clobber(tmp, full)
            except FileExistsError:
                raise ConflictError(
                    f"{path!r} already exists on storage '{self.name}': DLM never writes over a file"
                ) from None
            _fsync_dir(full.parent)
        except OSError as exc:
            raise StorageError(f"storage '{self.name}': cannot write {path!r}: {exc}") from exc
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return self.stat(path)

    def delete(self, path: str) -> None:
        """Remove the file; absent is fine. Raises InvalidNameError, StorageError."""
        full = self._full(path)
        try:
            full.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"storage '{self.name}': cannot delete {path!r}: {exc}") from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every file under the directory `prefix`, recursively, in name order (temp files of
        unfinished writes and symlinks leading outside the root are left out)."""
        top = self._full(prefix) if prefix else self.root
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.startswith(_TMP_PREFIX):
                    continue
                full = os.path.join(dirpath, fname)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                try:
                    yield self.stat(rel)
                except (SourceNotFoundError, InvalidNameError):
                    continue

    def checksum(self, path: str, algo: str) -> str:
        """Hex digest read from the bytes. Raises SourceNotFoundError, InvalidValueError."""
        full = self._full(path)
        try:
            return checksum_file(full, algo)[0]
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise SourceNotFoundError(f"{path!r} not found on storage '{self.name}'") from exc

    def url(self, path: str, expires_s: int = 3600) -> str:
        """A file:// URL (it does not expire). Raises InvalidNameError."""
        return self._full(path).as_uri()

    def rclone_target(self) -> RcloneTarget:
        """The absolute root path: rclone's local backend needs no config."""
        return RcloneTarget(spec=str(self.root))


def temp_prefix() -> str:
    """The name prefix of this process's temp files: `.dlm-tmp-<host>-<pid>-` (mkstemp adds
    random characters without '-'), so recovery can tell which host and process left one
    behind: strip the prefix, then `rsplit("-", 2)` gives host, pid and the random part."""
    host = socket.gethostname().replace(os.sep, "_") or "host"
    return f"{_TMP_PREFIX}{host}-{os.getpid()}-"


def _link_no_clobber(tmp: str, final: Path) -> None:
    """Give the temp file its final name, failing with FileExistsError if that name exists.

    A hard link fails on an existing name instead of replacing it. Where the file system has
    no hard links, the final name is first created exclusively (O_EXCL: it is then ours) and
    the temp file renamed over that placeholder; a crash in between leaves an empty file,
    which verify and reconcile report as not the item's bytes.
    """
    try:
        os.link(tmp, final)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK):
            raise
    os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    os.replace(tmp, final)


def _fsync_dir(directory: Path) -> None:
    """Make a new directory entry durable (best effort: some file systems refuse it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_xattrs(path: Path, metadata: Mapping[str, str]) -> None:
    if not metadata or not hasattr(os, "setxattr"):
        return
    for key, value in metadata.items():
        try:
            os.setxattr(path, _XATTR_PREFIX + key, str(value).encode())
        except OSError:
            return  # the file system keeps no user xattrs: metadata lives in the catalogue


def _read_xattrs(path: Path) -> dict[str, str]:
    if not hasattr(os, "listxattr"):
        return {}
    try:
        names = os.listxattr(path)
    except OSError:
        return {}
    out: dict[str, str] = {}
    for attr in names:
        if attr.startswith(_XATTR_PREFIX):
            with contextlib.suppress(OSError):
                out[attr[len(_XATTR_PREFIX) :]] = os.getxattr(path, attr).decode("utf-8", "replace")
    return out
