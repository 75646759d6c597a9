"""A storage that is a directory of a POSIX file system; nothing may escape its root."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import stat as stat_mod
import tempfile
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from lifecycle.checksum import checksum_file
from lifecycle.errors import (
    ConflictError,
    InvalidNameError,
    RootNotFoundError,
    SourceNotFoundError,
    StorageError,
)
from lifecycle.links import LinkGuard
from lifecycle.names import validate_name
from lifecycle.transfer.target import ObjectInfo, RcloneTarget

TEMP_PREFIX = ".dlm-tmp-"  # constant: recovery finds dead processes' temp files by it
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

    def _refusal(self, name: str) -> str | None:
        """Why a validated root-relative name may not be used (it is, or goes through, a
        symbolic link; said to lead outside the root when it does), or None."""
        why = LinkGuard(self._real_root).why_refused(name)
        if why is None:
            return None
        if not _inside(os.path.realpath(os.path.join(self._real_root, name)), self._real_root):
            return f"leads outside storage '{self.name}' ({self.root}): it {why}"
        return f"on storage '{self.name}' {why} (DLM never follows links below a storage root)"

    def _full(self, path: str) -> Path:
        """The file of a root-relative name, under the root's real path. Raises
        InvalidNameError if the name is invalid, or is or goes through a symbolic link."""
        name = validate_name(path, what="path")
        why = self._refusal(name)
        if why is not None:
            raise InvalidNameError(f"path {path!r} {why}")
        return Path(self._real_root) / name

    def _relative(self, user_path: str) -> str:
        """The root-relative form of an absolute path under the root, or under an alias of the
        root directory itself (a symlinked root). Raises InvalidNameError otherwise."""
        lexical = os.path.normpath(user_path)
        for base in (str(self.root), self._real_root):
            if _inside(lexical, base) and lexical != base:
                return os.path.relpath(lexical, base).replace(os.sep, "/")
        head = lexical
        tail: list[str] = []
        while True:
            head, last = os.path.split(head)
            if not last:
                break
            tail.insert(0, last)
            if os.path.realpath(head) == self._real_root:
                return "/".join(tail)
        real = os.path.realpath(lexical)
        if _inside(real, self._real_root) and real != self._real_root:
            raise InvalidNameError(
                f"path {user_path!r} is a symbolic link, or goes through one, into storage "
                f"'{self.name}' (root {self.root}): give the file's own path"
            )
        raise InvalidNameError(f"path {user_path!r} is outside storage '{self.name}' (root {self.root})")

    def resolve(self, user_path: str) -> str:
        """The root-relative name of a path relative to the root, or of an absolute path inside
        the root (reached through the root or through an alias of the root directory).

        Raises InvalidNameError if it lies outside the root, or if it is or goes through a
        symbolic link below the root (never registered as the file the link points to).
        """
        if "\x00" in user_path:
            raise InvalidNameError(f"path {user_path[:80]!r} contains a NUL character")
        rel = self._relative(user_path) if os.path.isabs(user_path) else user_path
        try:
            name = validate_name(rel, what="path")
        except InvalidNameError as exc:
            raise InvalidNameError(
                f"path {user_path!r} is not inside storage '{self.name}' (root {self.root}): {exc}"
            ) from exc
        why = self._refusal(name)
        if why is not None:
            raise InvalidNameError(f"path {user_path!r} {why}")
        return name

    # ----------------------------------------------------------------- operations

    def check(self) -> None:
        """Raises StorageError if the root is missing, not a directory, or not writable."""
        if not self.root.exists():
            raise RootNotFoundError(f"storage '{self.name}': root {self.root} does not exist")
        if not self.root.is_dir():
            raise StorageError(f"storage '{self.name}': root {self.root} is not a directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StorageError(f"storage '{self.name}': root {self.root} is not writable")

    def stat(self, path: str) -> ObjectInfo:
        """Size, mtime and metadata of a file. Raises SourceNotFoundError, InvalidNameError
        (a symbolic link, or a path through one)."""
        full = self._full(path)
        try:
            st = os.lstat(full)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise SourceNotFoundError(f"{path!r} not found on storage '{self.name}'") from exc
        if stat_mod.S_ISLNK(st.st_mode):  # planted since the check
            raise InvalidNameError(f"path {path!r} on storage '{self.name}' is a symbolic link")
        if not stat_mod.S_ISREG(st.st_mode):
            raise SourceNotFoundError(f"{path!r} on storage '{self.name}' is not a file")
        return ObjectInfo(
            path=validate_name(path, what="path"),
            size=st.st_size,
            mtime=datetime.fromtimestamp(st.st_mtime, tz=UTC),
            metadata=_read_xattrs(full),
        )

    def open(self, path: str) -> BinaryIO:
        """The file opened for reading (never through a link: O_NOFOLLOW). Raises
        SourceNotFoundError, InvalidNameError."""
        full = self._full(path)
        try:
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise SourceNotFoundError(f"{path!r} not found on storage '{self.name}'") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidNameError(f"path {path!r} on storage '{self.name}' is a symbolic link") from exc
            raise StorageError(f"storage '{self.name}': cannot read {path!r}: {exc}") from exc
        if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SourceNotFoundError(f"{path!r} on storage '{self.name}' is not a file")
        return os.fdopen(fd, "rb")

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
        """Remove the file; absent is fine. Raises InvalidNameError (a path through a link),
        StorageError."""
        full = self._full(path)
        try:
            full.unlink()  # unlink never follows a link in the last component
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"storage '{self.name}': cannot delete {path!r}: {exc}") from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every file under the directory `prefix`, recursively, in name order. Symbolic links
        (never followed), other non-regular files and temp files of unfinished writes are left
        out. Raises InvalidNameError for a prefix that is or goes through a link."""
        top = self._full(prefix) if prefix else Path(self._real_root)
        for dirpath, dirnames, filenames in os.walk(top):  # does not descend into links
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.startswith(TEMP_PREFIX):
                    continue
                full = os.path.join(dirpath, fname)
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                if not stat_mod.S_ISREG(st.st_mode):
                    continue
                rel = os.path.relpath(full, self._real_root).replace(os.sep, "/")
                try:
                    name = validate_name(rel, what="path")
                except InvalidNameError:
                    continue
                yield ObjectInfo(
                    path=name,
                    size=st.st_size,
                    mtime=datetime.fromtimestamp(st.st_mtime, tz=UTC),
                    metadata=_read_xattrs(Path(full)),
                )

    def checksum(self, path: str, algo: str) -> str:
        """Hex digest read from the bytes (of a path checked for links). Raises
        SourceNotFoundError, InvalidNameError, InvalidValueError."""
        full = self._full(path)
        try:
            return checksum_file(full, algo)[0]
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise SourceNotFoundError(f"{path!r} not found on storage '{self.name}'") from exc

    def url(self, path: str, expires_s: int = 3600) -> str:
        """A file:// URL (it does not expire). Raises InvalidNameError."""
        return self._full(path).as_uri()

    def rclone_target(self) -> RcloneTarget:
        """The absolute root path: rclone's local backend needs no config. Paths given to rclone
        under it are checked for symbolic links first (`local_root`)."""
        return RcloneTarget(spec=str(self.root), local_root=self._real_root)


def temp_prefix() -> str:
    """The name prefix of this process's temp files: `.dlm-tmp-<host>-<pid>-` (mkstemp adds
    random characters without '-'), so recovery can tell which host and process left one
    behind: strip the prefix, then `rsplit("-", 2)` gives host, pid and the random part."""
    host = socket.gethostname().replace(os.sep, "_") or "host"
    return f"{TEMP_PREFIX}{host}-{os.getpid()}-"


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
