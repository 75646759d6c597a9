"""No links, no escape: symbolic links below a storage root are never followed, on real posix
directories, the real rclone binary, SeaweedFS, and SQLite and PostgreSQL catalogues.

Each test plants links the way a careless or hostile user would and then reads the BYTES:
files outside the roots keep their content (a digest of the whole outside tree, before and
after), link targets are neither read, rewritten nor deleted, and the real copies keep theirs.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlmodel import col

from devrig.seaweed import SeaweedServer
from lifecycle import links as links_mod
from lifecycle.catalogue.catalog import get_item
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.ingest import IngestOptions, ingest, plan_ingest
from lifecycle.catalogue.models import Event, Item, Replica, Storage, StorageCreate, Transfer, utcnow
from lifecycle.catalogue.storages import add_storage, get_storage
from lifecycle.errors import InvalidNameError
from lifecycle.states import Phase, StorageKind
from lifecycle.storage.posix import PosixStorage
from lifecycle.storage.s3 import S3Storage
from lifecycle.transfer.operations import copy_files, delete_files, hashsum, lsjson, move_files, refused_paths
from tests.cli.conftest import dlm  # noqa: F401  (the in-process CLI fixture)

# --------------------------------------------------------------------------- helpers


def tree_digest(top: Path) -> dict[str, tuple[str, str]]:
    """Every entry under `top` without following links: path -> (kind, sha256 or link text)."""
    out: dict[str, tuple[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(top))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", "")
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside every root holding a user's files (the sentinel)."""
    top = tmp_path / "outside"
    (top / "deep").mkdir(parents=True)
    (top / "f0.dat").write_bytes(b"the user's own f0, not DLM's\n")
    (top / "o.dat").write_bytes(b"private\n")
    (top / "deep" / "key.pem").write_bytes(b"secret key\n")
    return top


# --------------------------------------------------------------------------- the guard


def test_guard_refuses_links_anywhere_in_a_path_and_costs_one_lstat_per_file(
    tmp_path: Path, outside: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    for d in range(10):
        (root / f"d{d}").mkdir(parents=True)
    (root / "real.dat").write_bytes(b"real")
    (root / "link.dat").symlink_to("real.dat")
    (root / "run").symlink_to(outside, target_is_directory=True)
    (root / "d3" / "in").symlink_to(root / "d4", target_is_directory=True)
    calls: list[str] = []
    real_lstat = os.lstat

    def counting(path: Any) -> os.stat_result:
        calls.append(str(path))
        return real_lstat(path)

    monkeypatch.setattr(links_mod.os, "lstat", counting)
    paths = [f"d{i % 10}/f{i}.dat" for i in range(2000)]
    refused = links_mod.refused_paths(
        root, [*paths, "real.dat", "link.dat", "run/f0.dat", "d3/in/x.dat", "new/dir/x.dat", "../x", "/etc/x"]
    )

    assert refused == {
        "link.dat": "is a symbolic link",
        "run/f0.dat": "goes through a symbolic link ('run')",
        "d3/in/x.dat": "goes through a symbolic link ('d3/in')",
        "../x": "is not a plain path inside the root",
        "/etc/x": "is not a plain path inside the root",
    }
    assert len(calls) < 2000 + 50  # one lstat per file, each directory once


# --------------------------------------------------------------------------- posix backend


def test_posix_backend_never_reads_writes_or_deletes_through_a_link(tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "a"
    (root / "data").mkdir(parents=True)
    (root / "real.dat").write_bytes(b"REAL.DAT")
    (root / "data" / "x.dat").write_bytes(b"x")
    (root / "link.dat").symlink_to("real.dat")  # a link to a file inside the root
    (root / "alias").symlink_to(root / "data", target_is_directory=True)  # a dir link inside
    (root / "run").symlink_to(outside, target_is_directory=True)  # a dir link leading out
    before = tree_digest(outside)
    disk = PosixStorage("disk-a", root)

    for path in ("link.dat", "alias/x.dat", "run/f0.dat"):
        for op in (disk.stat, disk.open, disk.url, disk.delete, lambda p: disk.checksum(p, "md5")):
            with pytest.raises(InvalidNameError, match="symbolic link"):
                op(path)
    with pytest.raises(InvalidNameError, match="goes through a symbolic link"):
        disk.resolve("alias/x.dat")
    with pytest.raises(InvalidNameError, match=r"link\.dat.* is a symbolic link"):
        disk.resolve(str(root / "link.dat"))  # not silently registered as real.dat
    with pytest.raises(InvalidNameError, match="leads outside storage 'disk-a'"):
        disk.resolve(str(root / "run" / "f0.dat"))
    alias_out = tmp_path / "alias-into-data"
    alias_out.symlink_to(root / "data", target_is_directory=True)  # a link elsewhere into the root
    with pytest.raises(InvalidNameError, match="goes through one, into storage"):
        disk.resolve(str(alias_out / "x.dat"))

    assert sorted(o.path for o in disk.list()) == ["data/x.dat", "real.dat"]  # links left out
    assert disk.resolve(str(root / "real.dat")) == "real.dat"
    assert disk.checksum("real.dat", "md5") == hashlib.md5(b"REAL.DAT").hexdigest()
    assert os.path.islink(root / "link.dat") and (root / "real.dat").read_bytes() == b"REAL.DAT"
    assert tree_digest(outside) == before


def test_a_symlinked_root_is_the_root(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "x.dat").write_bytes(b"x")
    (tmp_path / "via").symlink_to(real, target_is_directory=True)
    disk = PosixStorage("vol", tmp_path / "via")
    assert disk.resolve(str(tmp_path / "via" / "x.dat")) == "x.dat"
    assert disk.resolve(str(real / "x.dat")) == "x.dat"
    assert disk.stat("x.dat").size == 1
    assert refused_paths(disk.rclone_target(), ["x.dat"]) == {}


# --------------------------------------------------------------------------- rclone


@pytest.fixture
def disks(tmp_path: Path, outside: Path) -> tuple[PosixStorage, PosixStorage]:
    """disk-a with real files, a file link and a dir link out; disk-b whose `run` leads out."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a / "run", a / "other", b):
        d.mkdir(parents=True)
    (a / "run" / "f0.dat").write_bytes(b"DLM's f0 bytes\n")
    (a / "other" / "f1.dat").write_bytes(b"DLM's f1 bytes\n")
    (a / "real.dat").write_bytes(b"REAL.DAT")  # 8 bytes, as long as the link's text
    (a / "link.dat").symlink_to("real.dat")
    (a / "dirlink").symlink_to(outside, target_is_directory=True)
    (b / "run").symlink_to(outside, target_is_directory=True)
    return PosixStorage("disk-a", a), PosixStorage("disk-b", b)


def test_rclone_copy_never_writes_through_a_linked_destination_directory(
    rclone_path: str, disks: tuple[PosixStorage, PosixStorage], outside: Path
) -> None:
    """Reproduction 7, at the rclone layer: `run` on disk-b is a link to a directory outside."""
    a, b = disks
    before = tree_digest(outside)

    report = copy_files(a.rclone_target(), b.rclone_target(), ["run/f0.dat", "other/f1.dat"])

    assert report.ok == {"other/f1.dat"}  # the rest of the batch proceeds
    assert "goes through a symbolic link ('run')" in report.failed["run/f0.dat"]
    assert report.failed["run/f0.dat"].startswith("destination")
    assert tree_digest(outside) == before  # f0.dat was not written over the user's file
    assert (b.root / "other" / "f1.dat").read_bytes() == b"DLM's f1 bytes\n"

    moved = move_files(a.rclone_target(), b.rclone_target(), ["run/f0.dat"])
    assert moved.ok == set() and "symbolic link" in moved.failed["run/f0.dat"]
    assert (a.root / "run" / "f0.dat").read_bytes() == b"DLM's f0 bytes\n"  # the source stays
    assert tree_digest(outside) == before


def test_rclone_copy_never_reads_through_a_source_link(
    rclone_path: str, disks: tuple[PosixStorage, PosixStorage], outside: Path
) -> None:
    a, b = disks
    report = copy_files(a.rclone_target(), b.rclone_target(), ["link.dat", "dirlink/o.dat", "real.dat"])

    assert report.ok == {"real.dat"}
    assert report.failed["link.dat"].startswith("source 'link.dat' is a symbolic link")
    assert "goes through a symbolic link ('dirlink')" in report.failed["dirlink/o.dat"]
    assert sorted(os.listdir(b.root)) == ["real.dat", "run"]  # nothing read through a link landed


def test_rclone_delete_never_deletes_through_a_link(
    rclone_path: str, disks: tuple[PosixStorage, PosixStorage], outside: Path
) -> None:
    """Reproduction 7, the expire half: deleting `run/f0.dat` on disk-b must not delete the
    user's outside/f0.dat."""
    a, b = disks
    (b.root / "plain.dat").write_bytes(b"p")
    before = tree_digest(outside)

    report = delete_files(b.rclone_target(), ["run/f0.dat", "plain.dat"])
    on_a = delete_files(a.rclone_target(), ["link.dat", "dirlink/o.dat"])

    assert report.ok == {"plain.dat"} and not (b.root / "plain.dat").exists()
    assert "goes through a symbolic link ('run')" in report.failed["run/f0.dat"]
    assert set(on_a.failed) == {"link.dat", "dirlink/o.dat"} and on_a.ok == set()
    assert tree_digest(outside) == before
    assert os.path.islink(a.root / "link.dat") and (a.root / "real.dat").read_bytes() == b"REAL.DAT"


def test_rclone_hashes_and_listings_never_follow_links_whatever_the_user_configures(
    rclone_path: str,
    disks: tuple[PosixStorage, PosixStorage],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, _ = disks
    (a.root / "other" / "nested").symlink_to("../real.dat")
    conf = tmp_path / "rclone.conf"
    conf.write_text("[local]\ntype = local\ncopy_links = true\n")
    monkeypatch.setenv("RCLONE_CONFIG", str(conf))  # a user config that follows links...
    monkeypatch.setenv("RCLONE_COPY_LINKS", "true")  # ...and the same in the environment
    monkeypatch.setenv("RCLONE_LOCAL_COPY_LINKS", "true")
    monkeypatch.setenv("RCLONE_SKIP_LINKS", "true")

    found = hashsum(a.rclone_target(), ["real.dat", "link.dat", "dirlink/o.dat"], "md5", download=True)
    skipped: list[str] = []
    listed = [o.path for o in lsjson(a.rclone_target(), links=skipped)]

    assert found == {"real.dat": hashlib.md5(b"REAL.DAT").hexdigest()}
    assert sorted(listed) == ["other/f1.dat", "real.dat", "run/f0.dat"]
    assert sorted(skipped) == ["dirlink", "link.dat", "other/nested"]
    assert refused_paths(a.rclone_target(), ["link.dat", "real.dat"]) == {
        "link.dat": f"'link.dat' is a symbolic link on {a.root} (DLM never follows links)"
    }


@pytest.mark.s3
def test_s3_copies_neither_read_a_posix_link_nor_land_through_one(
    rclone_path: str,
    disks: tuple[PosixStorage, PosixStorage],
    s3_env: SeaweedServer,
    s3_bucket: str,
    outside: Path,
) -> None:
    a, b = disks
    before = tree_digest(outside)
    s3 = S3Storage("obj", f"{s3_bucket}/copies", endpoint=s3_env.endpoint)
    try:
        files = ["link.dat", "dirlink/o.dat", "real.dat"]
        up = copy_files(a.rclone_target(), s3.rclone_target(), files)
        keys = sorted(o.path for o in s3.list())
        s3.put("run/f0.dat", io.BytesIO(b"f0 from the object store\n"))
        down = copy_files(s3.rclone_target(), b.rclone_target(), ["run/f0.dat", "real.dat"])
    finally:
        s3.close()

    assert up.ok == {"real.dat"} and set(up.failed) == {"link.dat", "dirlink/o.dat"}
    assert keys == ["real.dat"]  # no object holds bytes read through a link
    assert down.ok == {"real.dat"} and "goes through a symbolic link ('run')" in down.failed["run/f0.dat"]
    assert (b.root / "real.dat").read_bytes() == b"REAL.DAT"
    assert tree_digest(outside) == before


# --------------------------------------------------------------------------- catalogue helpers


def add_posix(name: str, root: Path, location: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with session_scope() as s:
        add_storage(
            StorageCreate(name=name, kind=StorageKind.POSIX, root=str(root), location=location), session=s
        )


def ingest_in_place(storage: str, paths: list[str], phase: Phase) -> None:
    with session_scope() as s:
        st = get_storage(storage, session=s)
        sources = plan_ingest(storage=st, paths=paths, upload=False, session=s)
        ingest(storage=st, sources=sources, options=IngestOptions(phase=phase), session=s)


def copies(name: str) -> dict[str, str]:
    """storage name -> state of NAME's copies that are not DELETED."""
    with session_scope() as s:
        item = get_item(name, session=s)
        rows = s.execute(
            select(col(Storage.name), col(Replica.state))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(col(Replica.item_oid) == item.oid, col(Replica.state) != "DELETED")
        ).all()
    return {n: str(st) for n, st in rows}


def events(kind: str) -> list[dict[str, Any]]:
    with session_scope() as s:
        return [
            e.details for e in s.scalars(select(Event).where(col(Event.kind) == kind).order_by(col(Event.id)))
        ]


def item_state(name: str) -> str:
    with session_scope() as s:
        return str(get_item(name, session=s).state)


# --------------------------------------------------------------------------- ingest (CLI)


def test_ingest_in_place_refuses_a_symlink_inside_the_root(dlm, db_url: str, tmp_path: Path) -> None:  # noqa: F811
    """Reproduction 3: `ln -s real.dat $R/a/link.dat` and ingesting both gave two items on one file."""
    a = tmp_path / "a"
    (a / "data").mkdir(parents=True)
    (a / "real.dat").write_bytes(b"the real bytes\n")
    (a / "data" / "x.dat").write_bytes(b"x\n")
    (a / "link.dat").symlink_to("real.dat")
    (a / "alias").symlink_to(a / "data", target_is_directory=True)
    assert dlm("storage", "add", "disk-a", "--kind", "posix", "--root", str(a)).code == 0

    both = dlm("ingest", "-s", "disk-a", str(a / "real.dat"), str(a / "link.dat"))
    through_dir = dlm("ingest", "-s", "disk-a", "alias/x.dat")

    assert both.code == 2 and through_dir.code == 2
    assert both.err.strip().startswith("dlm: error: ") and len(both.err.strip().splitlines()) == 1
    assert "link.dat' on storage 'disk-a' is a symbolic link" in both.err
    assert "goes through a symbolic link ('alias')" in through_dir.err
    assert "Traceback" not in both.err + through_dir.err
    with session_scope() as s:
        assert s.scalars(select(Item)).all() == []  # nothing registered: all paths are checked first
    assert dlm("ingest", "-s", "disk-a", str(a / "real.dat")).code == 0
    assert dlm("ingest", "-s", "disk-a", "link.dat").code == 2
    with session_scope() as s:
        assert [i.name for i in s.scalars(select(Item))] == ["real.dat"]  # one item, one file
    assert (a / "real.dat").read_bytes() == b"the real bytes\n" and os.readlink(a / "link.dat") == "real.dat"


# --------------------------------------------------------------------------- checkout


def test_checkout_never_writes_through_a_link_in_the_destination(
    db_url: str, rclone_path: str, tmp_path: Path, outside: Path
) -> None:
    from lifecycle.apply.checkout import checkout

    add_posix("disk-a", tmp_path / "a", "site-a")
    (tmp_path / "a" / "run").mkdir()
    (tmp_path / "a" / "run" / "f0.dat").write_bytes(b"DLM's f0\n")
    (tmp_path / "a" / "g.dat").write_bytes(b"g\n")
    ingest_in_place("disk-a", ["run/f0.dat", "g.dat"], Phase.GAS)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "run").symlink_to(outside, target_is_directory=True)
    before = tree_digest(outside)

    with session_scope() as s:
        items = list(s.scalars(select(Item).order_by(col(Item.name))))
        report = checkout(s, items, str(dest))

    assert report.files == 1 and (dest / "g.dat").read_bytes() == b"g\n"
    assert "goes through a symbolic link ('run')" in report.failed["run/f0.dat"]
    assert tree_digest(outside) == before


# --------------------------------------------------------------------------- pipelines


@pytest.fixture
def two_sites(db_url: str, tmp_path: Path, flows_env: None, outside: Path) -> Path:
    """disk-a (site-a) and disk-b (site-b), posix; returns the scratch dir R."""
    add_posix("disk-a", tmp_path / "a", "site-a")
    add_posix("disk-b", tmp_path / "b", "site-b")
    return tmp_path


@pytest.mark.prefect
def test_replicate_never_writes_outside_the_root_through_a_link(two_sites: Path, outside: Path) -> None:
    """Reproduction 7: `ln -s $R/outside $R/b/run`; replicating run/f0.dat to disk-b wrote
    $R/outside/f0.dat."""
    from flows.pipelines import replicate

    r = two_sites
    (r / "a" / "run").mkdir()
    (r / "a" / "run" / "f0.dat").write_bytes(b"DLM's f0 bytes\n")
    ingest_in_place("disk-a", ["run/f0.dat"], Phase.LIQUID)
    (r / "b" / "run").symlink_to(outside, target_is_directory=True)
    before = tree_digest(outside)

    report = replicate().as_json()

    assert report["copied"] == 0 and report["failed"] == 1
    assert tree_digest(outside) == before  # the user's outside/f0.dat is untouched
    with session_scope() as s:
        [t] = s.scalars(select(Transfer)).all()
    assert t.state == "FAILED" and "goes through a symbolic link ('run')" in (t.error or "")
    assert copies("run/f0.dat") == {"disk-a": "READY"}
    assert (r / "a" / "run" / "f0.dat").read_bytes() == b"DLM's f0 bytes\n"

    (r / "b" / "run").unlink()  # the operator removes the link: the next run copies
    again = replicate().as_json()
    assert again["copied"] == 1 and again["below_target_after"] == 0
    assert (r / "b" / "run" / "f0.dat").read_bytes() == b"DLM's f0 bytes\n"
    assert tree_digest(outside) == before


@pytest.mark.prefect
def test_expire_never_deletes_outside_the_root_through_a_link(two_sites: Path, outside: Path) -> None:
    """Reproduction 7, the expire half: a copy's directory on disk-b replaced by a link to a
    directory outside holding a user's file of the same name."""
    from flows.pipelines import expire, replicate

    r = two_sites
    (r / "a" / "run").mkdir()
    (r / "a" / "run" / "f0.dat").write_bytes(b"DLM's f0 bytes\n")
    ingest_in_place("disk-a", ["run/f0.dat"], Phase.LIQUID)
    assert replicate().as_json()["copied"] == 1
    (r / "b" / "run").rename(r / "b-run-moved")
    (r / "b" / "run").symlink_to(outside, target_is_directory=True)
    before = tree_digest(outside)
    with session_scope() as s:
        s.execute(update(Item).values(expires_at=utcnow()))

    report = expire().as_json()

    assert report["failed"] == 1  # the deletion through the link was refused
    assert tree_digest(outside) == before  # outside/f0.dat still there, with its bytes
    assert (r / "b-run-moved" / "f0.dat").read_bytes() == b"DLM's f0 bytes\n"
    [failed] = events("replica.delete_failed")
    assert failed["path"] == "run/f0.dat" and "goes through a symbolic link ('run')" in failed["error"]


@pytest.mark.prefect
def test_verify_finds_a_link_planted_in_place_of_a_copy_and_the_phase_comes_back_without_it(
    two_sites: Path, outside: Path
) -> None:
    """Reproduction 3, the verify half: a copy that is now a link (here to a file with the very
    same bytes) is not intact: LOST, not READY, not 'unreadable'. Nothing is written through
    the link; once it is gone, replicate restores the phase."""
    from flows.integrity import verify
    from flows.pipelines import replicate

    r = two_sites
    (r / "a" / "x.dat").write_bytes(b"DLM's x bytes\n")
    ingest_in_place("disk-a", ["x.dat"], Phase.LIQUID)
    assert replicate().as_json()["copied"] == 1
    copy = r / "b" / "x.dat"
    (outside / "x-lookalike.dat").write_bytes(copy.read_bytes())
    copy.unlink()
    copy.symlink_to(outside / "x-lookalike.dat")
    before = tree_digest(outside)

    report = verify().as_json()

    assert report["lost"] == 1 and report["unreadable"] == 0 and report["intact"] == 1
    assert copies("x.dat") == {"disk-a": "READY", "disk-b": "LOST"} and item_state("x.dat") == "READY"
    [lost] = events("replica.lost")
    assert lost["path"] == "x.dat" and "is a symbolic link" in lost["reason"]
    assert report["repair_failed"] == 1  # repair does not write through the link
    retry = replicate().as_json()  # nor does replicate, with a clear reason
    assert retry["failed"] == 1 and "is a symbolic link" in retry["batches"][0]["first error"]
    assert os.path.islink(copy) and tree_digest(outside) == before

    copy.unlink()  # the operator removes the link: the phase comes back
    again = replicate().as_json()

    assert again["copied"] == 1 and again["below_target_after"] == 0
    assert copy.read_bytes() == b"DLM's x bytes\n" and not copy.is_symlink()
    assert (outside / "x-lookalike.dat").read_bytes() == b"DLM's x bytes\n"
    assert tree_digest(outside) == before


@pytest.mark.prefect
def test_verify_of_an_only_copy_replaced_by_a_link_corrupts_the_item(two_sites: Path, outside: Path) -> None:
    """Reproduction 3 end to end: real.dat registered; link.dat refused; real.dat expires; and
    a link left where a GAS item's only copy was is LOST, the item CORRUPTED (never READY)."""
    from flows.integrity import verify
    from flows.pipelines import expire

    a = two_sites / "a"
    (a / "real.dat").write_bytes(b"the real bytes\n")
    (a / "solo.dat").write_bytes(b"solo\n")
    (a / "link.dat").symlink_to("real.dat")
    with pytest.raises(InvalidNameError, match="is a symbolic link"):
        ingest_in_place("disk-a", ["link.dat"], Phase.GAS)
    ingest_in_place("disk-a", ["real.dat", "solo.dat"], Phase.GAS)
    with session_scope() as s:
        s.execute(update(Item).where(col(Item.name) == "real.dat").values(expires_at=utcnow()))
    assert expire().as_json()["deleted"] == 1
    assert not (a / "real.dat").exists() and os.path.islink(a / "link.dat")  # the link is not DLM's
    (a / "solo.dat").unlink()
    (a / "solo.dat").symlink_to(outside / "o.dat")

    report = verify().as_json()

    assert report["lost"] == 1 and report["items_corrupted"] == 1 and report["unreadable"] == 0
    assert item_state("solo.dat") == "CORRUPTED" and copies("solo.dat") == {"disk-a": "LOST"}
    assert (outside / "o.dat").read_bytes() == b"private\n"


@pytest.mark.prefect
def test_reconcile_skips_links_with_an_event_and_never_adopts_them(two_sites: Path, outside: Path) -> None:
    from flows.integrity import reconcile

    a = two_sites / "a"
    (a / "sub").mkdir()
    (a / "tracked.dat").write_bytes(b"tracked\n")
    (a / "sub" / "stray.dat").write_bytes(b"stray\n")
    ingest_in_place("disk-a", ["tracked.dat"], Phase.GAS)
    (a / "link.dat").symlink_to("tracked.dat")
    (a / "sub" / "out").symlink_to(outside, target_is_directory=True)
    before = tree_digest(outside)

    report = reconcile(storage="disk-a", adopt=True).as_json()

    assert report["links"] == 2 and sorted(report["link_paths"]) == ["link.dat", "sub/out"]
    assert report["adopted"] == 1 and report["matched"] == 1 and report["lost"] == 0
    assert sorted(e["path"] for e in events("reconcile.link_skipped")) == ["link.dat", "sub/out"]
    with session_scope() as s:
        names = sorted(i.name for i in s.scalars(select(Item)))
    assert names == ["sub/stray.dat", "tracked.dat"]  # nothing through a link was adopted
    assert tree_digest(outside) == before and os.path.islink(a / "link.dat")


@pytest.mark.prefect
def test_reconcile_finds_a_copy_replaced_by_a_link_lost(two_sites: Path, outside: Path) -> None:
    from flows.integrity import reconcile
    from flows.pipelines import replicate

    r = two_sites
    (r / "a" / "run").mkdir()
    (r / "a" / "run" / "f0.dat").write_bytes(b"DLM's f0 bytes\n")
    (r / "a" / "keep.dat").write_bytes(b"keep\n")
    ingest_in_place("disk-a", ["run/f0.dat", "keep.dat"], Phase.LIQUID)
    assert replicate().as_json()["copied"] == 2
    (r / "b" / "run" / "f0.dat").unlink()
    (r / "b" / "run").rmdir()
    (r / "b" / "run").symlink_to(outside, target_is_directory=True)  # outside/f0.dat is the user's
    before = tree_digest(outside)

    report = reconcile(storage="disk-b").as_json()

    assert report["lost"] == 1 and report["matched"] == 1 and report["links"] == 1
    assert report["repaired"] == 0 and report["repair_failed"] == 1  # no write through the link
    [lost] = events("replica.lost")
    assert lost["path"] == "run/f0.dat" and "goes through a symbolic link ('run'" in lost["reason"]
    assert copies("run/f0.dat") == {"disk-a": "READY", "disk-b": "LOST"}
    assert tree_digest(outside) == before
    assert (r / "a" / "run" / "f0.dat").read_bytes() == b"DLM's f0 bytes\n"
