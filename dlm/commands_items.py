"""`dlm items ...` (list, show, set-phase, set-expiry, set-meta, delete) and `dlm url`. Parse, call, render:
the rows come from lifecycle.catalogue.public, the rules from lifecycle.catalogue.inputs."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from dlm import render
from dlm.common import JsonOpt, catalogue
from lifecycle.catalogue import catalog, public
from lifecycle.catalogue.inputs import ExpiryChange, MetadataUpdate
from lifecycle.catalogue.metadata import scalar
from lifecycle.errors import InvalidMetadataError, InvalidValueError
from lifecycle.units import parse_duration

items_app = typer.Typer(
    help="Items: list, show, set-phase, set-expiry, set-meta, delete.", no_args_is_help=True
)


@items_app.command("list")
def items_list(
    where: Annotated[
        str | None, typer.Option(help="filter, e.g. \"meta.kind = 'raw' and size > 1GiB\"")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="at most this many")] = 1000,
    json_: JsonOpt = False,
) -> None:
    """Items matching a filter (see `--where`; fields include meta.KEY and storage)."""
    with catalogue() as s:
        rows = public.list_items(where=where, limit=limit, session=s)
    if json_:
        render.print_json(rows)
        return
    render.table(
        None,
        ["name", "v", "size", "state", "phase", "owner", "created", "expires"],
        [
            (
                r.name,
                r.version,
                render.size(r.size),
                r.state,
                r.target_phase,
                r.owner,
                render.when(r.created_at),
                render.when(r.expires_at),
            )
            for r in rows
        ],
    )
    render.err.print(f"{len(rows)} items" + (" (limit reached)" if len(rows) == limit else ""))


@items_app.command("show")
def items_show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@vN or OID")], json_: JsonOpt = False
) -> None:
    """One item with its replicas and its events."""
    with catalogue() as s:
        d = public.item_detail(ref, session=s)
    if json_:
        render.print_json(d)
        return
    fields = d.model_dump(exclude={"replicas", "events"})
    render.table(
        f"Item {d.name} v{d.version}",
        ["field", "value"],
        [
            (k, json.dumps(v) if isinstance(v, dict | list) else render.when(v) if k.endswith("_at") else v)
            for k, v in fields.items()
        ],
    )
    render.table(
        "Replicas",
        ["storage", "path", "state", "verified", "expires"],
        [
            (r.storage, r.path, r.state, render.when(r.verified_at), render.when(r.expires_at))
            for r in d.replicas
        ],
    )
    render.table(
        "Events",
        ["when", "event", "by", "details"],
        [(render.when(e.ts), e.kind, e.actor, json.dumps(e.details, default=str)) for e in d.events],
    )


@items_app.command("set-phase")
def items_set_phase(ref: str, phase: str) -> None:
    """Change an item's target phase (PLASMA, GAS, LIQUID, SOLID)."""
    with catalogue() as s:
        item = catalog.set_phase(ref, phase, actor=catalog.current_actor(), session=s)
        label, phase_v = f"{item.name} v{item.version}", str(item.target_phase)
    render.out.print(f"{label}: target phase {phase_v}")


@items_app.command("set-expiry")
def items_set_expiry(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@vN or OID")],
    lifetime: Annotated[str | None, typer.Option(help="from now, e.g. 30d")] = None,
    at: Annotated[str | None, typer.Option(help="an ISO date or time")] = None,
    never: Annotated[bool, typer.Option(help="clear the expiry")] = False,
    storage: Annotated[
        str | None,
        typer.Option("--storage", "-s", help="the expiry of the item's copy on this storage only"),
    ] = None,
) -> None:
    """Set when an item expires (--lifetime 30d, --at 2027-01-01, or --never); with --storage,
    when its copy there expires (`dlm run expire` deletes it then, never the last intact copy)."""
    change = ExpiryChange.build(
        {"lifetime": "--lifetime", "at": "--at", "never": "--never"}, lifetime=lifetime, at=at, never=never
    )
    if storage is not None:
        with catalogue() as s:
            done = catalog.set_replica_expiry(ref, storage, change, actor=catalog.current_actor(), session=s)
            label, expires = f"{done.item.name} v{done.item.version}", done.replica.expires_at
            kept, intact, needed = done.kept_by_policy, done.intact, done.needed
        when = render.when(expires) if expires else "never"
        render.out.print(f"{label}: its copy on {storage} expires {when}")
        if expires is not None and kept:
            render.err.print(
                f"note: the item has {intact} intact {'copy' if intact == 1 else 'copies'} and needs "
                f"{needed}: expire keeps this one (policy.refused) until there are more"
            )
        return
    with catalogue() as s:
        item = catalog.set_expiry(ref, change, actor=catalog.current_actor(), session=s)
        label, expires = f"{item.name} v{item.version}", item.expires_at
    render.out.print(f"{label}: expires {render.when(expires) if expires else 'never'}")


@items_app.command("set-meta")
def items_set_meta(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@vN or OID")],
    pairs: Annotated[list[str], typer.Argument(help="KEY=VALUE (a dotted key sets a nested one)")],
    json_: JsonOpt = False,
) -> None:
    """Set metadata keys of an item (the others stay), as --meta sets them at ingest."""
    values: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidMetadataError(f"invalid KEY=VALUE {pair[:80]!r}: no '='")
        values[key] = scalar(value)
    update = MetadataUpdate.build(values=values)
    with catalogue() as s:
        item = catalog.set_metadata(ref, update, actor=catalog.current_actor(), session=s)
        label, meta = f"{item.name} v{item.version}", dict(item.meta)
    if json_:
        render.print_json(meta)
    else:
        render.out.print(f"{label}: metadata {json.dumps(meta, ensure_ascii=False)}", markup=False)


@items_app.command("delete")
def items_delete(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@vN or OID")],
    yes: Annotated[bool, typer.Option("--yes", help="confirm: every copy is deleted now")] = False,
) -> None:
    """Delete an item now: every copy goes, the item stays as a DELETED tombstone."""
    from lifecycle.apply.records import delete_item_now
    from lifecycle.planning.pipelines import policy_from

    with catalogue() as s:
        item = catalog.get_item(ref, session=s)
        oid, label = item.oid, f"{item.name} v{item.version}"
    if not yes:
        raise InvalidValueError(f"deleting {label} removes every copy: add --yes to confirm")
    results = delete_item_now(oid, policy=policy_from(), actor=catalog.current_actor())
    failed = sum(r.failed for r in results)
    render.out.print(
        f"{label}: deleted {sum(r.done for r in results)} copies" + (f", {failed} failed" if failed else "")
    )
    if failed:
        raise SystemExit(1)


def url(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@vN or OID")],
    expires: Annotated[str, typer.Option(help="how long a presigned URL is valid, e.g. 1h")] = "1h",
) -> None:
    """A URL to fetch an item's best intact copy (presigned for S3)."""
    from lifecycle.apply.checkout import best_sources
    from lifecycle.storage.backends import backend_for

    seconds = int(parse_duration(expires).total_seconds())
    with catalogue() as s:
        item = catalog.get_item(ref, session=s)
        [src] = best_sources(s, [item])
        link = backend_for(src.storage).url(src.path, seconds)
    render.out.print(link, markup=False, soft_wrap=True)
