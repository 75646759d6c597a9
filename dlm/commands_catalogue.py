"""`dlm ingest`, `dlm status` and `dlm datasets ...`. Parse, call, render: the rules are in
lifecycle.catalogue.inputs, the rows in lifecycle.catalogue.public."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from dlm import render
from dlm.common import JsonOpt, catalogue
from lifecycle.catalogue import catalog, public, storages
from lifecycle.catalogue import ingest as ingesting
from lifecycle.catalogue.inputs import DatasetCreate, ItemOptions
from lifecycle.catalogue.metadata import parse_meta
from lifecycle.errors import InvalidValueError
from lifecycle.settings import get_settings

datasets_app = typer.Typer(help="Datasets: named, saved filters.", no_args_is_help=True)


# --------------------------------------------------------------------------- status


def status(json_: JsonOpt = False) -> None:
    """Storages with used/capacity, items by state and phase, items below target."""
    with catalogue() as s:
        st = public.status(session=s)
    if json_:
        render.print_json(st)
        return
    render.table(
        "Storages",
        ["name", "kind", "tier", "location", "state", "copies", "used", "capacity", "use %"],
        [
            (
                u.name,
                u.kind,
                u.tier,
                u.location,
                u.state,
                u.replicas,
                render.size(u.used_bytes),
                render.size(u.capacity_bytes),
                f"{100 * u.used_bytes / u.capacity_bytes:.0f}%" if u.capacity_bytes else "-",
            )
            for u in st.storages
        ],
    )
    render.table("Items by state", ["state", "items"], sorted(st.items_by_state.items()))
    render.table("Live items by target phase", ["phase", "items"], sorted(st.items_by_phase.items()))
    render.out.print(f"items below their target phase: {st.below_target}")


# --------------------------------------------------------------------------- ingest


def ingest(
    paths: Annotated[
        list[str] | None, typer.Argument(help="files on the storage, or local files with --upload")
    ] = None,
    storage: Annotated[str, typer.Option("--storage", "-s", help="storage name")] = "",
    upload: Annotated[bool, typer.Option(help="copy local files onto the storage first")] = False,
    name: Annotated[str | None, typer.Option(help="item name (single path only)")] = None,
    meta: Annotated[list[str] | None, typer.Option(help="key=value (repeatable)")] = None,
    meta_json: Annotated[Path | None, typer.Option(help="a JSON object file of metadata")] = None,
    phase: Annotated[str, typer.Option(help="PLASMA, GAS, LIQUID or SOLID")] = "GAS",
    lifetime: Annotated[str | None, typer.Option(help="e.g. 30d, 12h, 1y")] = None,
    owner: Annotated[str | None, typer.Option(help="owner (default: you)")] = None,
    from_list: Annotated[
        Path | None, typer.Option(help="JSON lines or CSV: name, path, size, checksum, metadata")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Register files already on a storage, upload local files, or bulk-register a list."""
    if not storage:
        raise InvalidValueError("--storage is required")
    opts = ItemOptions.build(
        {"owner": "--owner"},
        phase=phase,
        lifetime=lifetime,
        metadata=parse_meta(meta, meta_json),
        owner=owner,
    )
    who = opts.owner = opts.owner if opts.owner is not None else catalog.current_actor()
    if from_list is not None:
        if paths or upload or name:
            raise InvalidValueError("--from-list takes no paths, --upload or --name")
        _ingest_list(storage, from_list, opts, who, json_)
        return
    with catalogue() as s:
        st = storages.get_storage(storage, session=s)
        sources = ingesting.plan_ingest(storage=st, paths=paths or [], upload=upload, name=name, session=s)
        with _progress(len(sources), "ingest") as advance:
            items = ingesting.ingest(
                storage=st, sources=sources, options=opts, actor=who, progress=advance, session=s
            )
        rows = public.ingested(items)
    _announce_ready([str(r.oid) for r in rows])
    if json_:
        render.print_json(rows)
        return
    algo = get_settings().checksum_algo
    for r in rows:
        render.out.print(f"READY {r.name} v{r.version} ({render.size(r.size)}, {algo} {r.checksum})")


def _ingest_list(storage: str, path: Path, opts: ItemOptions, who: str, json_: bool) -> None:
    from lifecycle.catalogue.bulk import register_from_list

    with catalogue() as s:
        st = storages.get_storage(storage, session=s)
        res = register_from_list(
            s,
            storage=st,
            source=path,
            phase=opts.phase,
            lifetime=opts.lifetime,
            meta=opts.metadata,
            owner=who,
            actor=who,
        )
    if json_:
        render.print_json(vars(res))
    else:
        render.out.print(
            f"registered {res.count} items ({res.ready} READY, {res.pending} awaiting checksum, "
            f"{render.size(res.bytes)}) in {res.duration_s:.1f}s"
        )


@contextmanager
def _progress(total: int, what: str) -> Iterator[Any]:
    """A progress bar on stderr for long work (only on a terminal)."""
    if total < 2 or not sys.stderr.isatty():
        yield lambda _n=0: None
        return
    from rich.progress import Progress

    with Progress(console=render.err, transient=True) as progress:
        task = progress.add_task(what, total=total)
        yield lambda _n=0: progress.advance(task)


def _announce_ready(oids: list[str]) -> None:
    """Tell a running `dlm serve` (if any) that items are READY, so replicate runs for them."""
    try:
        from flows.events import announce_items_ready
    except ImportError:
        return
    announce_items_ready(oids)


# --------------------------------------------------------------------------- datasets


@datasets_app.command("create")
def datasets_create(
    name: str,
    where: Annotated[str, typer.Option(help="the filter that defines the members")],
    description: Annotated[str, typer.Option()] = "",
) -> None:
    """Save a named filter; its members are computed when it is read."""
    data = DatasetCreate(name=name, where=where, description=description, owner=catalog.current_actor())
    with catalogue() as s:
        catalog.create_dataset(data, actor=catalog.current_actor(), session=s)
    render.out.print(f"dataset {name} created")


@datasets_app.command("list")
def datasets_list(json_: JsonOpt = False) -> None:
    """All datasets."""
    with catalogue() as s:
        rows = public.list_datasets(session=s)
    if json_:
        render.print_json(rows)
        return
    render.table(
        None,
        ["name", "where", "description", "owner"],
        [(r.name, r.where, r.description, r.owner) for r in rows],
    )


@datasets_app.command("show")
def datasets_show(
    name: str, limit: Annotated[int, typer.Option(min=1)] = 1000, json_: JsonOpt = False
) -> None:
    """A dataset and its current members."""
    with catalogue() as s:
        ds = public.dataset_detail(name, limit=limit, session=s)
    if json_:
        render.print_json(ds)
        return
    render.out.print(f"dataset {ds.name}: {ds.where}")
    render.table(
        None,
        ["name", "v", "size", "state", "phase"],
        [(m.name, m.version, render.size(m.size), m.state, m.target_phase) for m in ds.members],
    )
    render.err.print(f"{len(ds.members)} members")


@datasets_app.command("delete")
def datasets_delete(name: str) -> None:
    """Forget a dataset (its items stay)."""
    with catalogue() as s:
        catalog.delete_dataset(name, actor=catalog.current_actor(), session=s)
    render.out.print(f"dataset {name} deleted")
