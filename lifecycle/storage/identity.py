"""Storage identity: the `.dlm-storage` marker at each storage root, and the checks built on it.

Every posix and S3 storage root holds a small marker (a file, or an object, named `.dlm-storage`)
that names the storage owning the root: its id and name, as JSON. It is written by
`storage add` (when the check runs) or, for a root that has none (a catalogue older than
markers, `--no-check`), at the first batch that uses the storage. With it:

- `storage add` refuses a root where another live storage's marker is found at the root or at
  any parent directory / prefix (an S3 endpoint alias, a bind mount); posix roots are also
  compared by (device, inode) with the other posix roots and their parents (`foreign_root`);
- every copy and delete batch first checks its storages once (`check_identity`): a posix root
  must still be the directory recorded (not a symbolic link, nor reached through one now), and
  a marker found must name this storage; a failed check fails the batch before any write or
  delete.

Markers are invisible to DLM otherwise: listings, reconcile and verify skip them, and names
whose segment starts with `.dlm-` are reserved (lifecycle.names).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lifecycle.errors import SourceNotFoundError, StorageError
from lifecycle.names import STORAGE_MARKER
from lifecycle.states import StorageKind

if TYPE_CHECKING:
    from lifecycle.catalogue.models import Storage
    from lifecycle.storage.s3 import S3Storage

MARKER = STORAGE_MARKER  # ".dlm-storage"
_KIND = "dlm-storage-marker"
_META_ID, _META_NAME = "dlm-storage-id", "dlm-storage-name"  # S3 user metadata of the marker


@dataclass(frozen=True)
class Marker:
    """What a marker says: the storage that owns the root, and where it was found."""

    storage_id: str
    name: str
    where: str  # the marker's path or s3:// URL


def is_marker(path: str) -> bool:
    """Whether a root-relative path is a storage marker (at the root or below it)."""
    return path == MARKER or path.endswith("/" + MARKER)


def marker_bytes(storage_id: uuid.UUID | str, name: str) -> bytes:
    """The content of the marker of storage `name`."""
    body = {"kind": _KIND, "storage_id": str(storage_id), "name": name}
    return (json.dumps(body, sort_keys=True) + "\n").encode()


def _parse(data: bytes, where: str) -> Marker:
    """Raises StorageError for a marker that is not one DLM wrote."""
    try:
        body: Any = json.loads(data.decode("utf-8"))
        if not isinstance(body, dict) or body.get("kind") != _KIND:
            raise ValueError("not a DLM marker")
        return Marker(str(uuid.UUID(str(body["storage_id"]))), str(body.get("name", "")), where)
    except (ValueError, KeyError, UnicodeDecodeError):
        raise StorageError(
            f"{where} is not a DLM storage marker (unreadable content): refusing to use this root"
        ) from None


# --------------------------------------------------------------------------- posix


def _read_posix(directory: str) -> Marker | None:
    """The marker in a local directory, or None. Raises StorageError (a link, unreadable)."""
    where = os.path.join(directory, MARKER)
    try:
        fd = os.open(where, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StorageError(f"storage marker {where} is a symbolic link: refusing this root") from None
        if exc.errno in (errno.EACCES, errno.EPERM) and directory != os.sep:
            return None  # a parent we may not read: nothing to compare
        raise StorageError(f"cannot read storage marker {where}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return _parse(f.read(4096), where)


def _write_posix(root: str, data: bytes, *, replace: bool) -> None:
    """Create the marker in `root` (never through a link). Raises StorageError."""
    where = os.path.join(root, MARKER)
    try:
        if replace:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where)
        fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o444)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except FileExistsError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot write storage marker {where}: {exc.strerror}") from None


def _parents(path: str) -> list[str]:
    """`path` and each of its parent directories, up to '/'."""
    out = [path]
    while True:
        parent = os.path.dirname(out[-1])
        if parent == out[-1]:
            return out
        out.append(parent)


def _inodes(paths: list[str]) -> dict[tuple[int, int], str]:
    found: dict[tuple[int, int], str] = {}
    for p in paths:
        with contextlib.suppress(OSError):
            st = os.stat(p)
            found.setdefault((st.st_dev, st.st_ino), p)
    return found


def _check_posix(storage: Storage, write: bool) -> None:
    root = storage.root
    real = os.path.realpath(root)
    who = f"storage {storage.name}'s root {root}"
    if real != root:
        if os.path.islink(root):
            raise StorageError(f"{who} is now a symbolic link to {real} (refusing to write or delete)")
        raise StorageError(
            f"{who} now goes through a symbolic link (it leads to {real}; refusing to write or delete)"
        )
    try:
        st = os.lstat(root)
    except OSError:
        raise StorageError(f"{who} does not exist (unmounted? refusing to write or delete)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{who} is not a directory (refusing to write or delete)")
    found = _read_posix(root)
    if found is None and _empty_dir(root):
        # An unmounted volume leaves its mount point: an empty directory without the marker.
        # Trusting it would mark every copy there LOST and write new copies onto the bare
        # mount point; an operator who knows the root really is empty says so explicitly.
        raise StorageError(
            f"{who} is empty and has no {MARKER} marker: is its volume mounted? (refusing to "
            f"write, delete or mark copies lost there; if it is meant to be empty, "
            f"`dlm storage online {storage.name}` marks it)"
        )
    _claim(storage, found, lambda data: _write_posix(root, data, replace=False), write)


def _empty_dir(path: str) -> bool:
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def mark_if_unmarked(storage: Storage) -> bool:
    """Write the storage's marker where its root has none (an operator's explicit `storage
    online`: the root is the right one, even if empty). Returns whether it wrote one.
    Raises StorageError (a root holding another storage's marker, or not writable)."""
    kind = StorageKind(storage.kind)
    if kind not in (StorageKind.POSIX, StorageKind.S3):
        return False
    found = read_marker(storage)
    if found is None:
        write_marker(storage)
        return True
    _claim(storage, found, None, write=False)
    return False


# --------------------------------------------------------------------------- s3


def _s3_key(backend: S3Storage, prefix: str) -> str:
    return f"{prefix}/{MARKER}" if prefix else MARKER


def _read_s3(backend: S3Storage, prefix: str) -> Marker | None:
    """The marker object under `prefix` of the backend's bucket, or None: one HEAD (the
    marker's id and name are also its user metadata), a GET only for a marker without them.
    Raises StorageError and subclasses."""
    key = _s3_key(backend, prefix)
    where = f"s3://{backend.bucket}/{key}"
    client = backend.client()
    try:
        with backend._errors(MARKER):
            meta = client.head_object(Bucket=backend.bucket, Key=key).get("Metadata", {})
            if _META_ID in meta:
                return Marker(meta[_META_ID], meta.get(_META_NAME, ""), where)
            body = client.get_object(Bucket=backend.bucket, Key=key)["Body"]
            try:
                data = body.read(4096)
            finally:
                body.close()
    except SourceNotFoundError:
        return None
    return _parse(data, where)


def _write_s3(backend: S3Storage, data: bytes, *, replace: bool) -> None:
    """Raises FileExistsError (a marker appeared meanwhile), StorageError and subclasses."""
    from lifecycle.errors import ConflictError

    key = _s3_key(backend, backend.prefix)
    client = backend.client()
    with backend._errors(MARKER):
        if replace:
            client.delete_object(Bucket=backend.bucket, Key=key)
        try:
            found = _parse(data, f"s3://{backend.bucket}/{key}")
            meta = {_META_ID: found.storage_id, _META_NAME: found.name}
            client.put_object(Bucket=backend.bucket, Key=key, Body=data, Metadata=meta, IfNoneMatch="*")
        except Exception as exc:
            try:
                backend._conflict(exc, MARKER)
            except ConflictError:
                raise FileExistsError(key) from None
            raise


def _s3_backend(storage: Storage) -> S3Storage:
    from lifecycle.storage.backends import backend_for
    from lifecycle.storage.s3 import S3Storage

    backend = backend_for(storage)
    assert isinstance(backend, S3Storage)
    return backend


def _check_s3(storage: Storage, write: bool) -> None:
    backend = _s3_backend(storage)
    _claim(
        storage,
        _read_s3(backend, backend.prefix),
        lambda data: _write_s3(backend, data, replace=False),
        write,
    )


# --------------------------------------------------------------------------- both


def _claim(storage: Storage, found: Marker | None, writer: Any, write: bool) -> None:
    """Refuse a marker naming another storage; write ours where there is none (with `write`;
    best effort: a root DLM may not write to, such as a read-only source, stays unmarked)."""
    if found is None:
        if not write:
            return
        try:
            writer(marker_bytes(storage.id, storage.name))
            return
        except StorageError:  # a read-only root (a source): marked at a later, writable use
            return
        except FileExistsError:  # written meanwhile: check what it says
            found = read_marker(storage)
            if found is None:
                raise StorageError(f"storage {storage.name}'s marker vanished while written") from None
    if found.storage_id != str(storage.id):
        raise StorageError(
            f"storage {storage.name}'s root holds the marker of another storage "
            f"({found.name!r}, {found.where}): the same bytes are reached twice (an alias, a bind "
            "mount or a moved volume); refusing to write or delete"
        )


def read_marker(storage: Storage) -> Marker | None:
    """The marker at a storage's root, or None (also for kinds without markers). Raises
    StorageError and subclasses (unreadable marker, unreachable storage)."""
    kind = StorageKind(storage.kind)
    if kind is StorageKind.POSIX:
        return _read_posix(storage.root)
    if kind is StorageKind.S3:
        backend = _s3_backend(storage)
        return _read_s3(backend, backend.prefix)
    return None


def check_identity(storage: Storage, *, write: bool = True) -> None:
    """Check, once per batch, that a storage's root is still the one it was given: a posix root
    is the recorded directory (not a symbolic link, nor reached through one), and the root's
    marker, if any, names this storage; a root without a marker gets one (unless `write` is
    False: a read-only check, for listings and dry runs). Kinds without
    markers (rclone, memory) pass.

    Raises StorageError naming what is wrong (then nothing may be written or deleted there);
    CredentialsError / StorageUnavailableError when an S3 storage cannot be reached.
    """
    kind = StorageKind(storage.kind)
    if kind is StorageKind.POSIX:
        _check_posix(storage, write)
    elif kind is StorageKind.S3:
        _check_s3(storage, write)


def write_marker(storage: Storage) -> None:
    """Write (or replace) the marker at a new storage's root, after `storage add` accepted it.
    Raises StorageError and subclasses."""
    data = marker_bytes(storage.id, storage.name)
    kind = StorageKind(storage.kind)
    if kind is StorageKind.POSIX:
        _write_posix(storage.root, data, replace=True)
    elif kind is StorageKind.S3:
        _write_s3(_s3_backend(storage), data, replace=True)


def markers_around(storage: Storage) -> list[Marker]:
    """The markers found at a (new) storage's root and at each parent directory or prefix above
    it. Raises StorageError and subclasses."""
    kind = StorageKind(storage.kind)
    found: list[Marker] = []
    if kind is StorageKind.POSIX:
        for d in _parents(storage.root):
            m = _read_posix(d)
            if m is not None:
                found.append(m)
    elif kind is StorageKind.S3:
        backend = _s3_backend(storage)
        parts = backend.prefix.split("/") if backend.prefix else []
        for n in range(len(parts), -1, -1):
            m = _read_s3(backend, "/".join(parts[:n]))
            if m is not None:
                found.append(m)
    return found


def foreign_root(root: str, others: dict[str, str]) -> tuple[str, str] | None:
    """The other posix root (name -> root) that is the same directory as `root` or one of its
    parents, or lies inside `root`, by (device, inode): a bind mount or another path to the
    same directory. Returns (name, how) or None. Raises nothing."""
    mine = _inodes(_parents(root))
    try:
        st = os.stat(root)
        me: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except OSError:
        me = None
    for name, other in others.items():
        try:
            ost = os.stat(other)
        except OSError:
            continue
        key = (ost.st_dev, ost.st_ino)
        if key == me:
            return name, "is the same directory as"
        if key in mine:
            return name, "lies inside"
        if me is not None and me in _inodes(_parents(other)[1:]):
            return name, "contains"
    return None


def refusal(*storages: Storage) -> str | None:
    """Why a batch on these storages must not run (check_identity of each, in order), or None.
    Raises nothing: an unreachable storage is a refusal too."""
    from lifecycle.errors import DLMError, StorageUnavailableError

    for storage in storages:
        try:
            check_identity(storage)
        except StorageUnavailableError as exc:  # no answer within the stall timeout, or none at all
            stalled = "ReadTimeout" in type(exc.__cause__).__name__
            why = "the storage stalled while its root was checked" if stalled else "cannot check its root"
            return f"storage {storage.name}: {why} ({' '.join(str(exc).split())[:400]})"
        except DLMError as exc:
            return " ".join(str(exc).split())[:500]
    return None


def link_count(storage: Storage, path: str) -> int:
    """How many names (hard links) a file of a posix storage has; 1 for other kinds or a file
    that cannot be examined. Raises nothing."""
    if StorageKind(storage.kind) is not StorageKind.POSIX:
        return 1
    try:
        st = os.lstat(os.path.join(storage.root, path))
    except OSError:
        return 1
    return st.st_nlink if stat.S_ISREG(st.st_mode) else 1


def shared_files(storage: Storage, paths: list[str]) -> dict[str, str]:
    """path -> why, for the files of a posix storage that have more than one name (a hard link:
    one inode is one physical copy, whatever names it has). Other kinds: {}. One lstat per
    path; raises nothing (a path that cannot be examined is left to the checks that follow)."""
    if StorageKind(storage.kind) is not StorageKind.POSIX:
        return {}
    out: dict[str, str] = {}
    for path in paths:
        names = link_count(storage, path)
        if names > 1:
            out[path] = (
                f"the destination is a hard link shared with another file ({names} names, one "
                "physical copy): not a separate copy; left in place"
            )
    return out
