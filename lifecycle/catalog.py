"""Catalogue operations: storages, ingest, items, datasets and status (the core the CLI calls).

Every function takes a keyword-only `session`; the caller owns the transaction, so a failure
anywhere leaves the catalogue unchanged. Every state change writes an Event (lifecycle.audit).
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from lifecycle import audit
from lifecycle.checksum import checksum_file
from lifecycle.errors import (
    ConflictError,
    DatasetNotFoundError,
    InvalidValueError,
    ItemNotFoundError,
    PolicyViolationError,
    SourceNotFoundError,
    StorageNotFoundError,
)
from lifecycle.models import (
    Dataset,
    Event,
    Item,
    Location,
    Replica,
    Storage,
    StorageCreate,
    StoragePublic,
    Transfer,
    utcnow,
)
from lifecycle.names import validate_name
from lifecycle.settings import get_settings
from lifecycle.states import (
    LIVE_REPLICA_STATES,
    ItemState,
    Phase,
    ReplicaState,
    StorageKind,
    StorageState,
)
from lifecycle.storage import backend_for, identity

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

# --------------------------------------------------------------------------- storages


def _normalise_root(data: StorageCreate) -> str:
    kind = StorageKind(data.kind)
    root = data.root.strip()
    if not root or any(ord(c) < 32 for c in root):
        raise InvalidValueError(f"invalid root {data.root!r} for storage {data.name!r}")
    if kind is StorageKind.POSIX:
        return str(Path(root).expanduser().resolve())
    if kind is StorageKind.S3:
        root = root.removeprefix("s3://").strip("/")
        bucket, _, prefix = root.partition("/")
        if not _BUCKET.match(bucket):
            raise InvalidValueError(f"invalid S3 bucket name {bucket!r} in root {data.root!r}")
        if prefix:
            validate_name(prefix, what="S3 prefix")
        return f"{bucket}/{prefix}" if prefix else bucket
    if kind is StorageKind.RCLONE:
        remote, sep, _path = root.partition(":")
        if not sep or not remote:
            raise InvalidValueError(f"invalid rclone root {data.root!r}: use REMOTE:PATH")
        return root
    return root


def path_segments(path: str) -> tuple[str, ...]:
    """The non-empty segments of a '/'-separated path."""
    return tuple(p for p in path.split("/") if p)


def paths_nested(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether one segment path equals or contains the other (`a/b` and `a/bc` do not)."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _normalise_endpoint(endpoint: str | None) -> str:
    """An S3 endpoint as compared: host and port, lower-case (None is AWS; the scheme's
    default port is dropped, so `http://h` and `http://h:80` are one endpoint)."""
    if not endpoint:
        return "aws"
    from urllib.parse import urlsplit

    parts = urlsplit(endpoint.strip() if "://" in endpoint else "https://" + endpoint.strip())
    scheme = parts.scheme.lower()
    port = parts.port
    if port is None or (scheme, port) in (("http", 80), ("https", 443)):
        return f"{(parts.hostname or '').lower()}"
    return f"{(parts.hostname or '').lower()}:{port}"


def _endpoint_hosts(endpoint: str | None) -> tuple[frozenset[str], str]:
    """The addresses an S3 endpoint's host resolves to (a loopback address is 'loopback', an
    IPv4-mapped IPv6 address its IPv4 one) and its scheme-qualified port, so that aliases of
    one server (`localhost`, `127.0.0.1`, `127.1`, `[::ffff:127.0.0.1]`) compare equal. A host
    that does not resolve is compared by name only."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    if not endpoint:
        return frozenset(), "aws"
    parts = urlsplit(endpoint.strip() if "://" in endpoint else "https://" + endpoint.strip())
    scheme = parts.scheme.lower()
    try:
        port = parts.port or {"http": 80, "https": 443}.get(scheme, 0)
        infos = socket.getaddrinfo(parts.hostname or "", port, proto=socket.IPPROTO_TCP)
    except (OSError, ValueError, UnicodeError):
        return frozenset(), f"{scheme}:{parts.port}"
    found: set[str] = set()
    for info in infos:
        try:
            addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        except ValueError:
            continue
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        found.add("loopback" if addr.is_loopback else str(addr))
    return frozenset(found), str(port)


def _same_endpoint(a: str | None, b: str | None) -> bool:
    """Whether two S3 endpoints reach the same server: the same host and port as written, or
    hosts resolving to a shared address on the same port."""
    if _normalise_endpoint(a) == _normalise_endpoint(b):
        return True
    if not a or not b:
        return False
    (addrs_a, port_a), (addrs_b, port_b) = _endpoint_hosts(a), _endpoint_hosts(b)
    return port_a == port_b and bool(addrs_a & addrs_b)


def rclone_remotes() -> dict[str, Any]:
    """The user's rclone config (`rclone config dump`), or {} if it cannot be read."""
    import json

    from lifecycle import rclone

    try:
        proc = rclone.run(["config", "dump"], timeout=30)
        data = json.loads(proc.stdout or b"{}") if proc.returncode == 0 else {}
    except Exception:  # no rclone, a broken config: the local-remote comparison is skipped
        return {}
    return data if isinstance(data, dict) else {}


def _remote_conf(remotes: Callable[[], dict[str, Any]], remote: str) -> dict[str, Any] | None:
    """A remote's settings from the rclone config, or from RCLONE_CONFIG_<REMOTE>_* variables."""
    conf = remotes().get(remote)
    if isinstance(conf, dict):
        return conf
    var = f"RCLONE_CONFIG_{remote.upper().replace('-', '_')}_"
    if var + "TYPE" in os.environ:
        return {"type": os.environ[var + "TYPE"], "remote": os.environ.get(var + "REMOTE")}
    return None


def storage_space(
    kind: StorageKind, root: str, endpoint: str | None, remotes: Callable[[], dict[str, Any]]
) -> tuple[str, tuple[str, ...]]:
    """The byte space a storage root names: a namespace and a segment path inside it.

    posix: real paths; s3: endpoint + bucket, then the prefix; rclone: the remote, then its
    path, except that a `local` remote, or an `alias` of a local path, is compared as posix.
    """
    if kind is StorageKind.POSIX:
        return "posix", path_segments(os.path.realpath(root))
    if kind is StorageKind.S3:
        bucket, _, prefix = root.partition("/")
        return f"s3:{_normalise_endpoint(endpoint)}/{bucket}", path_segments(prefix)
    if kind is StorageKind.RCLONE:
        remote, _, path = root.partition(":")
        for _ in range(8):  # follow aliases, a few levels deep
            conf = _remote_conf(remotes, remote)
            if conf is None:
                break
            rtype = conf.get("type")
            if rtype == "local":
                base = path if path.startswith("/") else os.path.join(os.getcwd(), path)
                return "posix", path_segments(os.path.realpath(base))
            if rtype != "alias" or not isinstance(conf.get("remote"), str):
                break
            target = str(conf["remote"])
            head, sep, tail = target.partition(":")
            joined_tail = f"{tail.rstrip('/')}/{path}" if tail else path
            if not sep or "/" in head:  # an alias of a local path
                base = os.path.join(target, path) if path else target
                return "posix", path_segments(os.path.realpath(base))
            remote, path = head, joined_tail
        return f"rclone:{remote}", path_segments(path)
    return f"{kind.value}:{root}", ()


def _refuse_whole_fs(name: str, kind: StorageKind, root: str) -> None:
    """Raises InvalidValueError for `/` as a posix root (it would contain every other root)."""
    if kind is StorageKind.POSIX and os.path.realpath(root) == os.sep:
        raise InvalidValueError(
            f"root {root!r} of storage {name!r} is the whole file system: give a directory"
        )


def _check_overlap(session: Session, name: str, kind: StorageKind, root: str, endpoint: str | None) -> None:
    """Refuse a root that equals, lies inside or contains another storage's root: two storages
    on one byte would each take the other's files for their own. Raises InvalidValueError
    (`/` as a posix root, or an overlap, naming the other storage)."""
    if kind is StorageKind.MEMORY:
        return
    _refuse_whole_fs(name, kind, root)
    cache: dict[str, Any] = {}

    def remotes() -> dict[str, Any]:
        if "v" not in cache:
            cache["v"] = rclone_remotes()
        found: dict[str, Any] = cache["v"]
        return found

    mine = storage_space(kind, root, endpoint, remotes)
    others = session.execute(
        select(col(Storage.name), col(Storage.kind), col(Storage.root), col(Storage.endpoint)).where(
            col(Storage.state) != StorageState.RETIRED.value
        )
    ).all()
    for other, okind, oroot, oendpoint in others:
        okind = StorageKind(okind)
        if okind is StorageKind.MEMORY:
            continue
        space = storage_space(okind, oroot, oendpoint, remotes)
        same = space[0] == mine[0] or (
            okind is kind is StorageKind.S3
            and oroot.partition("/")[0] == root.partition("/")[0]
            and _same_endpoint(oendpoint, endpoint)
        )
        if same and paths_nested(space[1], mine[1]):
            how = (
                "is the same as"
                if space[1] == mine[1]
                else "lies inside"
                if len(mine[1]) > len(space[1])
                else "contains"
            )
            raise InvalidValueError(
                f"root {root!r} of storage {name!r} {how} the root {oroot!r} of storage {other!r}: "
                "storages may not share files"
            )
    if kind is StorageKind.POSIX:  # another path to the same directory: a bind mount, a hard-linked dir
        posix = {str(o[0]): str(o[2]) for o in others if o[1] == StorageKind.POSIX.value and o[0] != name}
        hit = identity.foreign_root(root, posix)
        if hit is not None:
            raise InvalidValueError(
                f"root {root!r} of storage {name!r} {hit[1]} the root {posix[hit[0]]!r} of storage "
                f"{hit[0]!r} (the same directory reached by another path, e.g. a bind mount): "
                "storages may not share files"
            )


def _refuse_marked_root(session: Session, storage: Storage) -> None:
    """Refuse a root where a marker of another non-retired storage is found at the root or at a
    parent directory / prefix (the same bytes under another name: an endpoint alias, a bind
    mount). Raises InvalidValueError naming the other storage; StorageError and subclasses
    when the markers cannot be read."""
    for marker in identity.markers_around(storage):
        if marker.storage_id == str(storage.id):
            continue
        other = session.execute(
            select(col(Storage.name), col(Storage.state)).where(
                col(Storage.id) == uuid.UUID(marker.storage_id)
            )
        ).first()
        if other is None or other[1] == StorageState.RETIRED.value:
            continue  # another catalogue's, or a retired storage's: the root is free
        raise InvalidValueError(
            f"root {storage.root!r} of storage {storage.name!r} holds the marker of storage "
            f"{other[0]!r} ({marker.where}): it is that storage's root, or lies inside it, reached "
            "another way (an endpoint alias, a bind mount); storages may not share files"
        )


def _location_id(session: Session, name: str | None) -> uuid.UUID | None:
    if not name:
        return None
    loc = session.execute(select(Location).where(col(Location.name) == name)).scalars().first()
    if loc is None:
        loc = Location(name=name)
        session.add(loc)
        session.flush()
    return loc.id


def add_storage(session: Session, data: StorageCreate, *, check: bool = True, actor: str = "user") -> Storage:
    """Register a storage volume after checking that DLM can reach it.

    Raises ConflictError (name taken), InvalidValueError (bad root or options, `/` as a posix
    root, a root equal to, inside or containing another non-retired storage's root),
    CredentialsError / StorageUnavailableError / StorageError (the check failed).
    """
    if session.execute(select(col(Storage.id)).where(col(Storage.name) == data.name)).first() is not None:
        raise ConflictError(f"storage {data.name!r} already exists")
    kind = StorageKind(data.kind)
    if data.credentials_env is not None and not re.fullmatch(r"[A-Z_][A-Z0-9_]*", data.credentials_env):
        raise InvalidValueError(
            f"invalid credentials env prefix {data.credentials_env!r}: use upper-case letters, digits, _"
        )
    if kind is not StorageKind.S3 and (data.endpoint or data.region):
        raise InvalidValueError("--endpoint and --region apply to s3 storages only")
    root = _normalise_root(data)
    _refuse_whole_fs(data.name, kind, root)
    storage = Storage(
        name=data.name,
        kind=kind,
        root=root,
        tier=data.tier,
        capacity_bytes=data.capacity_bytes,
        endpoint=data.endpoint,
        region=data.region,
        credentials_env=data.credentials_env,
        trust_stored_checksums=data.trust_stored_checksums,
        location_id=_location_id(session, data.location),
    )
    if check:
        backend_for(storage).check()
    _check_overlap(session, data.name, kind, root, data.endpoint)
    if check:
        _refuse_marked_root(session, storage)
    session.add(storage)
    try:
        session.flush()
    except IntegrityError:
        raise ConflictError(f"storage {data.name!r} already exists") from None
    if check:
        identity.write_marker(storage)
    audit.record(
        session,
        "storage.added",
        storage_id=storage.id,
        actor=actor,
        details={"name": storage.name, "kind": storage.kind, "root": storage.root},
    )
    return storage


def get_storage(session: Session, name: str) -> Storage:
    """The storage of that name. Raises StorageNotFoundError."""
    storage = session.scalars(select(Storage).where(col(Storage.name) == name)).first()
    if storage is None:
        known = (
            ", ".join(session.execute(select(col(Storage.name)).order_by(col(Storage.name))).scalars())
            or "none"
        )
        raise StorageNotFoundError(f"unknown storage {name!r} (known: {known})")
    return storage


def storage_public(session: Session, storage: Storage) -> StoragePublic:
    loc = session.get(Location, storage.location_id) if storage.location_id else None
    fields = {k: getattr(storage, k) for k in StoragePublic.model_fields if k != "location"}
    return StoragePublic.model_validate({**fields, "location": loc.name if loc else None})


def list_storages(session: Session) -> list[StoragePublic]:
    rows = session.scalars(select(Storage).order_by(col(Storage.name))).all()
    return [storage_public(session, s) for s in rows]


def storage_replica_counts(session: Session, storage_id: uuid.UUID) -> dict[str, int]:
    rows = session.execute(
        select(col(Replica.state), func.count())
        .where(col(Replica.storage_id) == storage_id)
        .group_by(col(Replica.state))
    ).all()
    return {str(state): int(n) for state, n in rows}


def set_storage_state(session: Session, name: str, state: StorageState, *, actor: str = "user") -> Storage:
    """Drain, take offline, bring online or retire a storage.

    Raises StorageNotFoundError, PolicyViolationError (retiring a storage that still holds
    live copies: drain it first), InvalidValueError (bringing back a retired storage whose
    root another storage now overlaps).
    """
    storage = get_storage(session, name)
    if state is StorageState.RETIRED:
        live = session.execute(
            select(func.count())
            .select_from(Replica)
            .where(col(Replica.storage_id) == storage.id, col(Replica.state).in_(LIVE_REPLICA_STATES))
        ).one()[0]
        if live:
            raise PolicyViolationError(
                f"storage {name!r} still holds {live} live copies: drain it and rebalance first"
            )
    if storage.state == StorageState.RETIRED and state is not StorageState.RETIRED:
        # a retired root may have been given to another storage since
        _check_overlap(session, name, StorageKind(storage.kind), storage.root, storage.endpoint)
    old = storage.state
    storage.state = state
    session.add(storage)
    audit.record(
        session,
        f"storage.{state.value}",
        storage_id=storage.id,
        actor=actor,
        details={"from": str(old), "to": state.value},
    )
    return storage


# --------------------------------------------------------------------------- ingest


@dataclass
class IngestSource:
    """One payload to ingest, resolved and validated before anything is written."""

    name: str
    path: str  # root-relative path on the storage
    local: Path | None = None  # for --upload


@dataclass
class IngestOptions:
    phase: Phase = Phase.GAS
    lifetime: timedelta | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    owner: str | None = None
    parents: list[str] = field(default_factory=list)


def _next_versions(session: Session, names: Iterable[str]) -> dict[str, int]:
    names = list(set(names))
    found: dict[str, int] = {}
    for i in range(0, len(names), 500):
        chunk = names[i : i + 500]
        rows = session.execute(
            select(col(Item.name), func.max(col(Item.version)))
            .where(col(Item.name).in_(chunk))
            .group_by(col(Item.name))
        ).all()
        found.update({n: int(v) for n, v in rows})
    return {n: found.get(n, 0) + 1 for n in names}


def upload_path(name: str, version: int) -> str:
    """Where an uploaded version lives on a storage: NAME for v1, NAME~vN for later ones."""
    return name if version == 1 else f"{name}~v{version}"


def plan_ingest(
    session: Session,
    *,
    storage: Storage,
    paths: Sequence[str],
    upload: bool,
    name: str | None = None,
) -> list[IngestSource]:
    """Resolve and validate every path before any write.

    Raises InvalidNameError (bad name, path outside the root), SourceNotFoundError,
    ConflictError (a path already registered), InvalidValueError.
    """
    if name is not None and len(paths) != 1:
        raise InvalidValueError("--name applies to a single path only")
    if not paths:
        raise InvalidValueError("nothing to ingest: give at least one path")
    backend = backend_for(storage)
    sources: list[IngestSource] = []
    for raw in paths:
        if upload:
            local = Path(raw).expanduser()
            if not local.exists():
                raise SourceNotFoundError(f"no such file: {raw}")
            if local.is_dir():
                base = local.resolve()
                files = sorted(p for p in base.rglob("*") if p.is_file())
                if not files:
                    raise SourceNotFoundError(f"directory {raw} holds no files")
                prefix = name if name is not None else base.name
                for f in files:
                    rel = f.relative_to(base).as_posix()
                    sources.append(IngestSource(validate_name(f"{prefix}/{rel}"), "", f))
            elif not local.is_file():  # a FIFO or a device: reading it would block or never end
                raise InvalidValueError(f"{raw} is not a regular file")
            else:
                name_v = validate_name(name if name is not None else local.name)
                sources.append(IngestSource(name_v, "", local.resolve()))
        else:
            rel = backend.resolve(raw)
            backend.stat(rel)  # raises SourceNotFoundError
            names = identity.link_count(storage, rel)
            if names > 1:  # one inode is one physical copy, whatever names it has
                raise InvalidValueError(
                    f"{raw} is a hard link shared with another file ({names} names, one physical "
                    "copy): DLM counts copies by their bytes; ingest a file of its own"
                )
            sources.append(IngestSource(validate_name(name if name is not None else rel), rel))
    seen: set[str] = set()
    for s in sources:
        if s.name in seen:
            raise ConflictError(f"item name {s.name!r} given twice")
        seen.add(s.name)
    if not upload:
        taken = session.execute(
            select(col(Replica.path), col(Item.name), col(Item.version))
            .join(Item, col(Item.oid) == col(Replica.item_oid))
            .where(
                col(Replica.storage_id) == storage.id,
                col(Replica.path).in_([s.path for s in sources]),
                col(Replica.state).in_(LIVE_REPLICA_STATES),
            )
        ).first()
        if taken is not None:
            raise ConflictError(
                f"{taken[0]!r} on storage {storage.name!r} is already registered as "
                f"{taken[1]} v{taken[2]}: READY items are write-once; ingest a new file"
            )
    return sources


def ingest(
    session: Session,
    *,
    storage: Storage,
    sources: Sequence[IngestSource],
    options: IngestOptions,
    actor: str = "user",
    progress: Any = None,
) -> list[Item]:
    """Register (or upload, then register) each source as a READY item with one READY replica.

    An upload never writes over an existing file or object, and the checksum recorded is
    that of the bytes stored: hashed before the upload, then compared with the storage's own
    hash (S3) or a read-back (posix); a source that changed meanwhile is refused and its
    upload removed. In place, the checksum is read from the storage's object.
    Raises ConflictError (a path held by another item, or already existing on the storage),
    InvalidValueError (a source that changed while it was read), StorageError and
    subclasses, SourceNotFoundError, TransientError.
    """
    algo = get_settings().checksum_algo
    backend = backend_for(storage)
    versions = _next_versions(session, (s.name for s in sources))
    now = utcnow()
    expires = now + options.lifetime if options.lifetime else None
    items: list[Item] = []
    total = 0
    written: list[str] = []
    try:
        for src in sources:
            version = versions[src.name]
            versions[src.name] += 1
            if src.local is not None:
                path = upload_path(src.name, version)
                _refuse_taken(session, storage, path, f"{src.name} v{version}")
                local_before = _local_stat(src.local)
                digests, size = _file_digests(src.local, (algo, "md5"))
                digest = digests[algo]
                info = backend.put(
                    path, src.local, metadata={"dlm-name": src.name, "dlm-checksum": f"{algo}:{digest}"}
                )
                written.append(path)
                if info.size != size or _local_stat(src.local) != local_before:
                    raise InvalidValueError(
                        f"{src.local} changed while it was uploaded ({size} bytes read, {info.size} "
                        "stored); nothing was registered: ingest it again when it is complete"
                    )
                if not _stored_bytes_match(backend, path, info, algo, digests):
                    raise InvalidValueError(
                        f"{src.local} changed while it was uploaded (the stored bytes are not the "
                        "ones hashed); nothing was registered: ingest it again when it is complete"
                    )
            else:
                path = src.path
                before = backend.stat(path)
                digest = backend.checksum(path, algo)
                size = before.size
                after = backend.stat(path)
                if after.size != before.size or (
                    before.mtime and after.mtime and after.mtime != before.mtime
                ):
                    raise InvalidValueError(
                        f"{path} changed while it was read; ingest it again when it is complete"
                    )
            item = Item(
                name=src.name,
                version=version,
                size=size,
                checksum=digest,
                checksum_algo=algo,
                target_phase=options.phase,
                expires_at=expires,
                owner=options.owner,
                meta=dict(options.meta),
                parents=list(options.parents),
                state=ItemState.READY,
                created_at=now,
                updated_at=now,
            )
            replica = Replica(
                item_oid=item.oid,
                storage_id=storage.id,
                path=path,
                state=ReplicaState.READY,
                verified_at=now,
                created_at=now,
                updated_at=now,
            )
            session.add(item)
            session.add(replica)
            items.append(item)
            total += size
            audit.record_many(
                session,
                [
                    {
                        "kind": "replica.created",
                        "item_oid": item.oid,
                        "replica_uid": replica.uid,
                        "storage_id": storage.id,
                        "actor": actor,
                        "details": {"path": path, "uploaded": src.local is not None},
                    },
                    {
                        "kind": "item.ready",
                        "item_oid": item.oid,
                        "actor": actor,
                        "details": {
                            "name": item.name,
                            "version": version,
                            "size": size,
                            "checksum": f"{algo}:{digest}",
                            "storage": storage.name,
                        },
                    },
                ],
            )
            if progress is not None:
                progress(size)
        session.execute(
            update(Storage)
            .where(col(Storage.id) == storage.id)
            .values(used_bytes=col(Storage.used_bytes) + total)
        )
        try:
            session.flush()
        except IntegrityError as exc:
            if not path_taken(exc):
                raise
            raise ConflictError(
                f"a path on storage {storage.name!r} was registered by another item at the same "
                "time; nothing was registered"
            ) from None
    except BaseException:
        for path in written:  # leave no orphan uploads behind a failed ingest
            with contextlib.suppress(Exception):  # best effort; reconcile reports leftovers
                backend.delete(path)
        raise
    return items


def path_taken(exc: Exception) -> bool:
    """Whether a database error is the one-owner-per-path index refusing a second live copy."""
    text = str(getattr(exc, "orig", exc))
    return "uq_replica_storage_path_live" in text or "replica.storage_id, replica.path" in text


def _refuse_taken(session: Session, storage: Storage, path: str, what: str) -> None:
    """Raises ConflictError if a live copy of another item holds `path` on the storage."""
    taken = session.execute(
        select(col(Item.name), col(Item.version))
        .join(Replica, col(Replica.item_oid) == col(Item.oid))
        .where(
            col(Replica.storage_id) == storage.id,
            col(Replica.path) == path,
            col(Replica.state).in_(LIVE_REPLICA_STATES),
        )
    ).first()
    if taken is not None:
        raise ConflictError(
            f"{what} would be uploaded to {path!r} on storage {storage.name!r}, which already holds "
            f"{taken[0]} v{taken[1]}: give another name"
        )


def _local_stat(path: Path) -> tuple[int, int]:
    """(size, mtime in ns) of a local file, to tell whether it changed during an upload."""
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _file_digests(path: Path, algos: Iterable[str]) -> tuple[dict[str, str], int]:
    """Hex digests of a local file in several algorithms, in one read; and its size."""
    from lifecycle.checksum import CHUNK, new_hasher

    wanted = list(dict.fromkeys(algos))
    if len(wanted) == 1:
        digest, size = checksum_file(path, wanted[0])
        return {wanted[0]: digest}, size
    hashers = {a: new_hasher(a) for a in wanted}
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            for h in hashers.values():
                h.update(chunk)
    return {a: h.hexdigest() for a, h in hashers.items()}, size


def _stored_bytes_match(backend: Any, path: str, info: Any, algo: str, digests: Mapping[str, str]) -> bool:
    """Whether the stored object holds the bytes hashed before the upload: by the hash the
    storage computed itself (S3 ETag MD5, or the md5chksum of a multipart upload whose parts
    were each checked), else by reading the stored bytes back (also when the stored hash
    differs: an encrypted object's ETag, say, is no MD5)."""
    algo_kept = info.checksum_algo
    if info.checksum and algo_kept in digests and str(info.checksum).lower() == digests[algo_kept]:
        return True
    return bool(backend.checksum(path, algo) == digests[algo])


# --------------------------------------------------------------------------- items


def _parse_ref(ref: str) -> tuple[str, int | None]:
    if "@v" in ref:
        base, _, ver = ref.rpartition("@v")
        if ver.isdigit():
            return base, int(ver)
    return ref, None


def get_item(session: Session, ref: str) -> Item:
    """An item by oid, NAME (newest version) or NAME@vN. Raises ItemNotFoundError."""
    try:
        oid = uuid.UUID(ref)
    except ValueError:
        oid = None
    if oid is not None:
        item = session.get(Item, oid)
        if item is not None:
            return item
    name, version = _parse_ref(ref)
    stmt = select(Item).where(col(Item.name) == name)
    stmt = stmt.where(col(Item.version) == version) if version else stmt.order_by(col(Item.version).desc())
    found = session.scalars(stmt).first()
    if found is None:
        raise ItemNotFoundError(f"no item {ref!r}")
    return found


def list_items(
    session: Session, *, where: str | None = None, limit: int | None = 1000, offset: int = 0
) -> list[Item]:
    """Items matching a filter expression (lifecycle.query), newest first by name and version.

    Raises InvalidFilterError.
    """
    stmt = select(Item)
    if where is not None:  # "" is an empty filter (an error), not "no filter"
        from lifecycle.query import compile_filter

        stmt = stmt.where(compile_filter(where))
    stmt = stmt.order_by(col(Item.name), col(Item.version)).offset(offset)
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.execute(stmt).scalars().all())


def iter_items(session: Session, *, where: str | None = None, chunk: int = 5000) -> Iterator[Item]:
    """Every matching item, streamed. Raises InvalidFilterError."""
    stmt = select(Item)
    if where is not None:
        from lifecycle.query import compile_filter

        stmt = stmt.where(compile_filter(where))
    stmt = stmt.order_by(col(Item.name), col(Item.version)).execution_options(yield_per=chunk)
    yield from session.execute(stmt).scalars()


@dataclass
class ItemDetail:
    item: Item
    replicas: list[tuple[Replica, str]]  # replica, storage name
    events: list[Event]


def item_detail(session: Session, ref: str, *, events: int = 50) -> ItemDetail:
    item = get_item(session, ref)
    reps = session.execute(
        select(Replica, col(Storage.name))
        .join(Storage, col(Storage.id) == col(Replica.storage_id))
        .where(col(Replica.item_oid) == item.oid)
        .order_by(col(Replica.created_at))
    ).all()
    evs = (
        session.execute(
            select(Event).where(col(Event.item_oid) == item.oid).order_by(col(Event.id).desc()).limit(events)
        )
        .scalars()
        .all()
    )
    return ItemDetail(item, [(r, n) for r, n in reps], list(reversed(evs)))


def set_phase(session: Session, ref: str, phase: Phase, *, actor: str = "user") -> Item:
    """Change an item's target phase (the pipelines then converge placement to it)."""
    item = get_item(session, ref)
    if item.state in (ItemState.EXPIRED, ItemState.DELETED):
        raise PolicyViolationError(f"item {item.name} v{item.version} is {item.state}: its phase is final")
    old = item.target_phase
    item.target_phase = phase
    item.updated_at = utcnow()
    session.add(item)
    audit.record(
        session,
        "item.phase_changed",
        item_oid=item.oid,
        actor=actor,
        details={"from": str(old), "to": phase.value},
    )
    return item


def set_expiry(session: Session, ref: str, expires_at: datetime | None, *, actor: str = "user") -> Item:
    """Set or clear an item's expiry time."""
    item = get_item(session, ref)
    if item.state in (ItemState.EXPIRED, ItemState.DELETED):
        raise PolicyViolationError(f"item {item.name} v{item.version} is already {item.state}")
    old = item.expires_at
    item.expires_at = expires_at
    item.updated_at = utcnow()
    session.add(item)
    audit.record(
        session,
        "item.expiry_changed",
        item_oid=item.oid,
        actor=actor,
        details={
            "from": old.isoformat() if old else None,
            "to": expires_at.isoformat() if expires_at else None,
        },
    )
    return item


# --------------------------------------------------------------------------- datasets


def create_dataset(
    session: Session,
    name: str,
    where: str,
    *,
    description: str = "",
    owner: str | None = None,
    actor: str = "user",
) -> Dataset:
    """Save a named filter. Raises InvalidNameError, InvalidFilterError, ConflictError."""
    from lifecycle.names import validate_slug
    from lifecycle.query import compile_filter

    validate_slug(name, what="dataset name")
    compile_filter(where)
    if session.execute(select(col(Dataset.id)).where(col(Dataset.name) == name)).first() is not None:
        raise ConflictError(f"dataset {name!r} already exists")
    ds = Dataset(name=name, where=where, description=description, owner=owner)
    session.add(ds)
    session.flush()
    audit.record(session, "dataset.created", actor=actor, details={"name": name, "where": where})
    return ds


def get_dataset(session: Session, name: str) -> Dataset:
    ds = session.scalars(select(Dataset).where(col(Dataset.name) == name)).first()
    if ds is None:
        raise DatasetNotFoundError(f"unknown dataset {name!r}")
    return ds


def list_datasets(session: Session) -> list[Dataset]:
    return list(session.scalars(select(Dataset).order_by(col(Dataset.name))).all())


def delete_dataset(session: Session, name: str, *, actor: str = "user") -> None:
    ds = get_dataset(session, name)
    session.delete(ds)
    audit.record(session, "dataset.deleted", actor=actor, details={"name": name})


# --------------------------------------------------------------------------- status


def required_copies_expr() -> Any:
    """SQL CASE giving the copies an item's target phase needs (from the policy settings)."""
    p = get_settings().policy
    return case(
        (col(Item.target_phase) == Phase.SOLID.value, p.copies_solid),
        (col(Item.target_phase) == Phase.LIQUID.value, p.copies_liquid),
        (col(Item.target_phase) == Phase.GAS.value, p.copies_gas),
        else_=p.copies_plasma,
    )


def intact_counts_subquery() -> Any:
    """Per item, the number of READY replicas on storages that are not offline or retired."""
    return (
        select(col(Replica.item_oid).label("item_oid"), func.count().label("n"))
        .join(Storage, col(Storage.id) == col(Replica.storage_id))
        .where(
            col(Replica.state) == ReplicaState.READY.value,
            col(Storage.state).in_([StorageState.ONLINE.value, StorageState.DRAINING.value]),
        )
        .group_by(col(Replica.item_oid))
        .subquery()
    )


@dataclass
class StorageUsage:
    name: str
    kind: str
    tier: str
    location: str | None
    state: str
    used_bytes: int
    capacity_bytes: int | None
    replicas: int


@dataclass
class Status:
    storages: list[StorageUsage]
    items_by_state: dict[str, int]
    items_by_phase: dict[str, int]
    below_target: int
    bytes_total: int


def status(session: Session) -> Status:
    """Storages with usage, items by state and by target phase, items below their target."""
    rep_counts: dict[uuid.UUID, int] = {
        sid: int(n)
        for sid, n in session.execute(
            select(col(Replica.storage_id), func.count())
            .where(col(Replica.state).in_(LIVE_REPLICA_STATES))
            .group_by(col(Replica.storage_id))
        ).all()
    }
    storages = []
    for s in session.scalars(select(Storage).order_by(col(Storage.name))):
        loc = session.get(Location, s.location_id) if s.location_id else None
        storages.append(
            StorageUsage(
                s.name,
                str(s.kind),
                str(s.tier),
                loc.name if loc else None,
                str(s.state),
                int(s.used_bytes),
                s.capacity_bytes,
                int(rep_counts.get(s.id, 0)),
            )
        )
    by_state = {
        str(k): int(v)
        for k, v in session.execute(select(col(Item.state), func.count()).group_by(col(Item.state))).all()
    }
    live = col(Item.state).in_(
        [ItemState.READY.value, ItemState.INITIALISED.value, ItemState.CORRUPTED.value]
    )
    by_phase = {
        str(k): int(v)
        for k, v in session.execute(
            select(col(Item.target_phase), func.count()).where(live).group_by(col(Item.target_phase))
        ).all()
    }
    counts = intact_counts_subquery()
    below = session.execute(
        select(func.count())
        .select_from(Item)
        .outerjoin(counts, counts.c.item_oid == col(Item.oid))
        .where(live, func.coalesce(counts.c.n, 0) < required_copies_expr())
    ).one()[0]
    total = session.execute(select(func.coalesce(func.sum(col(Item.size)), 0)).where(live)).one()[0]
    return Status(storages, by_state, by_phase, int(below), int(total))


def table_counts(session: Session) -> Mapping[str, int]:
    """Rows per catalogue table (used by tests and `dlm status --json`)."""
    out: dict[str, int] = {}
    for model in (Location, Storage, Item, Replica, Transfer, Event, Dataset):
        out[model.__tablename__] = int(session.execute(select(func.count()).select_from(model)).one()[0])
    return out


def current_actor() -> str:
    """Who acts: DLM_OWNER, else the login name."""
    return get_settings().owner or os.environ.get("USER") or "user"
