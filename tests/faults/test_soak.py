"""Soak: rounds of random operations and faults; after every round no live item has lost its last
intact copy and reconcile finds the catalogue and the storages in agreement.

Scaled by DLM_SOAK_ITEMS (items ingested over the run, default 200) and DLM_SOAK_ROUNDS (default
5); the issue's long run is DLM_SOAK_ITEMS=10000 DLM_SOAK_ROUNDS=20.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlmodel import col

from lifecycle.catalogue.bulk import register_from_list
from lifecycle.catalogue.catalog import set_expiry, set_phase, status
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Item, Replica, Storage, StorageCreate, utcnow
from lifecycle.catalogue.storages import add_storage, get_storage, set_storage_state
from lifecycle.states import ItemState, Phase, StorageKind, StorageState, Tier
from tests.faults.conftest import assert_truthful, kill_group

pytestmark = [pytest.mark.prefect, pytest.mark.s3, pytest.mark.rclone, pytest.mark.slow, pytest.mark.postgres]

ITEMS = int(os.environ.get("DLM_SOAK_ITEMS", "200"))
ROUNDS = int(os.environ.get("DLM_SOAK_ROUNDS", "5"))
SEED = int(os.environ.get("DLM_SOAK_SEED", "7"))


def _storages(tmp: Path, s3, bucket: str) -> None:  # type: ignore[no-untyped-def]
    with session_scope() as s:
        for name, tier, loc in (("a", Tier.HOT, "x"), ("b", Tier.WARM, "x"), ("c", Tier.WARM, "y")):
            (tmp / name).mkdir()
            add_storage(
                StorageCreate(
                    name=name, kind=StorageKind.POSIX, root=str(tmp / name), tier=tier, location=loc
                ),
                session=s,
            )
        add_storage(
            StorageCreate(
                name="s3",
                kind=StorageKind.S3,
                root=bucket,
                endpoint=s3.endpoint,
                credentials_env="DLM_TEST_S3",
                tier=Tier.COLD,
                location="y",
            ),
            session=s,
        )


def _ingest(tmp: Path, start: int, n: int, rng: random.Random) -> None:
    """n new files on storage a, registered through the bulk path (real md5s)."""
    lines = []
    for i in range(start, start + n):
        name = f"soak/{i // 100:04d}/f{i:06d}.dat"
        data = rng.randbytes(rng.randint(100, 4000))
        p = tmp / "a" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        phase = rng.choice(["GAS", "LIQUID", "LIQUID", "SOLID"])
        lines.append(
            json.dumps(
                {
                    "name": name,
                    "size": len(data),
                    "checksum": hashlib.md5(data).hexdigest(),
                    "phase": phase,
                    "metadata": {"round": start},
                }
            )
        )
    listing = tmp / f"list-{start}.jsonl"
    listing.write_text("\n".join(lines) + "\n")
    with session_scope() as s:
        register_from_list(s, storage=get_storage("a", session=s), source=listing)


def _random_ops(tmp: Path, rng: random.Random, log: list[str]) -> None:
    with session_scope() as s:
        live = list(s.scalars(select(Item).where(col(Item.state) == ItemState.READY)))
        for item in rng.sample(live, min(len(live), max(1, len(live) // 20))):
            phase = rng.choice(list(Phase))
            set_phase(str(item.oid), phase, session=s)
        for item in rng.sample(live, min(len(live), max(1, len(live) // 30))):
            set_expiry(str(item.oid), utcnow(), session=s)
        log.append(f"phase changes and expiries on {len(live)} live items")
        storages = {st.name: st for st in s.scalars(select(Storage))}
        if storages["b"].state == StorageState.ONLINE and rng.random() < 0.4:
            set_storage_state("b", StorageState.DRAINING, session=s)
            log.append("drain b")
        elif storages["b"].state == StorageState.DRAINING and rng.random() < 0.5:
            set_storage_state("b", StorageState.ONLINE, session=s)
            log.append("b back online")
        # corrupt one posix copy of an item that has another intact copy
        rows = s.execute(
            select(col(Replica.path), col(Storage.name), col(Replica.item_oid))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(col(Replica.state) == "READY", col(Storage.kind) == "posix")
        ).all()
        counts: dict[object, int] = {}
        for _, _, oid in rows:
            counts[oid] = counts.get(oid, 0) + 1
        spare = [r for r in rows if counts[r[2]] >= 2]
        if spare:
            path, sname, _ = rng.choice(spare)
            f = tmp / sname / path
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
            log.append(f"flipped a byte in {sname}:{path}")


def test_soak(pg_db_url: str, tmp_path: Path, s3_env, s3_bucket, dlm_proc) -> None:  # type: ignore[no-untyped-def]
    from flows.integrity import reconcile, verify
    from flows.pipelines import expire, rebalance, replicate

    rng = random.Random(SEED)
    _storages(tmp_path, s3_env, s3_bucket)
    per_round = max(1, ITEMS // ROUNDS)
    figures = {"kills": 0, "corruptions_repaired": 0, "copies": 0, "deletions": 0, "items_lost": 0}
    started = time.monotonic()
    for rnd in range(ROUNDS):
        log: list[str] = []
        _ingest(tmp_path, rnd * per_round, per_round, rng)
        if rnd:
            _random_ops(tmp_path, rng, log)
        if rnd % 3 == 1:  # a replicate run killed at a random moment
            p = dlm_proc(
                "run", "replicate", env={"RCLONE_BWLIMIT": "200k", "DLM_TRANSFER__BATCH_FILES": "25"}
            )
            time.sleep(rng.uniform(2.0, 8.0))
            kill_group(p)
            figures["kills"] += 1
            log.append("killed a replicate run")
        v = verify(budget="1GiB").as_json()
        figures["corruptions_repaired"] += v.get("repaired", 0)
        for flow in (replicate, expire, rebalance, replicate, rebalance):
            r = flow().as_json()
            figures["copies"] += r.get("copied", 0)
            figures["deletions"] += r.get("deleted", 0)
        # invariants after every round
        assert_truthful(s3_env, s3_bucket, tmp_path)
        with session_scope() as s:
            corrupted = s.scalars(select(Item).where(col(Item.state) == ItemState.CORRUPTED)).all()
            figures["items_lost"] = len(corrupted)
            assert not corrupted, (
                f"round {rnd}: items lost their last intact copy: {[i.name for i in corrupted]}"
            )
            below = status(session=s).below_target
        for name in ("a", "b", "c", "s3"):
            rec = reconcile(storage=name, dry_run=True).as_json()
            assert rec["unknown"] == 0 and rec["missing"] == 0, (rnd, name, rec)
        print(f"round {rnd}: {'; '.join(log)}; below target {below}")
    figures["seconds"] = round(time.monotonic() - started)
    print("SOAK", json.dumps({"items": ITEMS, "rounds": ROUNDS, **figures}))
    assert figures["items_lost"] == 0
