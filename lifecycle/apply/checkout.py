"""Checkout: copy the best intact copy of items to a local directory or any rclone remote, verified.

Items are grouped by the storage of their best copy and each group moves in ONE rclone
process. Files land under their item names; copies whose path differs from the name (later
versions, in-place registrations under another name) are staged and renamed locally, or
copied one by one (`copyto`) to a remote destination. Every file is checked against the
catalogue's checksum at the destination; a mismatch is removed and reported.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlmodel import Session, col

from lifecycle.catalogue import audit
from lifecycle.catalogue.models import Item, Replica, Storage
from lifecycle.catalogue.storages import path_segments, paths_nested, rclone_remotes, storage_space
from lifecycle.errors import InvalidValueError, PolicyViolationError
from lifecycle.states import EventKind, ItemState, ReplicaState, StorageKind, StorageState, Tier
from lifecycle.storage.backends import backend_for
from lifecycle.transfer.log import HASHES
from lifecycle.transfer.operations import CopyReport, copy_files, delete_files, hashsum, refused_paths
from lifecycle.transfer.process import batch_deadline, run
from lifecycle.transfer.target import RcloneTarget

_TIER_RANK = {Tier.HOT: 0, Tier.WARM: 1, Tier.COLD: 2, Tier.ARCHIVE: 3}


_EXISTS = "a different file already exists at the destination (left as it is)"


@dataclass(frozen=True)
class Source:
    item_oid: uuid.UUID
    name: str
    version: int
    size: int
    checksum: str | None
    algo: str | None
    storage: Storage
    path: str


@dataclass
class CheckoutReport:
    destination: str
    files: int = 0
    bytes: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    duration_s: float = 0.0
    rclone_processes: int = 0


def best_sources(session: Session, items: Sequence[Item]) -> list[Source]:
    """For each item, its best intact copy: READY on an online storage (then draining), the
    fastest tier first, posix before object stores. Raises PolicyViolationError when an item
    has no intact copy or is not READY."""
    oids = [i.oid for i in items]
    rows = session.execute(
        select(Replica, Storage)
        .join(Storage, col(Storage.id) == col(Replica.storage_id))
        .where(
            col(Replica.item_oid).in_(oids),
            col(Replica.state) == ReplicaState.READY.value,
            col(Storage.state).in_([StorageState.ONLINE.value, StorageState.DRAINING.value]),
        )
    ).all()
    by_item: dict[uuid.UUID, list[tuple[Replica, Storage]]] = defaultdict(list)
    for rep, st in rows:
        by_item[rep.item_oid].append((rep, st))
    out = []
    for item in items:
        if item.state != ItemState.READY:
            raise PolicyViolationError(
                f"{item.name} v{item.version} is {item.state}: only READY items can be checked out"
            )
        cands = by_item.get(item.oid)
        if not cands:
            raise PolicyViolationError(f"{item.name} v{item.version} has no intact copy on an online storage")
        rep, st = min(
            cands,
            key=lambda rs: (
                rs[1].state != StorageState.ONLINE,
                _TIER_RANK.get(Tier(rs[1].tier), 9),
                rs[1].kind != StorageKind.POSIX,
                rs[1].name,
            ),
        )
        out.append(
            Source(
                item.oid, item.name, item.version, item.size, item.checksum, item.checksum_algo, st, rep.path
            )
        )
    return out


def _is_remote(dest: str) -> bool:
    head, sep, _ = dest.partition(":")
    return bool(sep and head and "/" not in head and not Path(dest).exists())


def refuse_storage_roots(session: Session, dest: str) -> None:
    """Refuse a local destination inside, equal to or containing the root of a posix storage
    (or of an rclone storage on a local remote): a checkout there would write over, or beside,
    stored copies. Raises InvalidValueError naming the storage."""
    if not dest or _is_remote(dest):
        return

    mine = path_segments(os.path.realpath(Path(dest).expanduser()))
    cache: dict[str, dict[str, Any]] = {}

    def remotes() -> dict[str, Any]:
        if "v" not in cache:
            cache["v"] = rclone_remotes()
        return cache["v"]

    rows = session.execute(
        select(col(Storage.name), col(Storage.kind), col(Storage.root), col(Storage.endpoint)).where(
            col(Storage.kind).in_([StorageKind.POSIX.value, StorageKind.RCLONE.value]),
            col(Storage.state) != StorageState.RETIRED.value,
        )
    ).all()
    for name, kind, root, endpoint in rows:
        space, segs = storage_space(StorageKind(kind), root, endpoint, remotes)
        if space == "posix" and paths_nested(segs, mine):
            how = "is inside" if len(mine) >= len(segs) else "contains"
            raise InvalidValueError(
                f"destination {dest} {how} the root of storage {name!r} ({root}): "
                "check out to a directory outside every storage"
            )


def destination_target(dest: str) -> tuple[RcloneTarget, Path | None]:
    """An rclone target for DEST: `remote:path` of the user's rclone config, or a local
    directory (created). Raises InvalidValueError for an unusable destination."""
    if not dest or any(ord(c) < 32 for c in dest):
        raise InvalidValueError(f"invalid destination {dest!r}")
    if _is_remote(dest):
        return RcloneTarget(dest), None
    local = Path(dest).expanduser().resolve()
    if local.exists() and not local.is_dir():
        raise InvalidValueError(f"destination {dest} exists and is not a directory")
    local.mkdir(parents=True, exist_ok=True)
    return RcloneTarget(str(local), local_root=str(local)), local  # no file lands through a link


def _copy_group(
    src: RcloneTarget, dst: RcloneTarget, group: Sequence[Source], *, transfers: int, report: CheckoutReport
) -> CopyReport:
    """Copy the group's files from their storage to `dst` at their paths, in ONE rclone process
    (counted in the report); never over a file already there."""
    report.rclone_processes += 1
    return copy_files(
        src, dst, [s.path for s in group], transfers=transfers, nbytes=sum(s.size for s in group)
    )


def checkout(
    session: Session, items: Sequence[Item], dest: str, *, actor: str = "user", transfers: int = 8
) -> CheckoutReport:
    """Copy each item's best intact copy to DEST under its name, verified against the catalogue.

    Raises PolicyViolationError (an item without an intact copy), InvalidValueError (bad
    destination, or one inside or containing a storage's root). Per-file failures are reported, not raised.
    """
    sources = best_sources(session, items)
    refuse_storage_roots(session, dest)
    target, local = destination_target(dest)
    report = CheckoutReport(dest)
    started = time.monotonic()
    by_storage: dict[uuid.UUID, list[Source]] = defaultdict(list)
    for s in sources:
        by_storage[s.storage.id].append(s)
    landed: list[Source] = []
    for group in by_storage.values():
        storage = group[0].storage
        src_target = backend_for(storage).rclone_target()
        same = [s for s in group if s.path == s.name]
        renamed = [s for s in group if s.path != s.name]
        if same:
            # The checkout directory is the user's: a file of the same name with the same bytes
            # counts as checked out; one with other bytes is left as it is and reported.
            res = _copy_group(src_target, target, same, transfers=transfers, report=report)
            report.failed.update(res.failed)
            landed += [s for s in same if s.path in res.ok]
        if renamed and local is not None:
            staging = Path(tempfile.mkdtemp(prefix=".dlm-checkout-", dir=local))
            try:
                stage = RcloneTarget(str(staging), local_root=str(staging))
                res = _copy_group(src_target, stage, renamed, transfers=transfers, report=report)
                links = refused_paths(target, [s.name for s in renamed])
                for s in renamed:
                    if s.name in links:
                        report.failed[s.name] = f"destination {links[s.name]}"
                    elif s.path in res.ok:
                        final = local / s.name
                        final.parent.mkdir(parents=True, exist_ok=True)
                        try:  # no-clobber: a user's file of that name is never replaced
                            os.link(staging / s.path, final)
                            landed.append(s)
                        except FileExistsError:
                            if filecmp.cmp(staging / s.path, final, shallow=False):
                                landed.append(s)
                            else:
                                report.failed[s.name] = _EXISTS
                    else:
                        report.failed[s.name] = res.failed.get(s.path, "not copied")
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        elif renamed:
            for s in renamed:  # a remote destination cannot rename after the fact
                proc = run(
                    [
                        "copyto",
                        f"{src_target.spec.rstrip('/')}/{s.path}",
                        f"{target.spec.rstrip('/')}/{s.name}",
                        "--immutable",
                    ],
                    env={**src_target.env, **target.env},
                    timeout=batch_deadline(files=1, nbytes=s.size),
                )
                report.rclone_processes += 1
                if proc.returncode == 0:
                    landed.append(s)
                else:
                    lines = proc.stderr.decode(errors="replace").strip().splitlines() or ["copyto failed"]
                    report.failed[s.name] = lines[-1][:300]
    # verify at the destination, one hashsum per algorithm
    by_algo: dict[str, list[Source]] = defaultdict(list)
    for s in landed:
        if s.algo in HASHES and s.checksum:
            by_algo[s.algo].append(s)
    bad: set[str] = set()
    for algo, group in by_algo.items():
        found = hashsum(
            target, [s.name for s in group], algo, download=True, nbytes=sum(s.size for s in group)
        )
        for s in group:
            if (found.get(s.name) or "").lower() != (s.checksum or "").lower():
                report.failed[s.name] = f"checksum mismatch at destination ({algo})"
                bad.add(s.name)
    if bad:
        delete_files(target, sorted(bad))
    good = [s for s in landed if s.name not in bad]
    report.files = len(good)
    report.bytes = sum(s.size for s in good)
    report.duration_s = time.monotonic() - started
    audit.record_many(
        session,
        [
            {
                "kind": EventKind.ITEM_CHECKED_OUT,
                "item_oid": s.item_oid,
                "storage_id": s.storage.id,
                "actor": actor,
                "details": {"destination": dest, "from": s.storage.name},
            }
            for s in good
        ],
    )
    return report
