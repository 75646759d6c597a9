"""`dlm items set-meta`: metadata keys set on an item, the others kept, one event; the same
core operation `PATCH /api/items/{oid}` uses (tests/api/test_changes.py)."""

from __future__ import annotations

import json
from pathlib import Path

from lifecycle.catalogue.catalog import get_item
from lifecycle.catalogue.db import session_scope
from tests.factories import events_of, ingest_payloads, posix_storage


def test_set_meta_merges_keys_and_records_who(dlm, db_url: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with session_scope() as s:
        posix_storage(s, "hot", tmp_path / "hot")
    ingest_payloads("hot", {"obs/a.fits": b"a" * 10}, staging=tmp_path / "in")
    assert dlm("items", "set-meta", "obs/a.fits", "kind=raw", "obs.night=3").code == 0
    r = dlm("items", "set-meta", "obs/a.fits", "obs.band=r", "exposure=30.5", "--json")
    assert r.code == 0, r.err
    expected = {"kind": "raw", "obs": {"night": 3, "band": "r"}, "exposure": 30.5}
    assert json.loads(r.out) == expected
    with session_scope() as s:
        assert get_item("obs/a.fits", session=s).meta == expected
    assert events_of("obs/a.fits")[-1] == (
        "item.metadata_changed",
        {"set": {"obs.band": "r", "exposure": 30.5}},
    )
    listed = json.loads(dlm("items", "list", "--where", "meta.obs.band = 'r'", "--json").out)
    assert [i["name"] for i in listed] == ["obs/a.fits"]
