"""Stateful property test: whatever a user and the outside world do, no `dlm` command costs a
live item its last intact copy on disk, and none changes a file outside the storage roots.

A hypothesis RuleBasedStateMachine drives the real `dlm` CLI in-process (real posix storages,
real rclone, the flows on Prefect's test harness, a SQLite catalogue) through ingest (in place,
--upload, --from-list), replicate, migrate, expire, rebalance, verify, reconcile, drain and
undrain, checkout, phase and expiry changes and deletes, and interleaves interference from
outside DLM: a copy deleted, a byte flipped, a copy replaced by a symlink, a directory symlink
to a folder outside the roots planted where DLM will write, a storage added over another's root.

The model is recomputed from the bytes after every step: a copy of an item is intact when the
file at its root-relative path is a regular file, reached through no symlink, whose MD5 is the
MD5 of the bytes the user ingested. After every `dlm` command:

- every live item (not deleted, not expired by the user) that had an intact copy still has one;
- no file, directory or link outside the roots changed (a sentinel folder, the symlink targets,
  the upload sources and the lists are digested before and after);
- no two live replicas share a file (the same storage and path, or overlapping roots);
- every copy the command made READY is intact, and a successful ingest recorded the checksum of
  the bytes the user gave, on an intact copy;
- after `dlm run verify` exits 0 every READY copy of a live item is intact; after `dlm run
  reconcile` exits 0 every READY copy on that storage is there with the item's size;
- no command ends in an internal error (exit 70).

Each example switches on a random subset of the kinds of steps (swarm testing), so the few
steps of one failure come often enough in a short run. In CI the examples are derandomized:
MACHINE_EXAMPLES runs of up to MACHINE_STEPS steps (about 3 minutes). The soak
(`slow`, on SQLite and PostgreSQL) runs when DLM_SOAK_EXAMPLES is set, with DLM_SOAK_STEPS
steps each (default 60) and random draws (DLM_SOAK_SEED fixes them).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select
from sqlmodel import col

from lifecycle import settings as settings_mod
from lifecycle.catalogue.db import dispose_engines, init_db, session_scope
from lifecycle.catalogue.models import Item, Replica, Storage
from lifecycle.states import LIVE_ITEM_STATES, LIVE_REPLICA_STATES, ReplicaState

MACHINE_EXAMPLES = 10
MACHINE_STEPS = 20

# storages: name -> (tier, location): SOLID needs all three (two locations, one archive)
STORAGES = {"a": ("hot", "x"), "b": ("warm", "x"), "c": ("archive", "y")}
# few paths and names, so that files, uploads, lists and versions collide
PATHS = ("f0.dat", "f1.dat", "f0.dat~v2", "d/f0.dat", "d/f1.dat", "e/f0.dat")
NAMES = (*PATHS, "g.dat")
PHASES = ("PLASMA", "GAS", "LIQUID", "SOLID")
# the folder outside every root that planted directory links point at: it holds files of the
# same names as the paths above, so a write or delete through a link hits them
OUTSIDE = {
    "target/f0.dat": b"outside: not DLM's f0",
    "target/f1.dat": b"outside: not DLM's f1",
    "target/f0.dat~v2": b"outside: not DLM's f0 v2",
    "sentinel/keep.txt": b"a user's file next to the storages",
    "sentinel/deep/keep.bin": bytes(range(256)),
}
NOT_OUTSIDE = {*STORAGES, "checkout", "db"}  # digested as "outside": everything else under ex

# Swarm testing: each example switches on a random subset of these families of steps (ingest in
# place and replicate are always on), so that the few steps of one failure come often enough.
FAMILIES = (
    "upload", "list", "migrate", "expire", "rebalance", "verify", "reconcile", "drain", "checkout",
    "phase", "expire_now", "delete", "overlap", "rm", "flip", "link_copy", "link_dir",
)  # fmt: skip


def family(name: str) -> Any:
    return precondition(lambda self: name in self.on)


data_st = st.binary(max_size=48)
phase_st = st.sampled_from(PHASES)
storage_st = st.sampled_from(sorted(STORAGES))
pick_st = st.integers(min_value=0, max_value=1_000)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Snap:
    """The world as the bytes and the catalogue show it, between two steps."""

    items: dict[str, tuple[str, str, int, str]]  # oid -> (state, checksum, size, "name vN")
    rows: list[tuple[str, str, str, str, str]]  # (uid, oid, storage, path, state)
    roots: dict[str, str]  # storage -> root
    intact: dict[str, set[tuple[str, str]]]  # oid -> {(storage, path)} intact on disk
    outside: dict[str, tuple[str, str]]  # rel path -> (kind, digest or link text)
    storage_state: dict[str, str] = field(default_factory=dict)

    def ready(self) -> dict[str, tuple[str, str, str]]:
        return {uid: (oid, s, p) for uid, oid, s, p, state in self.rows if state == ReplicaState.READY}


class InvariantMachine(RuleBasedStateMachine):
    """One example: a fresh folder with three posix roots and a fresh catalogue."""

    base: ClassVar[Path]
    catalogue: ClassVar[Any]  # () -> DLM_DATABASE_URL of a fresh, migrated catalogue
    counter: ClassVar[int] = 0  # examples started
    steps: ClassVar[int] = 0  # steps run, over all examples

    items = Bundle("items")

    def __init__(self) -> None:
        super().__init__()
        InvariantMachine.counter += 1
        self.ex = self.base / f"ex{InvariantMachine.counter}"
        for d in (*STORAGES, "db", "checkout", "local", "lists"):
            (self.ex / d).mkdir(parents=True)
        for rel, data in OUTSIDE.items():
            (self.ex / "outside" / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.ex / "outside" / rel).write_bytes(data)
        os.environ["DLM_DATABASE_URL"] = self.catalogue(self.ex / "db")
        settings_mod.reset_settings()
        self.expected: dict[str, str] = {}  # oid -> md5 of the bytes the user ingested
        self.unprotected: set[str] = set()  # deleted or expired by the user
        self.overlap_tried = False
        self.on: set[str] = set(FAMILIES)
        self.n = 0
        self.log: list[str] = []
        for name, (tier, loc) in STORAGES.items():
            r = self.cli(
                "storage", "add", name, "--kind", "posix", "--root", str(self.ex / name),
                "--tier", tier, "--location", loc,
            )  # fmt: skip
            assert r.code == 0, r.err
        self.last = self.snapshot()

    def teardown(self) -> None:
        dispose_engines()
        shutil.rmtree(self.ex, ignore_errors=True)

    # ------------------------------------------------------------------ plumbing

    def cli(self, *args: str) -> Result:
        from dlm.cli import main

        settings_mod.reset_settings()
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exc:
                code = int(exc.code or 0)
        return Result(code, out.getvalue(), err.getvalue())

    def fresh(self) -> int:
        self.n += 1
        return self.n

    def root(self, storage: str) -> Path:
        return Path(self.last.roots[storage])

    @staticmethod
    def through_link(root: Path, rel: str) -> bool:
        """Is any component of root/rel (below root) a symlink?"""
        p = root
        for part in rel.split("/"):
            p = p / part
            if p.is_symlink():
                return True
        return False

    def intact_file(self, root: str, rel: str, checksum: str) -> bool:
        if rel.startswith("/") or ".." in rel.split("/") or self.through_link(Path(root), rel):
            return False
        p = Path(root) / rel
        try:
            if not stat.S_ISREG(p.lstat().st_mode):
                return False
            return md5(p.read_bytes()) == checksum
        except OSError:
            return False

    def outside_digest(self) -> dict[str, tuple[str, str]]:
        out: dict[str, tuple[str, str]] = {}
        for dirpath, dirnames, filenames in os.walk(self.ex):
            here = Path(dirpath)
            if here == self.ex:
                dirnames[:] = [d for d in dirnames if d not in NOT_OUTSIDE]
                filenames = []
            for n in dirnames + filenames:
                p = here / n
                rel = p.relative_to(self.ex).as_posix()
                mode = p.lstat().st_mode
                if stat.S_ISLNK(mode):
                    out[rel] = ("link", os.readlink(p))
                elif stat.S_ISREG(mode):
                    out[rel] = ("file", md5(p.read_bytes()))
                else:
                    out[rel] = ("dir", "")
        return out

    def snapshot(self) -> Snap:
        with session_scope() as s:
            roots = {n: r for n, r in s.execute(select(col(Storage.name), col(Storage.root)))}
            sstate = {n: str(x) for n, x in s.execute(select(col(Storage.name), col(Storage.state)))}
            items = {
                str(oid): (str(state), str(checksum), int(size), f"{name} v{version}")
                for oid, state, checksum, size, name, version in s.execute(
                    select(
                        col(Item.oid),
                        col(Item.state),
                        col(Item.checksum),
                        col(Item.size),
                        col(Item.name),
                        col(Item.version),
                    )
                )
            }
            rows = [
                (str(uid), str(oid), name, path, str(state))
                for uid, oid, name, path, state in s.execute(
                    select(
                        col(Replica.uid),
                        col(Replica.item_oid),
                        col(Storage.name),
                        col(Replica.path),
                        col(Replica.state),
                    )
                    .join(Storage, col(Storage.id) == col(Replica.storage_id))
                    .order_by(col(Storage.name), col(Replica.path), col(Replica.uid))
                )
            ]
        intact: dict[str, set[tuple[str, str]]] = {}
        for _uid, oid, sname, path, state in rows:
            if state == ReplicaState.DELETED:
                continue
            want = self.expected.get(oid) or items[oid][1]
            if self.intact_file(roots[sname], path, want):
                intact.setdefault(oid, set()).add((sname, path))
        return Snap(items, rows, roots, intact, self.outside_digest(), sstate)

    def describe(self, oid: str) -> str:
        known = self.last.items.get(oid)
        return f"{known[3]} ({oid[-6:]})" if known else oid

    def fail(self, what: str) -> str:
        return f"{what}\nsteps of this example:\n  " + "\n  ".join(self.log[-40:])

    def step(self, what: str, *args: str) -> tuple[Result, Snap, Snap]:
        """Run one `dlm` command between two snapshots and check every invariant."""
        InvariantMachine.steps += 1
        before = self.snapshot()
        res = self.cli(*args)
        after = self.snapshot()
        self.last = after
        self.log.append(f"{what}: `dlm {' '.join(self.short(a) for a in args)}` -> exit {res.code}")
        assert res.code != 70, self.fail(f"internal error: {res.err.strip()[-600:]}")
        changed = {
            k: (before.outside.get(k), after.outside.get(k))
            for k in set(before.outside) | set(after.outside)
            if before.outside.get(k) != after.outside.get(k)
        }
        assert not changed, self.fail(f"`{what}` changed files outside the storage roots: {changed}")
        lost = [
            f"{self.describe(oid)} (had {sorted(before.intact[oid])})"
            for oid in before.intact
            if oid not in self.unprotected and not after.intact.get(oid)
        ]
        assert not lost, self.fail(f"`{what}` lost the last intact copy of live items: {lost}")
        dead = [
            f"{self.describe(oid)} is {after.items[oid][0]}"
            for oid in self.expected
            if oid not in self.unprotected and after.items[oid][0] not in LIVE_ITEM_STATES
        ]
        assert not dead, self.fail(f"`{what}` ended live items nobody expired or deleted: {dead}")
        owners: dict[str, str] = {}
        for _uid, oid, sname, path, state in after.rows:
            if state in LIVE_REPLICA_STATES:
                where = os.path.normpath(os.path.join(after.roots[sname], path))
                other = owners.setdefault(where, oid)
                if other != oid:
                    raise AssertionError(
                        self.fail(
                            f"`{what}`: {where} is the live copy of two items: "
                            f"{self.describe(other)} and {self.describe(oid)}"
                        )
                    )
        was_ready = before.ready()
        bad_claims = [
            f"{self.describe(oid)} on {sname}:{path}"
            for uid, (oid, sname, path) in after.ready().items()
            if uid not in was_ready and (sname, path) not in after.intact.get(oid, set())
        ]
        assert not bad_claims, self.fail(f"`{what}` made copies READY that are not intact: {bad_claims}")
        self.last = after
        return res, before, after

    def short(self, arg: str) -> str:
        return arg.replace(str(self.ex) + "/", "").replace(str(self.ex), "EX")

    def place(self, storage: str, rel: str, data: bytes) -> str | None:
        """Write `data` at storage:rel unless something is there or the way is through a link;
        return the MD5 of what a reader finds there now (None: nothing readable)."""
        root = self.root(storage)
        full = root / rel
        if not self.through_link(root, rel) and not os.path.lexists(full):
            try:
                full.parent.mkdir(parents=True, exist_ok=True)
                full.write_bytes(data)
            except OSError:
                pass  # a file where a directory would be: leave it
        try:
            return md5(full.read_bytes())
        except OSError:
            return None

    def adopt_new(self, before: Snap, after: Snap, expected_at: dict[tuple[str, str], str]) -> list[str]:
        """Record the items a successful ingest created and check what it recorded."""
        new = [oid for oid in after.items if oid not in before.items]
        for oid in new:
            places = [(s, p) for _u, o, s, p, _st in after.rows if o == oid]
            want = next((expected_at[w] for w in places if w in expected_at), None)
            assert want is not None, self.fail(f"ingest registered {oid} at {places}, which nobody gave")
            self.expected[oid] = want
            assert after.items[oid][1] == want, self.fail(
                f"ingest recorded checksum {after.items[oid][1]} for {places}, the bytes given were {want}"
            )
            assert after.intact.get(oid), self.fail(
                f"ingest registered {self.describe(oid)} READY but no intact copy of its bytes is stored"
            )
        return new

    @initialize(on=st.sets(st.sampled_from(FAMILIES), min_size=4))
    def switch_on(self, on: set[str]) -> None:
        self.on = set(on)
        self.log.append(f"steps switched on: in-place ingest, replicate, {', '.join(sorted(on))}")

    # ------------------------------------------------------------------ ingest

    @rule(
        target=items,
        storage=storage_st,
        path=st.sampled_from(PATHS),
        name=st.none() | st.sampled_from(NAMES),
        data=data_st,
        phase=phase_st,
    )
    def ingest_in_place(self, storage: str, path: str, name: str | None, data: bytes, phase: str) -> Any:
        want = self.place(storage, path, data)
        args = ["ingest", "-s", storage, str(self.root(storage) / path), "--phase", phase, "--json"]
        if name is not None:
            args += ["--name", name]
        res, before, after = self.step("ingest in place", *args)
        if res.code != 0 or want is None:
            assert res.code != 0 or want is not None, self.fail("ingest of a path with no bytes exited 0")
            return multiple()
        return multiple(*self.adopt_new(before, after, {(storage, path): want}))

    @family("upload")
    @rule(target=items, storage=storage_st, name=st.sampled_from(NAMES), data=data_st, phase=phase_st)
    def ingest_upload(self, storage: str, name: str, data: bytes, phase: str) -> Any:
        local = self.ex / "local" / f"u{self.fresh()}.bin"
        local.write_bytes(data)
        res, before, after = self.step(
            "ingest --upload",
            "ingest", "-s", storage, "--upload", str(local), "--name", name, "--phase", phase, "--json",
        )  # fmt: skip
        if res.code != 0:
            return multiple()
        new_rows = {(s, p) for _u, o, s, p, _st in after.rows if o not in before.items}
        return multiple(*self.adopt_new(before, after, dict.fromkeys(new_rows, md5(data))))

    @family("list")
    @rule(
        target=items,
        storage=storage_st,
        rows=st.lists(
            st.tuples(st.sampled_from(NAMES), st.sampled_from(PATHS), data_st), min_size=1, max_size=3
        ),
        phase=phase_st,
    )
    def ingest_list(self, storage: str, rows: list[tuple[str, str, bytes]], phase: str) -> Any:
        lines, at = [], {}
        for name, path, data in rows:
            want = self.place(storage, path, data)
            if want is None:
                continue  # a listing names files that exist
            size = len((self.root(storage) / path).read_bytes())
            lines.append(json.dumps({"name": name, "path": path, "size": size, "checksum": want}))
            at[(storage, path)] = want
        if not lines:
            return multiple()
        listing = self.ex / "lists" / f"l{self.fresh()}.jsonl"
        listing.write_text("\n".join(lines) + "\n")
        res, before, after = self.step(
            "ingest --from-list", "ingest", "-s", storage, "--from-list", str(listing), "--phase", phase
        )
        if res.code != 0:
            return multiple()
        return multiple(*self.adopt_new(before, after, at))

    # ------------------------------------------------------------------ pipelines

    @rule()
    def replicate(self) -> None:
        self.step("replicate", "run", "replicate")

    @family("migrate")
    @rule()
    def migrate(self) -> None:
        self.step("migrate", "run", "migrate")

    @family("expire")
    @rule()
    def expire(self) -> None:
        self.step("expire", "run", "expire")

    @family("rebalance")
    @rule()
    def rebalance(self) -> None:
        self.step("rebalance", "run", "rebalance")

    @family("verify")
    @rule()
    def verify(self) -> None:
        res, _, after = self.step("verify", "run", "verify")
        if res.code == 0:
            stale = [  # verify reads the copies of READY and CORRUPTED items
                f"{self.describe(oid)} on {s}:{p}"
                for oid, s, p in after.ready().values()
                if after.items[oid][0] in ("READY", "CORRUPTED")
                and (s, p) not in after.intact.get(oid, set())
            ]
            assert not stale, self.fail(f"verify exited 0 and left copies READY that are not intact: {stale}")

    @family("reconcile")
    @rule(storage=st.sampled_from([*sorted(STORAGES), "n"]))
    def reconcile(self, storage: str) -> None:
        res, _, after = self.step("reconcile", "run", "reconcile", "--storage", storage)
        if res.code != 0:
            return
        missing = []
        for oid, s, p in after.ready().values():
            if s != storage:
                continue
            f = Path(after.roots[s]) / p
            if not os.path.lexists(f):
                missing.append(f"{self.describe(oid)} at {p}: no file")
            elif (
                not self.through_link(Path(after.roots[s]), p)
                and f.is_file()
                and f.stat().st_size != after.items[oid][2]
            ):
                missing.append(f"{self.describe(oid)} at {p}: wrong size")
        assert not missing, self.fail(f"reconcile exited 0 and left READY copies it did not find: {missing}")

    @family("drain")
    @rule(storage=st.sampled_from([*sorted(STORAGES), "n"]))
    def drain(self, storage: str) -> None:
        self.step("drain", "storage", "drain", storage)

    @family("drain")
    @rule(storage=st.sampled_from([*sorted(STORAGES), "n"]))
    def undrain(self, storage: str) -> None:
        self.step("back online", "storage", "online", storage)

    # ------------------------------------------------------------------ users

    @family("checkout")
    @rule(item=items, into_root=st.none() | storage_st)
    def checkout(self, item: str, into_root: str | None) -> None:
        dest = self.root(into_root) if into_root else self.ex / "checkout" / f"k{self.fresh()}"
        res, _, after = self.step("checkout", "checkout", item, str(dest))
        if res.code == 0 and into_root is None and after.items[item][0] == "READY":
            # the copy is named after the item; its bytes are the item's
            names = [p for p in dest.rglob("*") if p.is_file()]
            got = {md5(p.read_bytes()) for p in names}
            assert got == {self.expected[item]}, self.fail(
                f"checkout of {self.describe(item)} exited 0 but wrote {[str(p) for p in names]}"
            )

    @family("phase")
    @rule(item=items, phase=phase_st)
    def set_phase(self, item: str, phase: str) -> None:
        self.step("set phase", "items", "set-phase", item, phase)

    @family("expire_now")
    @rule(item=items)
    def expire_item_now(self, item: str) -> None:
        res, _, _ = self.step("expire now", "items", "set-expiry", item, "--at", "2020-01-01")
        if res.code == 0:
            self.unprotected.add(item)

    @family("delete")
    @rule(item=items)
    def delete_item(self, item: str) -> None:
        self.unprotected.add(item)  # the user means it, whatever comes of it
        self.step("delete", "items", "delete", item, "--yes")

    @precondition(lambda self: "overlap" in self.on and not self.overlap_tried)
    @rule(kind=st.sampled_from(["same root as b", "inside a"]))
    def add_overlapping_storage(self, kind: str) -> None:
        self.overlap_tried = True
        if kind == "inside a":
            root = self.root("a") / "d"
            if root.is_symlink() or (os.path.lexists(root) and not root.is_dir()):
                self.log.append("(no overlapping storage: a/d is not a plain directory)")
                return
            root.mkdir(exist_ok=True)
        else:
            root = self.root("b")
        self.step(
            f"add storage n ({kind})",
            "storage", "add", "n", "--kind", "posix", "--root", str(root),
            "--tier", "cold", "--location", "y",
        )  # fmt: skip

    # ------------------------------------------------------------------ interference (not DLM)

    def copies_on_disk(self, *, nonempty: bool = False) -> list[tuple[str, Path]]:
        """Files of tracked copies (regular, not through a link), one entry per file."""
        seen: dict[str, tuple[str, Path]] = {}
        for _uid, _oid, sname, path, state in self.last.rows:
            if state == ReplicaState.DELETED:
                continue
            root = Path(self.last.roots[sname])
            f = root / path
            if self.through_link(root, path) or not f.is_file() or (nonempty and f.stat().st_size == 0):
                continue
            seen.setdefault(os.path.normpath(f), (sname, f))
        return [seen[k] for k in sorted(seen)]

    def outside_step(self, what: str) -> None:
        InvariantMachine.steps += 1
        self.log.append(f"outside DLM: {what}")
        self.last = self.snapshot()

    @family("rm")
    @rule(pick=pick_st)
    def interfere_delete_copy(self, pick: int) -> None:
        files = self.copies_on_disk()
        if files:
            _, f = files[pick % len(files)]
            f.unlink()
            self.outside_step(f"rm {self.short(str(f))}")

    @family("flip")
    @rule(pick=pick_st, at=pick_st)
    def interfere_flip_byte(self, pick: int, at: int) -> None:
        files = self.copies_on_disk(nonempty=True)
        if files:
            _, f = files[pick % len(files)]
            data = bytearray(f.read_bytes())
            data[at % len(data)] ^= 0x01
            f.write_bytes(bytes(data))
            self.outside_step(f"flip a byte of {self.short(str(f))}")

    @family("link_copy")
    @rule(pick=pick_st, to_outside=st.booleans())
    def interfere_link_copy(self, pick: int, to_outside: bool) -> None:
        """Replace a stored copy by a symlink: to a file outside the roots, or to another copy."""
        files = self.copies_on_disk()
        if not files:
            return
        sname, f = files[pick % len(files)]
        others = [g for s, g in files if s == sname and g != f]
        target = self.ex / "outside" / "target" / "f0.dat" if to_outside or not others else others[0]
        f.unlink()
        f.symlink_to(target)
        self.outside_step(f"ln -sf {self.short(str(target))} {self.short(str(f))}")

    @family("link_dir")
    @rule(storage=storage_st, dirname=st.sampled_from(["d", "e"]))
    def interfere_link_dir(self, storage: str, dirname: str) -> None:
        """A directory symlink to the outside folder where DLM may write d/... or e/..."""
        where = self.root(storage) / dirname
        if not os.path.lexists(where):
            where.symlink_to(self.ex / "outside" / "target", target_is_directory=True)
            self.outside_step(f"ln -s outside/target {self.short(str(where))}")


def _settings(examples: int, steps: int, *, derandomize: bool) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=derandomize,
        database=None,
        print_blob=not derandomize,
        suppress_health_check=list(HealthCheck),
    )


def _run(base: Path, capsys: Any, catalogue: Any, cfg: settings, seed: int | None = None) -> None:
    InvariantMachine.base = base
    InvariantMachine.catalogue = staticmethod(catalogue)
    InvariantMachine.counter = 0
    InvariantMachine.steps = 0
    started = time.monotonic()
    try:

        def factory() -> InvariantMachine:
            return InvariantMachine()

        if seed is not None:
            from hypothesis import seed as fix_seed

            factory = fix_seed(seed)(factory)
        run_state_machine_as_test(factory, settings=cfg)  # type: ignore[arg-type]
    finally:
        with capsys.disabled():
            print(
                f"\ninvariant machine: {InvariantMachine.counter} runs of up to {cfg.stateful_step_count} "
                f"steps, {InvariantMachine.steps} steps in all, in {time.monotonic() - started:.0f}s"
            )


def _sqlite_catalogues(base: Path) -> Any:
    template = base / "template.db"
    init_db(f"sqlite:///{template}")
    dispose_engines()

    def fresh(where: Path) -> str:
        shutil.copy(template, where / "catalogue.db")
        return f"sqlite:///{where / 'catalogue.db'}"

    return fresh


@pytest.fixture
def machine_env(tmp_path: Path, flows_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("DLM_OWNER", "machine")
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("DLM_DATABASE_URL", "unset")  # each example sets its own; restored after
    # Prefect sets up its log handlers on first import, on the sys.stderr of that moment: import
    # the flows here, outside any capture of this test, so no handler outlives its stream.
    import flows.checkout
    import flows.integrity
    import flows.pipelines  # noqa: F401

    yield tmp_path
    dispose_engines()


@pytest.mark.prefect
@pytest.mark.rclone
def test_invariant_machine(machine_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CI: MACHINE_EXAMPLES derandomized runs of MACHINE_STEPS steps on a SQLite catalogue."""
    cfg = _settings(MACHINE_EXAMPLES, MACHINE_STEPS, derandomize=True)
    _run(machine_env, capsys, _sqlite_catalogues(machine_env), cfg)


@pytest.mark.slow
@pytest.mark.prefect
@pytest.mark.rclone
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_invariant_machine_soak(
    machine_env: Path, capsys: pytest.CaptureFixture[str], backend: str, request: pytest.FixtureRequest
) -> None:
    """The soak: DLM_SOAK_EXAMPLES random runs of DLM_SOAK_STEPS steps (skipped when unset)."""
    examples = int(os.environ.get("DLM_SOAK_EXAMPLES", "0"))
    if not examples:
        pytest.skip("the invariant machine's soak runs when DLM_SOAK_EXAMPLES is set")
    steps = int(os.environ.get("DLM_SOAK_STEPS", "60"))
    seed = os.environ.get("DLM_SOAK_SEED")
    if backend == "sqlite":
        catalogue = _sqlite_catalogues(machine_env)
    else:
        from tests.conftest import truncate_all

        url = request.getfixturevalue("postgres_url")

        def catalogue(_where: Path) -> str:
            truncate_all(url)
            return str(url)

    cfg = _settings(examples, steps, derandomize=False)
    _run(machine_env, capsys, catalogue, cfg, int(seed) if seed is not None else None)
