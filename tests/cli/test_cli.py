"""The `dlm` CLI end to end on SQLite and PostgreSQL: storages, ingest, query, datasets, status."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lifecycle.catalogue.catalog import table_counts
from lifecycle.catalogue.db import session_scope


def _counts(url: str) -> dict[str, int]:
    with session_scope(url) as s:
        return dict(table_counts(session=s))


@pytest.fixture
def estate(dlm, db_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Two posix storages and a few local files."""
    for name, tier, loc in (("disk-a", "hot", "site-a"), ("disk-b", "cold", "site-b")):
        (tmp_path / name).mkdir()
        r = dlm(
            "storage",
            "add",
            name,
            "--kind",
            "posix",
            "--root",
            str(tmp_path / name),
            "--tier",
            tier,
            "--location",
            loc,
            "--capacity",
            "1GiB",
        )
        assert r.code == 0, r.err
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.dat").write_bytes(bytes([i]) * (1000 * (i + 1)))
    return tmp_path


def test_storage_add_list_show(dlm, estate: Path) -> None:
    r = dlm("storage", "list", "--json")
    rows = json.loads(r.out)
    assert [(x["name"], x["tier"], x["location"]) for x in rows] == [
        ("disk-a", "hot", "site-a"),
        ("disk-b", "cold", "site-b"),
    ]
    r = dlm("storage", "show", "disk-a", "--json")
    shown = json.loads(r.out)
    assert shown["capacity_bytes"] == 1024**3 and shown["free_bytes"] == 1024**3
    r = dlm("storage", "show", "disk-a")
    assert "1.0 GiB" in r.out and "site-a" in r.out


def test_upload_registers_ready_item_with_checksum_and_events(dlm, estate: Path, db_url: str) -> None:
    f = estate / "src" / "f1.dat"
    r = dlm(
        "ingest",
        "--storage",
        "disk-a",
        "--upload",
        str(f),
        "--name",
        "run/f1.dat",
        "--meta",
        "kind=raw",
        "--meta",
        "exposure=30",
        "--phase",
        "LIQUID",
        "--lifetime",
        "30d",
        "--json",
    )
    assert r.code == 0, r.err
    [row] = json.loads(r.out)
    assert row["checksum"] == hashlib.md5(f.read_bytes()).hexdigest()
    assert (estate / "disk-a" / "run" / "f1.dat").read_bytes() == f.read_bytes()
    shown = json.loads(dlm("items", "show", "run/f1.dat", "--json").out)
    assert shown["state"] == "READY" and shown["target_phase"] == "LIQUID"
    assert shown["metadata"] == {"kind": "raw", "exposure": 30}
    assert shown["expires_at"] is not None
    assert [(x["storage"], x["path"], x["state"]) for x in shown["replicas"]] == [
        ("disk-a", "run/f1.dat", "READY")
    ]
    assert [e["kind"] for e in shown["events"]] == ["replica.created", "item.ready"]
    assert all(e["actor"] == "tester" for e in shown["events"])
    st = json.loads(dlm("storage", "show", "disk-a", "--json").out)
    assert st["used_bytes"] == 2000


def test_reingest_same_name_makes_new_version_and_keeps_old(dlm, estate: Path) -> None:
    f = estate / "src" / "f0.dat"
    assert dlm("ingest", "-s", "disk-a", "--upload", str(f), "--name", "x.dat").code == 0
    f.write_bytes(b"changed")
    assert dlm("ingest", "-s", "disk-a", "--upload", str(f), "--name", "x.dat").code == 0
    items = json.loads(dlm("items", "list", "--where", "name = 'x.dat'", "--json").out)
    assert [(i["version"], i["size"]) for i in items] == [(1, 1000), (2, 7)]
    assert (estate / "disk-a" / "x.dat").read_bytes() == b"\x00" * 1000  # v1 untouched
    assert (estate / "disk-a" / "x.dat~v2").read_bytes() == b"changed"
    v1 = json.loads(dlm("items", "show", "x.dat@v1", "--json").out)
    assert v1["size"] == 1000


def test_register_in_place_and_refuse_second_registration(dlm, estate: Path, db_url: str) -> None:
    p = estate / "disk-b" / "obs" / "a.fits"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"A" * 4096)
    r = dlm("ingest", "--storage", "disk-b", str(p), "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)[0]["name"] == "obs/a.fits"
    r = dlm("ingest", "--storage", "disk-b", "obs/a.fits")  # relative to the root
    assert r.code != 0
    assert "already registered" in r.err and r.err.count("\n") == 1


def test_query_and_datasets(dlm, estate: Path) -> None:
    for i, kind in enumerate(["raw", "raw", "cal"]):
        r = dlm(
            "ingest",
            "-s",
            "disk-a",
            "--upload",
            str(estate / "src" / f"f{i}.dat"),
            "--name",
            f"run/f{i}.dat",
            "--meta",
            f"kind={kind}",
            "--meta",
            f"n={i}",
        )
        assert r.code == 0, r.err
    names = lambda r: [i["name"] for i in json.loads(r.out)]  # noqa: E731
    assert names(dlm("items", "list", "--where", "meta.kind = 'raw' and size > 1500", "--json")) == [
        "run/f1.dat"
    ]
    assert names(dlm("items", "list", "--where", "meta.n >= 1", "--json")) == ["run/f1.dat", "run/f2.dat"]
    assert names(dlm("items", "list", "--where", "storage = 'disk-b'", "--json")) == []
    assert dlm("datasets", "create", "raw", "--where", "meta.kind = 'raw'").code == 0
    shown = json.loads(dlm("datasets", "show", "raw", "--json").out)
    assert [m["name"] for m in shown["members"]] == ["run/f0.dat", "run/f1.dat"]
    # members are computed when read
    dlm(
        "ingest",
        "-s",
        "disk-b",
        "--upload",
        str(estate / "src" / "f2.dat"),
        "--name",
        "late.dat",
        "--meta",
        "kind=raw",
    )
    shown = json.loads(dlm("datasets", "show", "raw", "--json").out)
    assert "late.dat" in [m["name"] for m in shown["members"]]


def test_status_counts_items_below_target(dlm, estate: Path) -> None:
    dlm(
        "ingest",
        "-s",
        "disk-a",
        "--upload",
        str(estate / "src" / "f0.dat"),
        "--name",
        "a",
        "--phase",
        "SOLID",
    )
    dlm("ingest", "-s", "disk-a", "--upload", str(estate / "src" / "f1.dat"), "--name", "b")
    st = json.loads(dlm("status", "--json").out)
    assert st["below_target"] == 1
    assert st["items_by_state"] == {"READY": 2}
    assert st["items_by_phase"] == {"GAS": 1, "SOLID": 1}
    assert {s["name"]: s["used_bytes"] for s in st["storages"]} == {"disk-a": 3000, "disk-b": 0}
    human = dlm("status").out
    assert "items below their target phase: 1" in human


def test_set_phase_and_expiry(dlm, estate: Path) -> None:
    dlm("ingest", "-s", "disk-a", "--upload", str(estate / "src" / "f0.dat"), "--name", "a")
    assert dlm("items", "set-phase", "a", "solid").code == 0
    assert dlm("items", "set-expiry", "a", "--at", "2030-01-01").code == 0
    shown = json.loads(dlm("items", "show", "a", "--json").out)
    assert shown["target_phase"] == "SOLID"
    assert shown["expires_at"].startswith("2030-01-01")
    assert [e["kind"] for e in shown["events"]][-2:] == ["item.phase_changed", "item.expiry_changed"]


def test_delete_item_leaves_tombstone_and_url(dlm, estate: Path) -> None:
    import urllib.request

    dlm("ingest", "-s", "disk-a", "--upload", str(estate / "src" / "f1.dat"), "--name", "gone.dat")
    link = dlm("url", "gone.dat").out.strip()
    assert link.startswith("file://")
    with urllib.request.urlopen(link) as f:
        assert f.read() == (estate / "src" / "f1.dat").read_bytes()
    r = dlm("items", "delete", "gone.dat", "--yes")
    assert r.code == 0, r.err
    assert "deleted 1 copies" in r.out
    assert not (estate / "disk-a" / "gone.dat").exists()
    shown = json.loads(dlm("items", "show", "gone.dat", "--json").out)
    assert shown["state"] == "DELETED"
    assert [x["state"] for x in shown["replicas"]] == ["DELETED"]
    assert {"item.expired", "replica.deleted", "item.deleted"} <= {e["kind"] for e in shown["events"]}
    assert json.loads(dlm("storage", "show", "disk-a", "--json").out)["used_bytes"] == 0
    again = dlm("items", "delete", "gone.dat", "--yes")
    assert again.code != 0 and "already deleted" in again.err


# --------------------------------------------------------------------------- bad input


BAD = [
    (["ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--name", "../escape"], "invalid item name"),
    (["ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--name", "/abs/name"], "absolute"),
    (["ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--name", "a\x00b"], "control"),
    (["ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--name", "a\nb"], "control"),
    (["ingest", "-s", "nope", "--upload", "{src}/f0.dat"], "unknown storage 'nope'"),
    (["ingest", "-s", "disk-a", "--upload", "{src}/missing.dat"], "no such file"),
    (["ingest", "-s", "disk-a", "{tmp}/outside.dat"], "outside"),
    (["ingest", "-s", "disk-a", "{tmp}/disk-a/../src/f0.dat"], "outside"),
    (["ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--meta", "novalue"], "invalid --meta"),
    (
        ["ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--meta-json", "{tmp}/bad.json"],
        "not valid JSON",
    ),
    (["ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--meta-json", "{tmp}/list.json"], "JSON object"),
    (["ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--phase", "PLASMAX"], "invalid phase"),
    (["ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--lifetime", "-3d"], "invalid lifetime"),
    (["ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--lifetime", "0d"], "greater than zero"),
    (["ingest", "-s", "disk-a", "--upload", "{src}/f0.dat", "--lifetime", "99999999999y"], "1000 years"),
    (["items", "list", "--where", "name = 'x' or 1=1; drop table item"], "invalid filter"),
    (["items", "list", "--where", "(name = 'x'"], "invalid filter"),
    (["items", "list", "--where", "colour = 'red'"], "unknown field"),
    (["storage", "add", "disk-a", "--kind", "posix", "--root", "{tmp}/disk-a"], "already exists"),
    (["storage", "add", "new", "--kind", "posix", "--root", "{tmp}/does-not-exist"], "new"),
    (["storage", "add", "Bad Name", "--kind", "posix", "--root", "{tmp}"], "invalid storage name"),
    (["storage", "add", "x", "--kind", "ftp", "--root", "{tmp}"], "invalid storage kind"),
    (["storage", "add", "x", "--kind", "posix", "--root", "{tmp}", "--capacity", "lots"], "invalid size"),
    (["storage", "add", "x", "--kind", "posix", "--root", "{tmp}", "--tier", "lukewarm"], "invalid tier"),
    (["items", "show", "nothing-here"], "no item"),
    (["items", "set-phase", "nothing-here", "GAS"], "no item"),
    (["datasets", "create", "d", "--where", "size >"], "invalid filter"),
    (["datasets", "show", "nope"], "unknown dataset"),
    (["items", "delete", "existing"], "--yes"),
    (["url", "nothing-here"], "no item"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_one_line_nonzero_nothing_changed(dlm, estate: Path, db_url: str, argv, message) -> None:
    (estate / "bad.json").write_text("{not json")
    (estate / "list.json").write_text("[1, 2]")
    (estate / "outside.dat").write_bytes(b"x")
    dlm("ingest", "-s", "disk-a", "--upload", str(estate / "src" / "f2.dat"), "--name", "existing")
    before = _counts(db_url)
    args = [a.format(src=estate / "src", tmp=estate) for a in argv]
    r = dlm(*args)
    assert r.code != 0
    assert r.err.startswith("dlm: error: "), r.err
    assert r.err.count("\n") == 1, r.err
    assert "Traceback" not in r.err
    assert message.lower() in r.err.lower(), r.err
    assert _counts(db_url) == before
    # the storage's marker and the one file, nothing else
    assert sorted(p.name for p in (estate / "disk-a").iterdir()) == [".dlm-storage", "existing"]


@pytest.mark.parametrize("name", ["mk/a[/x]b.dat", "mk/[red]x.dat"])
def test_a_name_with_brackets_is_printed_as_it_is(dlm, estate: Path, name: str) -> None:
    """Square brackets are allowed in names; the CLI printed them as rich markup, so '[/x]' made
    ingest, set-phase, set-expiry and delete end in an internal error (exit 70) after their change
    was made, and '[red]x.dat' was shown as 'x.dat', an item that does not exist."""
    f = estate / "src" / "f0.dat"
    r = dlm("ingest", "-s", "disk-a", "--upload", str(f), "--name", name)
    assert r.code == 0 and f"READY {name} v1" in r.out, r
    r = dlm("items", "set-phase", name, "LIQUID")
    assert (r.code, r.out.strip()) == (0, f"{name} v1: target phase LIQUID"), r
    r = dlm("items", "set-expiry", name, "--lifetime", "9d")
    assert r.code == 0 and r.out.startswith(f"{name} v1: expires "), r
    r = dlm("items", "list", "--where", "name ~ 'mk/*'")
    assert r.code == 0 and name in r.out, r
    r = dlm("items", "show", name)
    assert r.code == 0 and f"Item {name} v1" in r.out, r
    r = dlm("items", "delete", name, "--yes")
    assert (r.code, r.out.strip()) == (0, f"{name} v1: deleted 1 copies"), r
    assert not (estate / "disk-a" / name).exists()
