"""The lifecycle flows end to end on real PostgreSQL/SQLite, SeaweedFS S3 and rclone, under Prefect."""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlmodel import col

from lifecycle.apply.copy import apply_copy_batch
from lifecycle.apply.delete import apply_delete_batch
from lifecycle.apply.result import BatchResult
from lifecycle.catalogue import catalog, storages
from lifecycle.catalogue import ingest as ingesting
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Event, Replica, Storage, Transfer, utcnow
from lifecycle.planning.pipelines import make_plan, policy_from
from lifecycle.planning.plan import DeleteBatch, Plan, batch_copies
from lifecycle.states import Phase, ReplicaState, StorageState
from tests.factories import Estate, three_tier_estate

pytestmark = [pytest.mark.prefect, pytest.mark.s3, pytest.mark.rclone]


@pytest.fixture
def estate(db_url: str, tmp_path: Path, s3_bucket: str, s3_env: object, flows_env: None) -> Estate:
    """hot posix (site-a), warm posix (site-a), cold S3 (site-b)."""
    return three_tier_estate(tmp_path, server=s3_env, bucket=s3_bucket, posix_capacity_bytes=10**9)


def ingest(
    tmp: Path,
    storage: str,
    n: int,
    *,
    phase: Phase,
    prefix: str = "obs",
    lifetime: timedelta | None = None,
    size: int = 3000,
) -> list[str]:
    src = tmp / f"src-{prefix}"
    src.mkdir(exist_ok=True)
    names = []
    with session_scope() as s:
        st = storages.get_storage(storage, session=s)
        for i in range(n):
            f = src / f"f{i}.dat"
            f.write_bytes(hashlib.sha256(f"{prefix}{i}".encode()).digest() * (size // 32))
            names.append(f"{prefix}/f{i}.dat")
        sources = ingesting.plan_ingest(
            storage=st, paths=[str(src / f"f{i}.dat") for i in range(n)], upload=True, session=s
        )
        for srcobj, name in zip(sources, names, strict=True):
            srcobj.name = name
        ingesting.ingest(
            storage=st,
            sources=sources,
            options=ingesting.IngestOptions(phase=phase, lifetime=lifetime),
            session=s,
        )
    return names


def replicas_of(name: str) -> dict[str, str]:
    """storage name -> replica state, for the newest version of NAME."""
    with session_scope() as s:
        item = catalog.get_item(name, session=s)
        rows = s.execute(
            select(col(Storage.name), col(Replica.state))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(col(Replica.item_oid) == item.oid)
        ).all()
    return {n: st for n, st in rows if st != ReplicaState.DELETED}


def counts() -> dict[str, int]:
    with session_scope() as s:
        return dict(catalog.table_counts(session=s))


def s3_bytes(estate: Estate, key: str) -> bytes:
    client = estate.s3.client()
    body = client.get_object(Bucket=estate.bucket, Key=key)["Body"]
    try:
        return bytes(body.read())
    finally:
        body.close()


def test_replicate_posix_to_s3_bytes_catalogue_events(estate: Estate) -> None:
    from flows.pipelines import replicate

    root = estate.root
    names = ingest(root, "hot", 5, phase=Phase.LIQUID)
    report = replicate().as_json()
    assert report["copied"] == 5 and report["failed"] == 0
    assert report["below_target_after"] == 0
    for name in names:
        assert replicas_of(name) == {"hot": "READY", "cold": "READY"} or replicas_of(name) == {
            "hot": "READY",
            "warm": "READY",
        }
    # bytes at the destination equal the source, wherever the planner put them
    with session_scope() as s:
        rows = s.execute(
            select(col(Replica.path), col(Storage.name))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(col(Storage.name) != "hot")
        ).all()
        done = s.execute(
            select(func.count()).select_from(Transfer).where(col(Transfer.state) == "DONE")
        ).one()[0]
        created = s.execute(
            select(func.count()).select_from(Event).where(col(Event.kind) == "replica.created")
        ).one()[0]
    assert len(rows) == 5 and done == 5 and created == 10  # 5 at ingest + 5 copies
    for path, storage in rows:
        original = (root / "hot" / path).read_bytes()
        copy = s3_bytes(estate, path) if storage == "cold" else (root / storage / path).read_bytes()
        assert copy == original
    # a second run has nothing to do
    again = replicate().as_json()
    assert again["plan"]["copies"] == 0 and again["copied"] == 0


def test_dry_run_changes_nothing(estate: Estate) -> None:
    from flows.pipelines import expire, migrate, rebalance, replicate

    ingest(estate.root, "hot", 3, phase=Phase.SOLID)
    before = counts()
    report = replicate(dry_run=True).as_json()
    assert report["plan"]["copies"] == 6  # SOLID: two more copies each
    assert {a["action"] for a in report["actions"]} == {"copy"}
    for f in (migrate, expire, rebalance):
        f(dry_run=True)
    assert counts() == before
    # nothing but the storages' markers (written by storage add)
    assert [p.name for p in (estate.root / "warm").iterdir()] == [".dlm-storage"]
    client = estate.s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=estate.bucket).get("Contents", [])]
    assert keys == [".dlm-storage"]


def test_solid_spans_locations_and_cold_tier(estate: Estate) -> None:
    from flows.pipelines import replicate

    [name] = ingest(estate.root, "hot", 1, phase=Phase.SOLID)
    replicate()
    assert replicas_of(name) == {"hot": "READY", "warm": "READY", "cold": "READY"}


def test_expire_item_deletes_copies_and_leaves_tombstone(estate: Estate) -> None:
    from flows.pipelines import expire, replicate

    root = estate.root
    [name] = ingest(root, "hot", 1, phase=Phase.LIQUID, prefix="old")
    [keep] = ingest(root, "hot", 1, phase=Phase.GAS, prefix="keep")
    replicate()
    assert len(replicas_of(name)) == 2
    with session_scope() as s:
        catalog.set_expiry(name, utcnow() - timedelta(seconds=1), session=s)
    report = expire().as_json()
    assert report["deleted"] == 2
    with session_scope() as s:
        item = catalog.get_item(name, session=s)
        assert item.state == "DELETED"
        kinds = [e.kind for e in s.scalars(select(Event).where(col(Event.item_oid) == item.oid))]
    assert "item.expired" in kinds and "item.deleted" in kinds and kinds.count("replica.deleted") == 2
    assert replicas_of(name) == {}
    assert not (root / "hot" / name).exists()
    assert (root / "hot" / keep).exists()
    assert replicas_of(keep) == {"hot": "READY"}


def test_replica_expiry_refused_when_it_would_break_the_phase(estate: Estate) -> None:
    from flows.pipelines import expire, replicate

    [name] = ingest(estate.root, "hot", 1, phase=Phase.LIQUID)
    replicate()
    with session_scope() as s:
        item = catalog.get_item(name, session=s)
        rep = s.scalars(select(Replica).where(col(Replica.item_oid) == item.oid)).first()
        assert rep is not None
        rep.expires_at = utcnow() - timedelta(hours=1)
        s.add(rep)
    report = expire().as_json()
    assert report["deleted"] == 0 and report["plan"]["refusals"] == 1
    assert len(replicas_of(name)) == 2
    with session_scope() as s:
        refused = s.scalars(select(Event).where(col(Event.kind) == "policy.refused")).all()
    assert len(refused) == 1 and "phase" in refused[0].details["reason"]


def test_phase_change_then_migrate_adds_then_drops(estate: Estate) -> None:
    from flows.pipelines import migrate, replicate

    [name] = ingest(estate.root, "hot", 1, phase=Phase.GAS)
    with session_scope() as s:
        catalog.set_phase(name, Phase.SOLID, session=s)
    replicate()
    assert len(replicas_of(name)) == 3
    with session_scope() as s:
        catalog.set_phase(name, Phase.GAS, session=s)
    report = migrate().as_json()
    assert report["deleted"] == 2
    left = replicas_of(name)
    assert list(left.values()) == ["READY"]


def test_drain_rebalance_then_retire(estate: Estate) -> None:
    from flows.pipelines import rebalance

    names = ingest(estate.root, "warm", 3, phase=Phase.GAS)
    with session_scope() as s:
        storages.set_storage_state("warm", StorageState.DRAINING, session=s)
    first = rebalance().as_json()
    assert first["copied"] == 3
    second = rebalance().as_json()
    assert second["deleted"] == 3
    for name in names:
        assert "warm" not in replicas_of(name) and len(replicas_of(name)) == 1
    third = rebalance().as_json()
    assert third["plan"]["drained"] == 1
    with session_scope() as s:
        storages.set_storage_state("warm", StorageState.RETIRED, session=s)
        assert s.scalars(select(Event).where(col(Event.kind) == "storage.drained")).first() is not None
    assert list((estate.root / "warm").rglob("*.dat")) == []


def test_s3_refusing_writes_leaves_failed_transfers_and_no_ready_claim(
    estate: Estate, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipelines import replicate

    names = ingest(estate.root, "hot", 3, phase=Phase.SOLID)
    monkeypatch.setenv("DLM_TEST_S3_SECRET_ACCESS_KEY", "wrong-secret")
    report = replicate().as_json()
    assert report["failed"] == 3
    with session_scope() as s:
        cold = storages.get_storage("cold", session=s)
        on_cold = s.execute(
            select(func.count()).select_from(Replica).where(col(Replica.storage_id) == cold.id)
        ).one()[0]
        failed = s.scalars(select(Transfer).where(col(Transfer.state) == "FAILED")).all()
        events = s.execute(
            select(func.count()).select_from(Event).where(col(Event.kind) == "transfer.failed")
        ).one()[0]
    assert on_cold == 0  # the catalogue claims no copy that is not there
    assert len(failed) == 3 and all(t.error for t in failed) and events == 3
    for name in names:
        assert replicas_of(name) == {"hot": "READY", "warm": "READY"}  # what could land, landed
    monkeypatch.setenv("DLM_TEST_S3_SECRET_ACCESS_KEY", estate.s3.secret_key)
    again = replicate().as_json()
    assert again["copied"] == 3 and again["below_target_after"] == 0


def test_a_source_that_lost_the_items_bytes_is_not_copied(estate: Estate) -> None:
    """rclone's own hash check agrees at both ends, but with bytes that are not the item's: the
    copy is refused against the catalogue and removed, the other item lands."""
    from flows.pipelines import replicate

    bad, good = ingest(estate.root, "hot", 2, phase=Phase.LIQUID)
    source = estate.root / "hot" / bad
    source.write_bytes(b"x" * source.stat().st_size)  # same size, other bytes
    report = replicate().as_json()
    assert report["copied"] == 1 and report["failed"] == 1
    assert replicas_of(bad) == {"hot": "READY"}
    assert replicas_of(good) == {"hot": "READY", "warm": "READY"}
    assert not (estate.root / "warm" / bad).exists()
    with session_scope() as s:
        [failed] = s.scalars(select(Transfer).where(col(Transfer.state) == "FAILED")).all()
    assert failed.error is not None and "no longer holds the item's bytes" in failed.error


def test_a_path_taken_by_another_item_is_not_planned_as_a_destination(estate: Estate) -> None:
    """Planning reads other items' live rows at the chunk's paths: the copy goes elsewhere."""
    a, b = ingest(estate.root, "hot", 2, phase=Phase.GAS)
    with session_scope() as s:
        catalog.set_phase(a, Phase.LIQUID, session=s)
        warm = storages.get_storage("warm", session=s)
        other = catalog.get_item(b, session=s)
        s.add(Replica(item_oid=other.oid, storage_id=warm.id, path=a, state=ReplicaState.READY))
    with session_scope() as s:
        plan = make_plan(s, "replicate")
        names = {st.id: st.name for st in s.scalars(select(Storage))}
    assert [(names[c.dst_storage_id], c.dst_path) for c in plan.copies] == [("cold", a)]


def test_checkout_verified(estate: Estate, tmp_path: Path) -> None:
    from flows.checkout import checkout_flow
    from flows.pipelines import replicate

    names = ingest(estate.root, "hot", 2, phase=Phase.LIQUID)
    replicate()
    with session_scope() as s:
        storages.set_storage_state("hot", StorageState.OFFLINE, session=s)  # must come from the other copy
    out = tmp_path / "out"
    result = checkout_flow(str(out), items=names)
    assert result["files"] == 2 and not result["failed"]
    for name in names:
        assert (out / name).read_bytes() == (estate.root / "hot" / name).read_bytes()


def test_checkout_never_replaces_a_users_different_file(estate: Estate, tmp_path: Path) -> None:
    """A file of the same name already in the checkout directory: the same bytes count as
    checked out, other bytes are left as they are and the item is reported failed."""
    from flows.checkout import checkout_flow

    names = ingest(estate.root, "hot", 2, phase=Phase.GAS)
    out = tmp_path / "out"
    out.mkdir()
    (out / names[0]).parent.mkdir(parents=True, exist_ok=True)
    (out / names[0]).write_bytes(b"the user's own work, not DLM's")
    same = (estate.root / "hot" / names[1]).read_bytes()
    (out / names[1]).parent.mkdir(parents=True, exist_ok=True)
    (out / names[1]).write_bytes(same)
    result = checkout_flow(str(out), items=names)
    assert (out / names[0]).read_bytes() == b"the user's own work, not DLM's"
    assert (out / names[1]).read_bytes() == same
    assert list(result["failed"]) == [names[0]]
    assert "already exists" in str(result["failed"][names[0]])


@pytest.mark.postgres
def test_two_concurrent_replicate_runs_copy_nothing_twice(pg_db_url: str, estate: Estate) -> None:
    ingest(estate.root, "hot", 20, phase=Phase.LIQUID)
    with session_scope() as s:
        plans = [make_plan(s, "replicate"), make_plan(s, "replicate")]
    assert len(plans[0].copies) == len(plans[1].copies) == 20
    results: list[BatchResult] = []
    barrier = threading.Barrier(2)

    def run(plan: Plan) -> None:
        barrier.wait()
        for b in batch_copies(plan.copies, max_files=7, max_bytes=10**9):
            results.append(apply_copy_batch(b, actor="test"))

    threads = [threading.Thread(target=run, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r.done for r in results) == 20
    assert sum(r.skipped for r in results) == 20
    with session_scope() as s:
        transfers = s.execute(select(func.count()).select_from(Transfer)).one()[0]
        per_item = s.execute(
            select(col(Replica.item_oid), func.count()).group_by(col(Replica.item_oid))
        ).all()
    assert transfers == 20
    assert all(n == 2 for _, n in per_item)


def test_deletions_rechecked_at_apply_time(estate: Estate) -> None:
    """Two stale plans that each delete a different copy of a LIQUID->GAS item cannot both apply."""
    from flows.pipelines import replicate

    [name] = ingest(estate.root, "hot", 1, phase=Phase.LIQUID)
    replicate()
    with session_scope() as s:
        item = catalog.get_item(name, session=s)
        reps = s.scalars(select(Replica).where(col(Replica.item_oid) == item.oid)).all()
        assert len(reps) == 2
        item_oid = item.oid
    from lifecycle.planning.actions import DeleteReplica

    policy = policy_from()
    results = [
        apply_delete_batch(
            DeleteBatch(r.storage_id, (DeleteReplica(r.uid, item_oid, r.storage_id, r.path, 1, "test"),)),
            policy=policy,
        )
        for r in reps
    ]
    assert sum(r.done for r in results) == 0  # LIQUID needs both
    with session_scope() as s:
        catalog.set_phase(name, Phase.GAS, session=s)
    results = [
        apply_delete_batch(
            DeleteBatch(r.storage_id, (DeleteReplica(r.uid, item_oid, r.storage_id, r.path, 1, "test"),)),
            policy=policy,
        )
        for r in reps
    ]
    assert sum(r.done for r in results) == 1  # the second would remove the last copy
    assert list(replicas_of(name).values()) == ["READY"]
    with session_scope() as s:
        refusals = s.scalars(select(Event).where(col(Event.kind) == "policy.refused")).all()
    assert len(refusals) == 3
    assert any("last intact copy" in e.details["reason"] for e in refusals)
