"""The `dlm` command line: parse, call the lifecycle core (or start a flow), render.

Long because it holds every `dlm` command, each a short function of argument parsing and
rendering; the work itself is in lifecycle/ and flows/.

Exit codes: 0 success, 1 a failure while working (storage, transfer), 2 bad input.
Errors are one line on stderr: `dlm: error: ...`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlmodel import Session

# typer >= 0.20 vendors click; its exceptions live here (typer re-exports only Abort and Exit).
from typer._click import exceptions as click_exc

from dlm import quick_exit, render
from dlm.server_cli import quiet_prefect, server_app, use_prefect_server
from lifecycle.catalogue import catalog, storages
from lifecycle.catalogue import ingest as ingesting
from lifecycle.catalogue.db import check_schema_known, get_engine, init_db, schema_ready, session_scope
from lifecycle.catalogue.metadata import parse_meta
from lifecycle.catalogue.models import StorageCreate
from lifecycle.errors import (
    DLMError,
    InvalidValueError,
    NotFoundError,
    UserInputError,
)
from lifecycle.names import validate_owner
from lifecycle.redact import install_log_redaction, redact
from lifecycle.settings import get_settings
from lifecycle.states import Phase, StorageKind, StorageState, Tier
from lifecycle.units import parse_duration, parse_size, parse_timestamp

app = typer.Typer(
    name="dlm",
    help="DLM: a data lifecycle manager. Knows every item and copy; replicates, migrates, expires, verifies.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
)
storage_app = typer.Typer(help="Storage volumes: add, list, show, drain, retire.", no_args_is_help=True)
items_app = typer.Typer(help="Items: list, show, set-phase, set-expiry, delete.", no_args_is_help=True)
datasets_app = typer.Typer(help="Datasets: named, saved filters.", no_args_is_help=True)
app.add_typer(storage_app, name="storage")
app.add_typer(items_app, name="items")
app.add_typer(datasets_app, name="datasets")
app.add_typer(server_app, name="server")


@app.callback()
def _options(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Also show Prefect's log lines (flow and task runs).")
    ] = False,
) -> None:
    """DLM: a data lifecycle manager. Knows every item and copy; replicates, migrates, expires, verifies."""
    quiet_prefect(verbose)


JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


@contextmanager
def catalogue() -> Iterator[Session]:
    """A session on the configured catalogue; creates the schema on first use."""
    engine = get_engine()
    if not schema_ready(engine):
        init_db()
    else:
        check_schema_known(engine)
    with session_scope() as session:
        yield session


# --------------------------------------------------------------------------- parsing helpers


def _enum(value: str, enum: type[Any], what: str) -> Any:
    for member in enum:
        if value.lower() == str(member.value).lower():
            return member
    choices = ", ".join(str(m.value) for m in enum)
    raise InvalidValueError(f"invalid {what} {value!r}: use one of {choices}")


def _fail(message: str, code: int) -> None:
    line = " ".join(redact(message).splitlines())  # one line, whatever the message held
    render.err.print(f"dlm: error: {line}", markup=False)
    raise SystemExit(code)


# --------------------------------------------------------------------------- init / status


@app.command()
def init() -> None:
    """Create or upgrade the catalogue schema."""
    rev = init_db()
    render.out.print(f"catalogue ready at {redact(get_settings().db_url)} (schema {rev})", markup=False)


@app.command()
def status(json_: JsonOpt = False) -> None:
    """Storages with used/capacity, items by state and phase, items below target."""
    with catalogue() as s:
        st = catalog.status(session=s)
    if json_:
        render.print_json(
            {
                "storages": [vars(u) for u in st.storages],
                "items_by_state": st.items_by_state,
                "items_by_phase": st.items_by_phase,
                "below_target": st.below_target,
                "bytes": st.bytes_total,
            }
        )
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


# --------------------------------------------------------------------------- storage


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
    kind_v = _enum(kind, StorageKind, "storage kind")
    if kind_v is StorageKind.MEMORY:
        raise InvalidValueError("memory storages exist for unit tests only")
    data = _validated(
        StorageCreate,
        name=name,
        kind=kind_v,
        root=root,
        endpoint=endpoint,
        region=region,
        credentials_env=credentials_env,
        capacity_bytes=parse_size(capacity) if capacity is not None else None,
        tier=_enum(tier, Tier, "tier"),
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


def _validated(model: Any, **values: Any) -> Any:
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        raise InvalidValueError(f"invalid {field}: {msg}") from None


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
        st = storages.get_storage(name, session=s)
        pub = storages.storage_public(st, session=s)
        counts = storages.storage_replica_counts(st.id, session=s)
    free = pub.capacity_bytes - pub.used_bytes if pub.capacity_bytes is not None else None
    if json_:
        render.print_json({**pub.model_dump(mode="json"), "free_bytes": free, "replicas": counts})
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
        ("free", render.size(free)),
        ("copies", ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"),
    ]
    render.table(f"Storage {pub.name}", ["field", "value"], rows)


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


# --------------------------------------------------------------------------- ingest


@app.command()
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
    phase_v = _enum(phase, Phase, "phase")
    life = parse_duration(lifetime) if lifetime is not None else None
    meta_v = parse_meta(meta, meta_json)
    who = validate_owner(owner, what="--owner") if owner is not None else catalog.current_actor()
    if from_list is not None:
        if paths or upload or name:
            raise InvalidValueError("--from-list takes no paths, --upload or --name")
        _ingest_list(storage, from_list, phase_v, life, meta_v, who, json_)
        return
    with catalogue() as s:
        st = storages.get_storage(storage, session=s)
        sources = ingesting.plan_ingest(storage=st, paths=paths or [], upload=upload, name=name, session=s)
        opts = ingesting.IngestOptions(phase=phase_v, lifetime=life, meta=meta_v, owner=who)
        with _progress(len(sources), "ingest") as advance:
            items = ingesting.ingest(
                storage=st, sources=sources, options=opts, actor=who, progress=advance, session=s
            )
        rows = [(i.name, i.version, i.size, i.checksum, str(i.oid)) for i in items]
    _announce_ready([r[4] for r in rows])
    if json_:
        render.print_json(
            [{"name": n, "version": v, "size": sz, "checksum": c, "oid": o} for n, v, sz, c, o in rows]
        )
        return
    for n, v, sz, c, _o in rows:
        render.out.print(f"READY {n} v{v} ({render.size(sz)}, {get_settings().checksum_algo} {c})")


def _ingest_list(
    storage: str, path: Path, phase: Phase, life: Any, meta: dict[str, Any], who: str, json_: bool
) -> None:
    from lifecycle.catalogue.bulk import register_from_list

    with catalogue() as s:
        st = storages.get_storage(storage, session=s)
        res = register_from_list(
            s, storage=st, source=path, phase=phase, lifetime=life, meta=meta, owner=who, actor=who
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


# --------------------------------------------------------------------------- items


def _item_row(i: Any) -> dict[str, Any]:
    return {
        "oid": str(i.oid),
        "name": i.name,
        "version": i.version,
        "size": i.size,
        "checksum": i.checksum,
        "checksum_algo": i.checksum_algo,
        "state": str(i.state),
        "target_phase": str(i.target_phase),
        "owner": i.owner,
        "created_at": i.created_at,
        "expires_at": i.expires_at,
        "metadata": i.meta,
    }


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
        items = catalog.list_items(where=where, limit=limit, session=s)
        rows = [_item_row(i) for i in items]
    if json_:
        render.print_json(rows)
        return
    render.table(
        None,
        ["name", "v", "size", "state", "phase", "owner", "created", "expires"],
        [
            (
                r["name"],
                r["version"],
                render.size(r["size"]),
                r["state"],
                r["target_phase"],
                r["owner"],
                render.when(r["created_at"]),
                render.when(r["expires_at"]),
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
        d = catalog.item_detail(ref, session=s)
        item = _item_row(d.item)
        item["parents"] = d.item.parents
        reps = [
            {
                "uid": str(r.uid),
                "storage": name,
                "path": r.path,
                "state": str(r.state),
                "expires_at": r.expires_at,
                "verified_at": r.verified_at,
            }
            for r, name in d.replicas
        ]
        evs = [{"ts": e.ts, "kind": e.kind, "actor": e.actor, "details": e.details} for e in d.events]
    if json_:
        render.print_json({**item, "replicas": reps, "events": evs})
        return
    render.table(
        f"Item {item['name']} v{item['version']}",
        ["field", "value"],
        [
            (k, json.dumps(v) if isinstance(v, dict | list) else render.when(v) if k.endswith("_at") else v)
            for k, v in item.items()
        ],
    )
    render.table(
        "Replicas",
        ["storage", "path", "state", "verified", "expires"],
        [
            (r["storage"], r["path"], r["state"], render.when(r["verified_at"]), render.when(r["expires_at"]))
            for r in reps
        ],
    )
    render.table(
        "Events",
        ["when", "event", "by", "details"],
        [(render.when(e["ts"]), e["kind"], e["actor"], json.dumps(e["details"], default=str)) for e in evs],
    )


@items_app.command("set-phase")
def items_set_phase(ref: str, phase: str) -> None:
    """Change an item's target phase (PLASMA, GAS, LIQUID, SOLID)."""
    phase_v = _enum(phase, Phase, "phase")
    with catalogue() as s:
        item = catalog.set_phase(ref, phase_v, actor=catalog.current_actor(), session=s)
        label = f"{item.name} v{item.version}"
    render.out.print(f"{label}: target phase {phase_v.value}")


@items_app.command("set-expiry")
def items_set_expiry(
    ref: str,
    lifetime: Annotated[str | None, typer.Option(help="from now, e.g. 30d")] = None,
    at: Annotated[str | None, typer.Option(help="an ISO date or time")] = None,
    never: Annotated[bool, typer.Option(help="clear the expiry")] = False,
) -> None:
    """Set when an item expires (--lifetime 30d, --at 2027-01-01, or --never)."""
    from lifecycle.catalogue.models import utcnow

    if sum(x is not None and x is not False for x in (lifetime, at, never or None)) != 1:
        raise InvalidValueError("give exactly one of --lifetime, --at or --never")
    if never:
        expires = None
    elif at is not None:
        expires = parse_timestamp(at)
    else:
        expires = utcnow() + parse_duration(lifetime or "")
    with catalogue() as s:
        item = catalog.set_expiry(ref, expires, actor=catalog.current_actor(), session=s)
        label = f"{item.name} v{item.version}"
    render.out.print(f"{label}: expires {render.when(expires) if expires else 'never'}")


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


@app.command()
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


# --------------------------------------------------------------------------- datasets


@datasets_app.command("create")
def datasets_create(
    name: str,
    where: Annotated[str, typer.Option(help="the filter that defines the members")],
    description: Annotated[str, typer.Option()] = "",
) -> None:
    """Save a named filter; its members are computed when it is read."""
    with catalogue() as s:
        catalog.create_dataset(name, where, description=description, owner=catalog.current_actor(), session=s)
    render.out.print(f"dataset {name} created")


@datasets_app.command("list")
def datasets_list(json_: JsonOpt = False) -> None:
    """All datasets."""
    with catalogue() as s:
        rows = [
            {
                "name": d.name,
                "where": d.where,
                "description": d.description,
                "owner": d.owner,
                "created_at": d.created_at,
            }
            for d in catalog.list_datasets(session=s)
        ]
    if json_:
        render.print_json(rows)
        return
    render.table(
        None,
        ["name", "where", "description", "owner"],
        [(r["name"], r["where"], r["description"], r["owner"]) for r in rows],
    )


@datasets_app.command("show")
def datasets_show(
    name: str, limit: Annotated[int, typer.Option(min=1)] = 1000, json_: JsonOpt = False
) -> None:
    """A dataset and its current members."""
    with catalogue() as s:
        ds = catalog.get_dataset(name, session=s)
        members = [_item_row(i) for i in catalog.list_items(where=ds.where, limit=limit, session=s)]
        where = ds.where
    if json_:
        render.print_json({"name": name, "where": where, "members": members})
        return
    render.out.print(f"dataset {name}: {where}")
    render.table(
        None,
        ["name", "v", "size", "state", "phase"],
        [(m["name"], m["version"], render.size(m["size"]), m["state"], m["target_phase"]) for m in members],
    )
    render.err.print(f"{len(members)} members")


@datasets_app.command("delete")
def datasets_delete(name: str) -> None:
    """Forget a dataset (its items stay)."""
    with catalogue() as s:
        catalog.delete_dataset(name, actor=catalog.current_actor(), session=s)
    render.out.print(f"dataset {name} deleted")


# --------------------------------------------------------------------------- pipelines

PIPELINE_NAMES = ("replicate", "migrate", "expire", "rebalance", "verify", "reconcile")


@app.command()
def run(
    pipeline: Annotated[
        str, typer.Argument(help="replicate, migrate, expire, rebalance, verify or reconcile")
    ],
    dry_run: Annotated[bool, typer.Option(help="print the plan and change nothing")] = False,
    storage: Annotated[
        str | None, typer.Option(help="verify: only this storage; reconcile: the storage (required)")
    ] = None,
    budget: Annotated[str | None, typer.Option(help="verify: bytes to re-read, e.g. 10GiB")] = None,
    adopt: Annotated[bool, typer.Option(help="reconcile: register unknown objects as items")] = False,
    json_: JsonOpt = False,
) -> None:
    """Run one pipeline now (plan, then apply in batches) and print what it did."""
    if pipeline not in PIPELINE_NAMES:
        raise InvalidValueError(f"unknown pipeline {pipeline!r}: use one of {', '.join(PIPELINE_NAMES)}")
    if pipeline not in ("verify", "reconcile") and (storage or budget or adopt):
        raise InvalidValueError("--storage, --budget and --adopt apply to verify and reconcile only")
    if budget is not None:
        parse_size(budget)
    with catalogue() as s:
        if storage:
            storages.get_storage(storage, session=s)
    if not dry_run or pipeline in ("verify", "reconcile"):
        _use_running_server()  # (a planner's dry run runs no flow: see below)
    if pipeline == "verify":
        from flows.integrity import verify

        report = verify(storage=storage, budget=budget, dry_run=dry_run)
        failed = bool(report.get("repair_failed") or report.get("unreadable"))
    elif pipeline == "reconcile":
        if not storage:
            raise InvalidValueError("reconcile needs --storage NAME")
        from flows.integrity import reconcile

        report = reconcile(storage=storage, adopt=adopt, dry_run=dry_run)
        failed = bool(report.get("repair_failed"))
    elif dry_run:  # the plan, without importing Prefect or starting a flow run
        from flows.plan_report import dry_run_report

        report = dry_run_report(pipeline)
        failed = False
    else:
        from flows.pipelines import FLOWS

        report = FLOWS[pipeline](dry_run=dry_run)
        failed = bool(report.get("failed"))
    if json_:
        render.print_json(report)
    elif pipeline in ("verify", "reconcile"):
        render_integrity(pipeline, report)
    else:
        render_report(report)
    if failed:
        raise SystemExit(1)  # some transfers, deletions or reads failed: the next run retries them


def _use_running_server() -> None:
    """Run flows on the long-lived Prefect server: PREFECT_API_URL's, a running `dlm serve`'s,
    or this DLM home's own (started in the background on first use; `dlm server`)."""
    use_prefect_server()


def render_integrity(pipeline: str, report: dict[str, Any]) -> None:
    """Counters, batches, repairs and unknown objects of a verify or reconcile run."""
    skip = {"batches", "repairs", "unknown_objects", "temporary_objects", "pipeline", "dry_run"}
    counters = {k: v for k, v in report.items() if k not in skip and isinstance(v, int | float | str | bool)}
    title = pipeline + (" (dry run: nothing changed)" if report.get("dry_run") else "")
    render.out.print(f"[bold]{title}[/]: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    for key, heading in (
        ("batches", "Batches"),
        ("repairs", "Repairs"),
        ("unknown_objects", "Unknown objects"),
        ("temporary_objects", "Temporary files (left by interrupted writes)"),
    ):
        rows = report.get(key) or []
        if rows and isinstance(rows[0], dict):
            render.table(heading, list(rows[0]), [tuple(r.values()) for r in rows])


def render_report(report: dict[str, Any]) -> None:
    p = report["plan"]
    title = f"{report['pipeline']}" + (" (dry run: nothing changed)" if report["dry_run"] else "")
    render.out.print(
        f"[bold]{title}[/]: planned {p['copies']} copies ({render.size(p['copy_bytes'])}), "
        f"{p['deletes']} deletions, {p['expired_items']} item expiries, {p['phase_changes']} phase changes, "
        f"{p['refusals']} refused, {p['shortfalls']} shortfalls"
        + (f", {p['drained']} storages drained (can be retired)" if p.get("drained") else "")
    )
    if report["dry_run"]:
        render.table(
            "Plan",
            ["action", "item", "from", "to", "path", "bytes", "reason"],
            [
                (a["action"], a["item"][:8], a["from"], a["to"], a["path"], a["bytes"], a["reason"])
                for a in report["actions"]
            ],
        )
        return
    if report["batches"]:
        # copy and delete rows carry different stage columns: one column per key, the error last
        keys = [k for k in dict.fromkeys(k for b in report["batches"] for k in b) if k != "first error"]
        keys.append("first error")
        render.table("Batches", keys, [tuple(b.get(k, "") for k in keys) for b in report["batches"]])
    render.out.print(
        f"copied {report['copied']} ({render.size(report['bytes_moved'])}), deleted {report['deleted']}, "
        f"failed {report['failed']}; items below target now: {report['below_target_after']}"
    )


@app.command()
def checkout(
    args: Annotated[list[str], typer.Argument(help="NAME... DEST (a directory or REMOTE:PATH)")],
    dataset: Annotated[str | None, typer.Option(help="check out a dataset's members")] = None,
    json_: JsonOpt = False,
) -> None:
    """Copy items (or a dataset) to a local directory or an rclone remote, verified by checksum."""
    from flows.checkout import checkout_now

    *refs, dest = args
    with catalogue():
        pass
    use_prefect_server(start=False)  # checkout runs no flow (yet): a server only if one runs
    result = checkout_now(refs or None, dataset, dest, catalog.current_actor())
    if json_:
        render.print_json(result)
    else:
        render.out.print(
            f"checked out {result['files']} files ({render.size(result['bytes'])}) to {dest} "
            f"with {result['rclone_processes']} rclone calls"
        )
        for name, err in result["failed"].items():
            render.err.print(f"failed: {name}: {err}", markup=False)
    if result["failed"]:
        raise SystemExit(1)


@app.command()
def serve(
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="port of this DLM home's Prefect server if it starts")
    ] = None,
    no_server: Annotated[
        bool, typer.Option("--no-server", help="use the Prefect server PREFECT_API_URL names (required)")
    ] = False,
) -> None:
    """Serve the pipelines on their schedules and on item-ready events, on this DLM home's
    Prefect server (started if needed; it keeps running afterwards) or PREFECT_API_URL's."""
    from deployments.server import announced, serve_server

    with catalogue():
        pass
    settings = get_settings()
    try:
        url, started = serve_server(settings.home, port, configured_only=no_server)
        with announced(url, settings.home):
            from deployments.serve import build_deployments, describe, serve_all

            deployments = build_deployments(settings)
            how = "started" if started else "running"
            render.out.print(
                f"Prefect UI: {url.removesuffix('/api')}  (API {url}, server {how})", markup=False
            )
            render.table(
                "Served deployments",
                ["deployment", "runs"],
                [(f"{d.flow_name}/{d.name}", describe(d)) for d in deployments],
            )
            render.out.print("Ctrl-C stops serving (the Prefect server keeps running).", markup=False)
            serve_all(deployments)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM before serving began
        pass
    render.out.print("dlm serve stopped", markup=False)


# --------------------------------------------------------------------------- demo


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="keep the demo's files here (default: a temp dir)")
    ] = None,
) -> None:
    """The whole lifecycle on the embedded default: SQLite, two posix volumes and a local S3."""
    from dlm.demo import run_demo

    run_demo(workdir, app=app)


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; DLM errors and usage errors become one line on stderr and an exit code."""
    if argv is None:  # the `dlm` process itself, not a caller in-process: skip the slow teardown
        with quick_exit.armed():
            _main(argv)
    else:
        _main(argv)


def _main(argv: list[str] | None) -> None:
    install_log_redaction()
    try:
        result = app(args=argv, standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:
        render.err.print(exc.format_message(), markup=False)
        raise SystemExit(2) from None
    except typer.Abort:
        _fail("aborted", 130)
    except click_exc.UsageError as exc:
        _fail(exc.format_message().replace("\n", " "), 2)
    except click_exc.ClickException as exc:
        _fail(exc.format_message().replace("\n", " "), exc.exit_code or 1)
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except (UserInputError, NotFoundError) as exc:
        _fail(str(exc), 2)
    except DLMError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except PermissionError as exc:  # the last net for a file the core did not expect to be closed to it
        _fail(f"cannot access {exc.filename!r}: {exc.strerror}", 1)
    except Exception as exc:
        if os.environ.get("DLM_DEBUG"):
            raise
        if isinstance(exc, RuntimeError) and "Prefect API server" in str(exc):
            # Prefect could not reach (or start) its API server.
            _fail(
                f"{exc} (start this DLM home's Prefect server with `dlm server start`, "
                "or set PREFECT_API_URL to a running server, and retry)",
                1,
            )
        _fail(f"internal error: {type(exc).__name__}: {exc} (set DLM_DEBUG=1 for the traceback)", 70)
    if isinstance(result, int) and result:
        raise SystemExit(result)


if __name__ == "__main__":
    main()
