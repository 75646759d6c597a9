"""The storage registry: add a storage (one owner per byte: no overlapping roots), look it
up, change its state, report its space.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col

from lifecycle.catalogue import audit
from lifecycle.catalogue.inputs import StorageChange
from lifecycle.catalogue.metadata import unstorable
from lifecycle.catalogue.models import (
    Location,
    Replica,
    Storage,
    StorageCreate,
    StoragePublic,
)
from lifecycle.errors import (
    ConflictError,
    InvalidValueError,
    PolicyViolationError,
    StorageNotFoundError,
)
from lifecycle.names import validate_name
from lifecycle.states import (
    LIVE_REPLICA_STATES,
    STORAGE_STATE_EVENTS,
    EventKind,
    StorageKind,
    StorageState,
)
from lifecycle.storage import identity
from lifecycle.storage.backends import backend_for
from lifecycle.transfer.process import run

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


def same_endpoint(a: str | None, b: str | None) -> bool:
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

    try:
        proc = run(["config", "dump"], timeout=30)
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


def check_overlap(session: Session, name: str, kind: StorageKind, root: str, endpoint: str | None) -> None:
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
            and same_endpoint(oendpoint, endpoint)
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


def add_storage(data: StorageCreate, *, session: Session, check: bool = True, actor: str = "user") -> Storage:
    """Register a storage volume after checking that DLM can reach it.

    `data` was validated when it was built (name, kind, tier, capacity, endpoint, credentials
    prefix: lifecycle.catalogue.models.StorageCreate); here the root is checked against the file
    system and the other storages.
    Raises ConflictError (name taken), InvalidValueError (bad root or options, `/` as a posix
    root, a root equal to, inside or containing another non-retired storage's root),
    CredentialsError / StorageUnavailableError / StorageError (the check failed).
    """
    if session.execute(select(col(Storage.id)).where(col(Storage.name) == data.name)).first() is not None:
        raise ConflictError(f"storage {data.name!r} already exists")
    kind = StorageKind(data.kind)
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
    check_overlap(session, data.name, kind, root, data.endpoint)
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
        EventKind.STORAGE_ADDED,
        storage_id=storage.id,
        actor=actor,
        details={"name": storage.name, "kind": storage.kind, "root": storage.root},
    )
    return storage


def get_storage(name: str, *, session: Session) -> Storage:
    """The storage of that name. Raises StorageNotFoundError."""
    storage = (
        None
        if unstorable(name)
        else session.scalars(select(Storage).where(col(Storage.name) == name)).first()
    )
    if storage is None:
        known = (
            ", ".join(session.execute(select(col(Storage.name)).order_by(col(Storage.name))).scalars())
            or "none"
        )
        raise StorageNotFoundError(f"unknown storage {name!r} (known: {known})")
    return storage


def storage_public(storage: Storage, *, session: Session) -> StoragePublic:
    loc = session.get(Location, storage.location_id) if storage.location_id else None
    fields = {k: getattr(storage, k) for k in StoragePublic.model_fields if k != "location"}
    return StoragePublic.model_validate({**fields, "location": loc.name if loc else None})


def list_storages(*, session: Session) -> list[StoragePublic]:
    rows = session.scalars(select(Storage).order_by(col(Storage.name))).all()
    return [storage_public(s, session=session) for s in rows]


def storage_replica_counts(storage_id: uuid.UUID, *, session: Session) -> dict[str, int]:
    rows = session.execute(
        select(col(Replica.state), func.count())
        .where(col(Replica.storage_id) == storage_id)
        .group_by(col(Replica.state))
    ).all()
    return {str(state): int(n) for state, n in rows}


def set_storage_state(name: str, state: StorageState, *, session: Session, actor: str = "user") -> Storage:
    """Drain, take offline, bring online or retire a storage.

    Raises StorageNotFoundError, PolicyViolationError (retiring a storage that still holds
    live copies: drain it first), InvalidValueError (bringing back a retired storage whose
    root another storage now overlaps).
    """
    storage = get_storage(name, session=session)
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
        check_overlap(session, name, StorageKind(storage.kind), storage.root, storage.endpoint)
    if state is StorageState.ONLINE:
        # bringing a storage online asserts its root is the right one: mark an unmarked root
        # (a storage from before markers, or one emptied on purpose) so batches accept it
        identity.mark_if_unmarked(storage)
    old = storage.state
    storage.state = state
    session.add(storage)
    audit.record(
        session,
        STORAGE_STATE_EVENTS[state],
        storage_id=storage.id,
        actor=actor,
        details={"from": str(old), "to": state.value},
    )
    return storage


def change_storage(name: str, change: StorageChange, *, session: Session, actor: str = "user") -> Storage:
    """Change a storage's tier, capacity and state as `change` says (`dlm storage set`, `PATCH
    /api/storages/{name}`). Tier and capacity write one `storage.changed` event (`from` and
    `to` of each field that changed); a state goes through set_storage_state, exactly as
    `dlm storage online|drain|offline|retire` (bringing it online marks an unmarked root).
    Everything happens in the caller's transaction: a refusal changes nothing.

    Raises StorageNotFoundError, and what set_storage_state raises (PolicyViolationError:
    retiring a storage that holds live copies; InvalidValueError; StorageError)."""
    storage = get_storage(name, session=session)
    changed: dict[str, dict[str, Any]] = {}
    if change.tier is not None and change.tier != storage.tier:
        changed["tier"] = {"from": str(storage.tier), "to": change.tier.value}
        storage.tier = change.tier
    if (change.capacity_bytes is not None or change.clears_capacity) and (
        change.capacity_bytes != storage.capacity_bytes
    ):
        changed["capacity_bytes"] = {"from": storage.capacity_bytes, "to": change.capacity_bytes}
        storage.capacity_bytes = change.capacity_bytes
    if changed:
        session.add(storage)
        audit.record(
            session,
            EventKind.STORAGE_CHANGED,
            storage_id=storage.id,
            actor=actor,
            details={"name": storage.name, **changed},
        )
    state = change.target_state(StorageState(storage.state))
    if state is not None:
        storage = set_storage_state(name, state, session=session, actor=actor)
    return storage
