"""Reconcile --adopt applies the item-name rules: a file whose path is no valid item name (an
'@', whitespace at a segment's end) is reported, not adopted, and stays untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import col

from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Item, StorageCreate
from lifecycle.catalogue.storages import add_storage
from lifecycle.states import StorageKind, Tier

pytestmark = [pytest.mark.prefect, pytest.mark.rclone]


def test_files_named_like_versions_or_with_padded_segments_are_reported_not_adopted(
    db_url: str, tmp_path: Path, flows_env: None
) -> None:
    from flows.integrity import reconcile

    root = tmp_path / "warm"
    (root / "lab").mkdir(parents=True)
    files = {"lab/ok.dat": b"fine", "lab/n@v2": b"looks like version 2 of n", "lab/trailing.dat ": b"pad"}
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    with session_scope() as s:
        add_storage(
            StorageCreate(name="warm", kind=StorageKind.POSIX, root=str(root), tier=Tier.WARM), session=s
        )

    report = reconcile(storage="warm", adopt=True).as_json()

    assert report["adopted"] == 1, report["unknown_objects"]
    notes = {o["path"]: o["note"] for o in report["unknown_objects"]}
    assert "version separator" in notes["lab/n@v2"]
    assert "whitespace" in notes["lab/trailing.dat "]
    assert notes["lab/ok.dat"] == ""
    with session_scope() as s:
        names = set(s.scalars(select(col(Item.name))).all())
    assert names == {"lab/ok.dat"}
    for rel, data in files.items():  # reported, never moved or removed
        assert hashlib.sha256((root / rel).read_bytes()).digest() == hashlib.sha256(data).digest()
