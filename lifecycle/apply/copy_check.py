"""How a copy batch knows that the bytes which landed are the item's: the digests rclone
checked at both ends as it copied, compared with the catalogue's, or else the destination
hashed (from its bytes where rclone's digest is not one of them)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from lifecycle.catalogue.models import Storage
from lifecycle.errors import DLMError
from lifecycle.storage.backends import copy_needs_read_back
from lifecycle.transfer.log import HASHES
from lifecycle.transfer.operations import hashsum
from lifecycle.transfer.target import RcloneTarget


@dataclass(frozen=True)
class CopyClaim:
    """One copy a batch claimed: its replica row, transfer, destination path and the item's
    size and checksum."""

    replica_uid: uuid.UUID
    transfer_id: uuid.UUID
    item_oid: uuid.UUID
    path: str
    size: int
    checksum: str | None
    algo: str | None


def read_back_paths(src: Storage, dst: Storage, claims: Sequence[CopyClaim]) -> set[str]:
    """The paths whose copy must be verified by reading it back (copy_needs_read_back): rclone's
    digest of them may be the source's stored hash, not one of the bytes it read, so a
    download that went wrong would pass."""
    return {c.path for c in claims if copy_needs_read_back(src.kind, dst.kind, c.size)}


def verify_destination(
    target: RcloneTarget,
    claims: Sequence[CopyClaim],
    paths_ok: set[str],
    checked: Mapping[str, tuple[str, str]] | None = None,
    *,
    read_back: AbstractSet[str] = frozenset(),
    hash_bytes: Callable[[str, str], str] | None = None,
) -> dict[str, str]:
    """Compare destination checksums with the catalogue's; returns path -> error for mismatches.

    `checked` holds the digests rclone itself found equal at both ends right after copying
    (path -> (hash, hex)): where that hash is the catalogue's, comparing it with the catalogue
    settles the copy without reading the destination again. The others are hashed at the
    destination (one `rclone hashsum` per algorithm), those in `read_back` from their bytes:
    with `hash_bytes(path, algo)` (the destination backend's checksum) where rclone lacks the
    algorithm, else they fail."""
    errors: dict[str, str] = {}
    checked = checked or {}
    by_algo: dict[tuple[str, bool], list[CopyClaim]] = defaultdict(list)
    for c in claims:
        if c.path not in paths_ok or not c.checksum or not c.algo:
            continue
        seen = checked.get(c.path)
        if seen is not None and seen[0] == c.algo:
            if seen[1].lower() != c.checksum.lower():
                errors[c.path] = (
                    f"checksum mismatch: the copy's {c.algo} {seen[1]} != catalogue {c.checksum} "
                    "(the source no longer holds the item's bytes)"
                )
            continue
        by_algo[(c.algo, c.path in read_back)].append(c)
    for (algo, download), group in by_algo.items():
        if algo not in HASHES and download:
            errors.update(_hash_in_python(group, algo, hash_bytes))
            continue
        if algo not in HASHES:
            continue  # e.g. blake2b: rclone cannot hash it; the size check and verify cover it
        try:
            found = hashsum(
                target,
                [c.path for c in group],
                algo,
                download=True if download else None,
                nbytes=sum(c.size for c in group),
            )
        except DLMError as exc:
            for c in group:
                errors[c.path] = f"cannot read back the copy: {exc}"
            continue
        for c in group:
            got = found.get(c.path)
            if got is None:
                errors[c.path] = "copy not found at the destination after transfer"
            elif got.lower() != (c.checksum or "").lower():
                errors[c.path] = f"checksum mismatch at destination ({algo} {got} != catalogue {c.checksum})"
    return errors


def _hash_in_python(
    group: Sequence[CopyClaim], algo: str, hash_bytes: Callable[[str, str], str] | None
) -> dict[str, str]:
    """path -> error for the copies of `group` whose bytes, hashed by `hash_bytes`, are not the
    catalogue's (all of them without `hash_bytes`)."""
    errors: dict[str, str] = {}
    for c in group:
        if hash_bytes is None:
            errors[c.path] = f"cannot read back the copy: rclone cannot compute {algo}"
            continue
        try:
            got = hash_bytes(c.path, algo)
        except DLMError as exc:
            errors[c.path] = f"cannot read back the copy: {exc}"
            continue
        if got.lower() != (c.checksum or "").lower():
            errors[c.path] = f"checksum mismatch at destination ({algo} {got} != catalogue {c.checksum})"
    return errors
