"""The core's output models are what the CLI prints: every `--json` listing equals the model the
core builds for it (so a REST API returning the models returns the same), with the keys and time
formats the CLI has always printed."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from lifecycle import settings as settings_mod
from lifecycle.catalogue import public, storages
from lifecycle.catalogue.db import session_scope

ITEM_KEYS = [
    "oid",
    "name",
    "version",
    "size",
    "checksum",
    "checksum_algo",
    "state",
    "target_phase",
    "owner",
    "created_at",
    "expires_at",
    "metadata",
]
STORAGE_KEYS = [
    "name",
    "kind",
    "root",
    "tier",
    "capacity_bytes",
    "endpoint",
    "region",
    "credentials_env",
    "trust_stored_checksums",
    "id",
    "location",
    "used_bytes",
    "state",
    "created_at",
]


Run = Callable[..., Any]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """`dlm ARGS... --json` in-process: the parsed JSON it printed (exit 0 asserted)."""
    from dlm.cli import main

    monkeypatch.setenv("DLM_OWNER", "tester")

    def run(*args: str, as_json: bool = True) -> Any:
        settings_mod.reset_settings()
        capsys.readouterr()
        code = 0
        try:
            main([*args, "--json"] if as_json else list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        assert code == 0, err
        return json.loads(out) if as_json else out

    return run


@pytest.fixture
def estate(cli: Run, db_url: str, tmp_path: Path) -> Path:
    """Two posix storages (one draining), three items (two versions of one), a dataset."""
    for name, tier, loc in (("disk-a", "hot", "site-a"), ("disk-b", "cold", "site-b")):
        (tmp_path / name).mkdir()
        cli("storage", "add", name, "--kind", "posix", "--root", str(tmp_path / name), "--tier", tier,
            "--location", loc, "--capacity", "1GiB")  # fmt: skip
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.dat").write_bytes(b"A" * 1000)
    (src / "b.dat").write_bytes(b"B" * 2000)
    cli("ingest", "-s", "disk-a", "--upload", str(src / "a.dat"), "--name", "run/a.dat", "--meta", "kind=raw",
        "--meta", "obs.band=r", "--lifetime", "30d", "--phase", "LIQUID")  # fmt: skip
    cli("ingest", "-s", "disk-a", "--upload", str(src / "b.dat"), "--name", "run/b.dat", "--owner", "alice")
    cli("ingest", "-s", "disk-a", "--upload", str(src / "b.dat"), "--name", "run/b.dat")
    cli("datasets", "create", "raw", "--where", "meta.kind = 'raw'", as_json=False)
    cli("storage", "drain", "disk-b", as_json=False)
    return tmp_path


def _dump(model: BaseModel | list[Any]) -> Any:
    if isinstance(model, list):
        return [m.model_dump(mode="json") for m in model]
    return model.model_dump(mode="json")


def test_every_json_listing_is_the_core_model(cli: Run, estate: Path, db_url: str) -> None:
    with session_scope(db_url) as s:
        expected = {
            ("items", "list"): _dump(public.list_items(session=s)),
            ("items", "list", "--where", "meta.obs.band = 'r'"): _dump(
                public.list_items(where="meta.obs.band = 'r'", session=s)
            ),
            ("items", "show", "run/a.dat"): _dump(public.item_detail("run/a.dat", session=s)),
            ("items", "show", "run/b.dat@v1"): _dump(public.item_detail("run/b.dat@v1", session=s)),
            ("storage", "list"): _dump(storages.list_storages(session=s)),
            ("storage", "show", "disk-a"): _dump(public.storage_detail("disk-a", session=s)),
            ("datasets", "list"): _dump(public.list_datasets(session=s)),
            ("datasets", "show", "raw"): _dump(public.dataset_detail("raw", session=s)),
            ("status",): _dump(public.status(session=s)),
        }
    for argv, model_json in expected.items():
        assert cli(*argv) == model_json, argv


def test_the_json_keeps_the_cli_keys_and_times(cli: Run, estate: Path) -> None:
    items = cli("items", "list")
    assert [i["name"] for i in items] == ["run/a.dat", "run/b.dat", "run/b.dat"]
    assert all(list(i) == ITEM_KEYS for i in items)
    a = items[0]
    assert (a["size"], a["target_phase"], a["state"], a["owner"]) == (1000, "LIQUID", "READY", "tester")
    assert a["checksum"] == hashlib.md5(b"A" * 1000).hexdigest()
    assert a["metadata"] == {"kind": "raw", "obs": {"band": "r"}}
    assert a["created_at"].endswith("+00:00") and a["expires_at"].endswith("+00:00")
    assert (items[1]["owner"], items[1]["version"], items[2]["version"]) == ("alice", 1, 2)

    shown = cli("items", "show", "run/a.dat")
    assert list(shown) == [*ITEM_KEYS, "parents", "replicas", "events"]
    [rep] = shown["replicas"]
    assert list(rep) == ["uid", "storage", "path", "state", "expires_at", "verified_at"]
    assert (rep["storage"], rep["state"]) == ("disk-a", "READY")
    assert (estate / "disk-a" / rep["path"]).read_bytes() == b"A" * 1000  # the copy the row names
    assert [list(e) for e in shown["events"]] == [["ts", "kind", "actor", "details"]] * len(shown["events"])
    assert {e["kind"] for e in shown["events"]} >= {"item.ready"}

    st = cli("storage", "show", "disk-a")
    assert list(st) == [*STORAGE_KEYS, "free_bytes", "replicas"]
    assert st["used_bytes"] == 1000 + 2000 + 2000 and st["free_bytes"] == 1024**3 - 5000
    assert st["replicas"] == {"READY": 3} and st["created_at"].endswith("Z")
    assert [list(r) for r in cli("storage", "list")] == [STORAGE_KEYS, STORAGE_KEYS]

    [ds] = cli("datasets", "list")
    assert list(ds) == ["name", "where", "description", "owner", "created_at"]
    shown_ds = cli("datasets", "show", "raw")
    assert list(shown_ds) == ["name", "where", "members"]
    assert [m["name"] for m in shown_ds["members"]] == ["run/a.dat"]

    status = cli("status")
    assert list(status) == ["storages", "items_by_state", "items_by_phase", "below_target", "bytes"]
    assert [(u["name"], u["state"], u["replicas"]) for u in status["storages"]] == [
        ("disk-a", "online", 3),
        ("disk-b", "draining", 0),
    ]
    assert status["items_by_phase"] == {"GAS": 2, "LIQUID": 1} and status["bytes"] == 5000
    assert status["below_target"] == 1  # run/a.dat is LIQUID with one copy


def test_a_dotted_meta_key_set_by_ingest_is_found_by_the_filter(cli: Run, estate: Path) -> None:
    src = estate / "src" / "a.dat"
    cli("ingest", "-s", "disk-a", "--upload", str(src), "--name", "k.dat", "--meta", "obs.night=3",
        "--meta", "1x=on", "--meta", "a-b_c=2.5")  # fmt: skip
    found = cli("items", "list", "--where", "meta.obs.night = 3 and meta.1x = 'on' and meta.a-b_c > 2")
    assert [i["name"] for i in found] == ["k.dat"]
    assert found[0]["metadata"] == {"obs": {"night": 3}, "1x": "on", "a-b_c": 2.5}


def test_listing_pages_and_refuses_a_bad_limit(estate: Path, db_url: str) -> None:
    from lifecycle.errors import InvalidValueError

    with session_scope(db_url) as s:
        names = [(i.name, i.version) for i in public.list_items(session=s, limit=None)]
        page = [(i.name, i.version) for i in public.list_items(session=s, limit=2, offset=1)]
        assert page == names[1:3] == [("run/b.dat", 1), ("run/b.dat", 2)]
        with pytest.raises(InvalidValueError, match="invalid limit 0: must be at least 1"):
            public.list_items(session=s, limit=0)
        with pytest.raises(InvalidValueError, match="invalid offset -1"):
            public.list_items(session=s, offset=-1)
        for huge in ({"limit": 10**20}, {"offset": 10**20}):  # past the database's integers
            with pytest.raises(InvalidValueError, match="must be at most 9223372036854775807"):
                public.list_items(session=s, **huge)


def test_a_version_zero_or_past_int64_is_no_item(estate: Path, db_url: str) -> None:
    """NAME@v0 named the newest version (`dlm items delete NAME@v0 --yes` deleted it), and a
    version past the database's integers was an internal error: both are no item."""
    from lifecycle.errors import ItemNotFoundError

    with session_scope(db_url) as s:
        assert public.item_detail("run/b.dat@v2", session=s).version == 2
        for ref in ("run/b.dat@v0", "run/b.dat@v00", "run/b.dat@v99999999999999999999"):
            with pytest.raises(ItemNotFoundError, match="no item"):
                public.item_detail(ref, session=s)
