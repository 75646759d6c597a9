"""Confirm copies physically exist before anything relies on them (check before delete)."""

from __future__ import annotations

import os
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lifecycle.apply.settle import Check, ReplicaChange
from lifecycle.catalogue.models import Storage
from lifecycle.errors import DLMError, StorageError
from lifecycle.states import (
    EventKind,
    ReplicaState,
    StorageKind,
)
from lifecycle.storage import identity
from lifecycle.storage.backends import backend_for
from lifecycle.transfer.listing import list_files
from lifecycle.transfer.log import HASHES
from lifecycle.transfer.operations import hashsum

# A pre-delete check that takes longer than this (plus a little per file) confirms nothing:
# a stalled storage must not hold a delete batch's claims for rclone's minutes of retries.
CONFIRM_TIMEOUT_S = 60.0
CONFIRM_TIMEOUT_PER_FILE_S = 0.05


# --------------------------------------------------------------------------- confirming copies


def _root_present(storage: Storage) -> None:
    """Raise StorageError unless the storage's root is there (a posix root that is not a
    directory is an unmounted or moved volume: rclone lists it as empty, not as an error)."""
    if storage.kind == StorageKind.POSIX:
        root = storage.root
        if not os.path.isdir(root) or not os.access(root, os.R_OK | os.X_OK):
            raise StorageError(f"storage '{storage.name}': root {root} is not a readable directory")
    else:
        backend_for(storage).check()


@dataclass
class Confirmation:
    """What the pre-delete check found on one storage: the copies confirmed intact, the
    changes to settle (LOST, CORRUPTED), the copies neither confirmed nor marked (present
    with the right size, but their bytes could not be read: path -> why), and the bytes read
    to hash them."""

    intact: list[Check] = field(default_factory=list)
    changes: list[ReplicaChange] = field(default_factory=list)
    unread: dict[str, str] = field(default_factory=dict)
    bytes_read: int = 0


def confirm_copies(
    storage: Storage, copies: Sequence[Check], *, timeout: float | None = None
) -> Confirmation:
    """Whether READY copies on one storage are physically there and intact. ONE listing
    (rclone lsjson over the paths) gives their sizes, and on S3 the MD5 the storage keeps;
    the copies whose hash the storage does not keep (posix, rclone remotes, an object with no
    stored MD5, an algorithm other than MD5) are then re-hashed from their bytes with ONE
    `rclone hashsum --download` per algorithm (deadline from their bytes). Absent -> LOST;
    another size or hash -> CORRUPTED (events `replica.lost` / `replica.corrupted`,
    `found_by` "pre-delete check"); present with the right size but unreadable -> neither.
    An item without a checksum, or with one rclone cannot compute, is confirmed by size
    (there is nothing to compare the bytes with). The listing fails fast on a dead endpoint
    and gives up after `timeout` seconds (default CONFIRM_TIMEOUT_S plus
    CONFIRM_TIMEOUT_PER_FILE_S per copy).

    Raises DLMError (StorageError, CredentialsError, StorageUnavailableError, RcloneError,
    InvalidValueError) when the storage or its root cannot be listed: then nothing is
    confirmed and nothing may be marked.
    """
    out = Confirmation()
    if not copies:
        return out
    identity.check_identity(storage, write=False)  # another storage's root now confirms nothing
    algo = "md5" if "md5" in native_hashes(storage) else None
    if timeout is None:
        timeout = CONFIRM_TIMEOUT_S + CONFIRM_TIMEOUT_PER_FILE_S * len(copies)
    target = backend_for(storage).rclone_target()
    found = list_files(target, [c.path for c in copies], hash_type=algo, timeout=timeout)
    if len(found) < len({c.path for c in copies}):
        _root_present(storage)  # absent files are only lost if the root is still there
    base = {"storage": storage.name, "found_by": "pre-delete check"}
    to_hash: dict[str, list[Check]] = defaultdict(list)  # algo -> copies to read
    for c in copies:
        entry = found.get(c.path)
        if entry is None:
            out.changes.append(
                ReplicaChange(c, ReplicaState.LOST, EventKind.REPLICA_LOST, {**base, "path": c.path}, -c.size)
            )
            continue
        size = entry.get("Size")
        stored = str((entry.get("Hashes") or {}).get(algo or "") or "") if algo == c.algo else ""
        if isinstance(size, int) and size >= 0 and size != c.size:
            details = {**base, "path": c.path, "expected_size": c.size, "found_size": size}
        elif stored and c.checksum and stored.lower() != c.checksum.lower():
            details = {**base, "path": c.path, "algo": c.algo, "expected": c.checksum, "found": stored}
        elif not stored and c.checksum and c.algo in HASHES:
            to_hash[c.algo].append(c)  # no hash kept by the storage: read the bytes
            continue
        else:
            out.intact.append(c)
            continue
        out.changes.append(ReplicaChange(c, ReplicaState.CORRUPTED, EventKind.REPLICA_CORRUPTED, details))
    for hash_algo, group in to_hash.items():
        try:
            digests = hashsum(
                target, [c.path for c in group], hash_algo, download=True, nbytes=sum(c.size for c in group)
            )
        except DLMError as exc:
            why = " ".join(str(exc).split())[:300]
            out.unread.update({c.path: why for c in group})
            continue
        for c in group:
            got = digests.get(c.path)
            if got is None:
                out.unread[c.path] = "present, but its bytes could not be read"
                continue
            out.bytes_read += c.size
            if got.lower() == c.checksum.lower():
                out.intact.append(c)
            else:
                details = {**base, "path": c.path, "algo": c.algo, "expected": c.checksum, "found": got}
                out.changes.append(
                    ReplicaChange(c, ReplicaState.CORRUPTED, EventKind.REPLICA_CORRUPTED, details)
                )
    return out


def same_files(
    deleting: Storage,
    doomed: Mapping[uuid.UUID, str],
    storages: Mapping[uuid.UUID, Storage],
    survivors: Mapping[uuid.UUID, Sequence[Check]],
) -> dict[uuid.UUID, str]:
    """The survivors that are not other copies: on posix storages, a survivor whose file
    (st_dev, st_ino) is the file of its item's copy to delete (`doomed`: item -> path on
    `deleting`), or of a survivor on a storage earlier by name, is one file seen twice (a
    hard link across roots, or one directory under two roots by a bind mount). Returns
    replica uid -> why it does not count. One lstat per file, in this process; a file that
    cannot be lstat'ed is left to the listing."""

    def identity(st: Storage, path: str) -> tuple[int, int] | None:
        if st.kind != StorageKind.POSIX:
            return None
        try:
            info = os.lstat(os.path.join(st.root, path))
        except (OSError, ValueError):
            return None
        return (info.st_dev, info.st_ino)

    seen: dict[uuid.UUID, dict[tuple[int, int], str]] = defaultdict(dict)  # item -> file -> where
    for oid, path in doomed.items():
        ident = identity(deleting, path)
        if ident is not None:
            seen[oid][ident] = ""
    twins: dict[uuid.UUID, str] = {}
    for sid in sorted(survivors, key=lambda i: storages[i].name):
        st = storages[sid]
        if st.kind != StorageKind.POSIX:
            continue
        for c in survivors[sid]:
            ident = identity(st, c.path)
            if ident is None:
                continue
            other = seen[c.item_oid].get(ident)
            if other is None:
                seen[c.item_oid][ident] = st.name
                continue
            twin = "the one to delete" if other == "" else f"its copy on {other}"
            why = f"its copy on {st.name} is the same file (hard link or bind mount) as {twin}"
            twins[c.replica_uid] = why
    return twins


def native_hashes(storage: Storage) -> frozenset[str]:
    """The hashes a storage keeps itself (rather than computing them by reading the bytes)."""
    if storage.kind == StorageKind.S3:
        return frozenset({"md5"})  # single-part ETags, or rclone's md5chksum metadata
    return frozenset()
