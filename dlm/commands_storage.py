"""`dlm storage ...`: add, list, show, set, drain, retire, offline, online. Parse, call, render."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from dlm import render
from dlm.common import JsonOpt, catalogue
from lifecycle.catalogue import catalog, public, storages
from lifecycle.catalogue.inputs import StorageChange
from lifecycle.catalogue.models import StorageCreate
from lifecycle.states import StorageState

storage_app = typer.Typer(help="Storage volumes: add, list, show, set, drain, retire.", no_args_is_help=True)


@storage_app.command("add")
def storage_add(
    name: str,
    kind: Annotated[str, typer.Option(help="posix, s3 or rclone")],
    root: Annotated[str, typer.Option(help="a directory, BUCKET[/PREFIX] or REMOTE:PATH")],
    endpoint: Annotated[str | None, typer.Option(help="S3 endpoint URL")] = None,
    region: Annotated[str | None, typer.Option(help="S3 region")] = None,
    credentials_env: Annotated[
        str | None,
        typer.Option(help="S3: read PREFIX_ACCESS_KEY_ID / PREFIX_SECRET_ACCESS_KEY (default AWS)"),
    ] = None,
    capacity: Annotated[str | None, typer.Option(help="e.g. 10GiB")] = None,
    tier: Annotated[str, typer.Option(help="hot, warm, cold or archive")] = "hot",
    location: Annotated[str | None, typer.Option(help="site name")] = None,
    trust_checksums: Annotated[
        bool, typer.Option(help="verify may trust the storage's own checksums of the same algorithm")
    ] = False,
    check: Annotated[bool, typer.Option(help="check that the storage is reachable first")] = True,
    json_: JsonOpt = False,
) -> None:
    """Register a storage volume (credentials stay in the environment, never in the DB)."""
    data = StorageCreate.build(
        {"endpoint": "--endpoint", "region": "--region"},
        name=name,
        kind=kind,
        root=root,
        endpoint=endpoint,
        region=region,
        credentials_env=credentials_env,
        capacity_bytes=capacity,
        tier=tier,
        location=location,
        trust_stored_checksums=trust_checksums,
    )
    with catalogue() as s:
        st = storages.add_storage(data, check=check, actor=catalog.current_actor(), session=s)
        pub = storages.storage_public(st, session=s)
    if json_:
        render.print_json(pub)
    else:
        render.out.print(f"added storage {pub.name} ({pub.kind} {pub.root}, {pub.tier})")


@storage_app.command("list")
def storage_list(json_: JsonOpt = False) -> None:
    """All storages."""
    with catalogue() as s:
        rows = storages.list_storages(session=s)
    if json_:
        render.print_json(rows)
        return
    render.table(
        None,
        ["name", "kind", "root", "tier", "location", "state", "used", "capacity"],
        [
            (
                r.name,
                r.kind,
                r.root,
                r.tier,
                r.location,
                r.state,
                render.size(r.used_bytes),
                render.size(r.capacity_bytes),
            )
            for r in rows
        ],
    )


@storage_app.command("show")
def storage_show(name: str, json_: JsonOpt = False) -> None:
    """One storage, with used and free space and its copies by state."""
    with catalogue() as s:
        pub = public.storage_detail(name, session=s)
    if json_:
        render.print_json(pub)
        return
    rows = [
        ("name", pub.name),
        ("kind", pub.kind),
        ("root", pub.root),
        ("endpoint", pub.endpoint),
        ("credentials", f"{pub.credentials_env or 'AWS'}_ACCESS_KEY_ID" if pub.kind == "s3" else None),
        ("tier", pub.tier),
        ("location", pub.location),
        ("state", pub.state),
        ("used", render.size(pub.used_bytes)),
        ("capacity", render.size(pub.capacity_bytes)),
        ("free", render.size(pub.free_bytes)),
        ("copies", ", ".join(f"{k}: {v}" for k, v in sorted(pub.replicas.items())) or "none"),
    ]
    render.table(f"Storage {pub.name}", ["field", "value"], rows)


# how `dlm storage set` names StorageChange's fields in its messages
SET_LABELS = {
    "capacity_bytes": "--capacity",
    "tier": "--tier",
    "online": "--online/--offline",
    "offline": "--offline",
    "draining": "--draining/--no-draining",
    "draining_on": "--draining",
    "state": "--online/--offline",
    "changes": "--capacity, --tier, --online/--offline or --draining/--no-draining",
}


@storage_app.command("set")
def storage_set(
    name: str,
    capacity: Annotated[
        str | None, typer.Option(help="the most DLM may place there, e.g. 10TiB; none: no limit")
    ] = None,
    tier: Annotated[str | None, typer.Option(help="hot, warm, cold or archive")] = None,
    online: Annotated[
        bool | None, typer.Option("--online/--offline", help="bring online, or take offline")
    ] = None,
    draining: Annotated[
        bool | None,
        typer.Option("--draining/--no-draining", help="drain (rebalance moves copies off), or stop"),
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Change a storage's capacity, tier or state (what PATCH /api/storages/NAME changes)."""
    given = {"capacity_bytes": capacity, "tier": tier, "online": online, "draining": draining}
    change = StorageChange.build(SET_LABELS, **{k: v for k, v in given.items() if v is not None})
    with catalogue() as s:
        storages.change_storage(name, change, actor=catalog.current_actor(), session=s)
    with catalogue() as s:
        pub = public.storage_detail(name, session=s)
    if json_:
        render.print_json(pub)
        return
    capacity = render.size(pub.capacity_bytes) if pub.capacity_bytes else "none"
    render.out.print(f"storage {pub.name}: {pub.state}, tier {pub.tier}, capacity {capacity}")


def _storage_state_command(state: StorageState, doc: str) -> Any:
    def command(name: str) -> None:
        with catalogue() as s:
            storages.set_storage_state(name, state, actor=catalog.current_actor(), session=s)
        render.out.print(f"storage {name} is now {state.value}")

    command.__doc__ = doc
    return command


storage_app.command("drain")(
    _storage_state_command(StorageState.DRAINING, "Drain a storage: rebalance moves its copies elsewhere.")
)
storage_app.command("retire")(
    _storage_state_command(StorageState.RETIRED, "Retire a storage that holds no live copies.")
)
storage_app.command("offline")(
    _storage_state_command(StorageState.OFFLINE, "Mark a storage offline (its copies do not count).")
)
storage_app.command("online")(_storage_state_command(StorageState.ONLINE, "Bring a storage back online."))
