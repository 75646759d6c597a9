"""Confirm copies physically exist before anything relies on them (check before delete)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from lifecycle.apply.settle import Check, ReplicaChange
from lifecycle.catalogue.models import Storage
from lifecycle.errors import StorageError
from lifecycle.states import (
    ReplicaState,
    StorageKind,
)
from lifecycle.storage.backends import backend_for
from lifecycle.transfer.listing import list_files

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


def confirm_copies(
    storage: Storage, copies: Sequence[Check], *, timeout: float | None = None
) -> tuple[list[Check], list[ReplicaChange]]:
    """Whether READY copies on one storage are physically there, with ONE listing (rclone
    lsjson over the paths): size, and the hash the storage keeps itself where it has one
    (MD5 on S3) and the copy's algorithm is that one. Returns the copies confirmed intact,
    and for the others the change to settle: absent -> LOST, another size or stored hash ->
    CORRUPTED (events `replica.lost` / `replica.corrupted`, `found_by` "pre-delete check").
    The listing fails fast on a dead endpoint and gives up after `timeout` seconds (default
    CONFIRM_TIMEOUT_S plus CONFIRM_TIMEOUT_PER_FILE_S per copy).

    Raises DLMError (StorageError, CredentialsError, StorageUnavailableError, RcloneError,
    InvalidValueError) when the storage or its root cannot be listed: then nothing is
    confirmed and nothing may be marked.
    """
    if not copies:
        return [], []
    algo = "md5" if "md5" in native_hashes(storage) else None
    if timeout is None:
        timeout = CONFIRM_TIMEOUT_S + CONFIRM_TIMEOUT_PER_FILE_S * len(copies)
    found = list_files(
        backend_for(storage).rclone_target(),
        [c.path for c in copies],
        hash_type=algo,
        timeout=timeout,
    )
    if len(found) < len({c.path for c in copies}):
        _root_present(storage)  # absent files are only lost if the root is still there
    confirmed: list[Check] = []
    changes: list[ReplicaChange] = []
    base = {"storage": storage.name, "found_by": "pre-delete check"}
    for c in copies:
        entry = found.get(c.path)
        if entry is None:
            changes.append(
                ReplicaChange(c, ReplicaState.LOST, "replica.lost", {**base, "path": c.path}, -c.size)
            )
            continue
        size = entry.get("Size")
        stored = str((entry.get("Hashes") or {}).get(algo or "") or "") if algo == c.algo else ""
        if isinstance(size, int) and size >= 0 and size != c.size:
            details = {**base, "path": c.path, "expected_size": c.size, "found_size": size}
        elif stored and c.checksum and stored.lower() != c.checksum.lower():
            details = {**base, "path": c.path, "algo": c.algo, "expected": c.checksum, "found": stored}
        else:
            confirmed.append(c)
            continue
        changes.append(ReplicaChange(c, ReplicaState.CORRUPTED, "replica.corrupted", details))
    return confirmed, changes


def native_hashes(storage: Storage) -> frozenset[str]:
    """The hashes a storage keeps itself (rather than computing them by reading the bytes)."""
    if storage.kind == StorageKind.S3:
        return frozenset({"md5"})  # single-part ETags, or rclone's md5chksum metadata
    return frozenset()
