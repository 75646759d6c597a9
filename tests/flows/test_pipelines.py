"""The lifecycle flows end to end on real PostgreSQL/SQLite, SeaweedFS S3 and rclone, under Prefect."""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlmodel import col

from lifecycle import apply, catalog
from lifecycle.db import session_scope
from lifecycle.models import Event, Replica, Storage, StorageCreate, Transfer, utcnow
from lifecycle.pipelines import make_plan, policy_from
from lifecycle.states import Phase, ReplicaState, StorageKind, StorageState, Tier

pytestmark = [pytest.mark.prefect, pytest.mark.s3, pytest.mark.rclone]


@pytest.fixture
def estate(db_url: str, tmp_path: Path, s3_bucket: str, s3_env, flows_env) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """hot posix (site-a), warm posix (site-a), cold S3 (site-b)."""
    with session_scope() as s:
        for name, tier in (("hot", Tier.HOT), ("warm", Tier.WARM)):
            (tmp_path / name).mkdir()
            catalog.add_storage(
                s,
                StorageCreate(
                    name=name,
                    kind=StorageKind.POSIX,
                    root=str(tmp_path / name),
                    tier=tier,
                    location="site-a",
                    capacity_bytes=10**9,
                ),
            )
        catalog.add_storage(
            s,
            StorageCreate(
                name="cold",
                kind=StorageKind.S3,
                root=s3_bucket,
                endpoint=s3_env.endpoint,
                credentials_env="DLM_TEST_S3",
                tier=Tier.COLD,
                location="site-b",
            ),
        )
    return {"root": tmp_path, "bucket": s3_bucket, "s3": s3_env}


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
        st = catalog.get_storage(s, storage)
        for i in range(n):
            f = src / f"f{i}.dat"
            f.write_bytes(hashlib.sha256(f"{prefix}{i}".encode()).digest() * (size // 32))
            names.append(f"{prefix}/f{i}.dat")
        sources = catalog.plan_ingest(
            s, storage=st, paths=[str(src / f"f{i}.dat") for i in range(n)], upload=True
        )
        for srcobj, name in zip(sources, names, strict=True):
            srcobj.name = name
        catalog.ingest(
            s, storage=st, sources=sources, options=catalog.IngestOptions(phase=phase, lifetime=lifetime)
        )
    return names


def replicas_of(name: str) -> dict[str, str]:
    """storage name -> replica state, for the newest version of NAME."""
    with session_scope() as s:
        item = catalog.get_item(s, name)
        rows = s.execute(
            select(col(Storage.name), col(Replica.state))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(col(Replica.item_oid) == item.oid)
        ).all()
    return {n: st for n, st in rows if st != ReplicaState.DELETED}


def counts() -> dict[str, int]:
    with session_scope() as s:
        return dict(catalog.table_counts(s))


def s3_bytes(estate: dict[str, object], key: str) -> bytes:
    client = estate["s3"].client()  # type: ignore[attr-defined]
    body = client.get_object(Bucket=estate["bucket"], Key=key)["Body"]
    try:
        return body.read()
    finally:
        body.close()


def test_replicate_posix_to_s3_bytes_catalogue_events(estate: dict[str, object]) -> None:
    from flows.pipelines import replicate

    root = estate["root"]
    names = ingest(root, "hot", 5, phase=Phase.LIQUID)  # type: ignore[arg-type]
    report = replicate()
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
        original = (root / "hot" / path).read_bytes()  # type: ignore[operator]
        copy = s3_bytes(estate, path) if storage == "cold" else (root / storage / path).read_bytes()  # type: ignore[operator]
        assert copy == original
    # a second run has nothing to do
    again = replicate()
    assert again["plan"]["copies"] == 0 and again["copied"] == 0


def test_dry_run_changes_nothing(estate: dict[str, object]) -> None:
    from flows.pipelines import expire, migrate, rebalance, replicate

    ingest(estate["root"], "hot", 3, phase=Phase.SOLID)  # type: ignore[arg-type]
    before = counts()
    report = replicate(dry_run=True)
    assert report["plan"]["copies"] == 6  # SOLID: two more copies each
    assert {a["action"] for a in report["actions"]} == {"copy"}
    for f in (migrate, expire, rebalance):
        f(dry_run=True)
    assert counts() == before
    # nothing but the storages' markers (written by storage add)
    assert [p.name for p in (estate["root"] / "warm").iterdir()] == [".dlm-storage"]  # type: ignore[operator]
    client = estate["s3"].client()  # type: ignore[attr-defined]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=estate["bucket"]).get("Contents", [])]
    assert keys == [".dlm-storage"]


def test_solid_spans_locations_and_cold_tier(estate: dict[str, object]) -> None:
    from flows.pipelines import replicate

    [name] = ingest(estate["root"], "hot", 1, phase=Phase.SOLID)  # type: ignore[arg-type]
    replicate()
    assert replicas_of(name) == {"hot": "READY", "warm": "READY", "cold": "READY"}


def test_expire_item_deletes_copies_and_leaves_tombstone(estate: dict[str, object]) -> None:
    from flows.pipelines import expire, replicate

    root = estate["root"]
    [name] = ingest(root, "hot", 1, phase=Phase.LIQUID, prefix="old")  # type: ignore[arg-type]
    [keep] = ingest(root, "hot", 1, phase=Phase.GAS, prefix="keep")  # type: ignore[arg-type]
    replicate()
    assert len(replicas_of(name)) == 2
    with session_scope() as s:
        catalog.set_expiry(s, name, utcnow() - timedelta(seconds=1))
    report = expire()
    assert report["deleted"] == 2
    with session_scope() as s:
        item = catalog.get_item(s, name)
        assert item.state == "DELETED"
        kinds = [e.kind for e in s.scalars(select(Event).where(col(Event.item_oid) == item.oid))]
    assert "item.expired" in kinds and "item.deleted" in kinds and kinds.count("replica.deleted") == 2
    assert replicas_of(name) == {}
    assert not (root / "hot" / name).exists()  # type: ignore[operator]
    assert (root / "hot" / keep).exists()  # type: ignore[operator]
    assert replicas_of(keep) == {"hot": "READY"}


def test_replica_expiry_refused_when_it_would_break_the_phase(estate: dict[str, object]) -> None:
    from flows.pipelines import expire, replicate

    [name] = ingest(estate["root"], "hot", 1, phase=Phase.LIQUID)  # type: ignore[arg-type]
    replicate()
    with session_scope() as s:
        item = catalog.get_item(s, name)
        rep = s.scalars(select(Replica).where(col(Replica.item_oid) == item.oid)).first()
        assert rep is not None
        rep.expires_at = utcnow() - timedelta(hours=1)
        s.add(rep)
    report = expire()
    assert report["deleted"] == 0 and report["plan"]["refusals"] == 1
    assert len(replicas_of(name)) == 2
    with session_scope() as s:
        refused = s.scalars(select(Event).where(col(Event.kind) == "policy.refused")).all()
    assert len(refused) == 1 and "phase" in refused[0].details["reason"]


def test_phase_change_then_migrate_adds_then_drops(estate: dict[str, object]) -> None:
    from flows.pipelines import migrate, replicate

    [name] = ingest(estate["root"], "hot", 1, phase=Phase.GAS)  # type: ignore[arg-type]
    with session_scope() as s:
        catalog.set_phase(s, name, Phase.SOLID)
    replicate()
    assert len(replicas_of(name)) == 3
    with session_scope() as s:
        catalog.set_phase(s, name, Phase.GAS)
    report = migrate()
    assert report["deleted"] == 2
    left = replicas_of(name)
    assert list(left.values()) == ["READY"]


def test_drain_rebalance_then_retire(estate: dict[str, object]) -> None:
    from flows.pipelines import rebalance

    names = ingest(estate["root"], "warm", 3, phase=Phase.GAS)  # type: ignore[arg-type]
    with session_scope() as s:
        catalog.set_storage_state(s, "warm", StorageState.DRAINING)
    first = rebalance()
    assert first["copied"] == 3
    second = rebalance()
    assert second["deleted"] == 3
    for name in names:
        assert "warm" not in replicas_of(name) and len(replicas_of(name)) == 1
    third = rebalance()
    assert third["plan"]["drained"] == 1
    with session_scope() as s:
        catalog.set_storage_state(s, "warm", StorageState.RETIRED)
        assert s.scalars(select(Event).where(col(Event.kind) == "storage.drained")).first() is not None
    assert list((estate["root"] / "warm").rglob("*.dat")) == []  # type: ignore[operator]


def test_s3_refusing_writes_leaves_failed_transfers_and_no_ready_claim(
    estate: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipelines import replicate

    names = ingest(estate["root"], "hot", 3, phase=Phase.SOLID)  # type: ignore[arg-type]
    monkeypatch.setenv("DLM_TEST_S3_SECRET_ACCESS_KEY", "wrong-secret")
    report = replicate()
    assert report["failed"] == 3
    with session_scope() as s:
        cold = catalog.get_storage(s, "cold")
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
    monkeypatch.setenv("DLM_TEST_S3_SECRET_ACCESS_KEY", estate["s3"].secret_key)  # type: ignore[attr-defined]
    again = replicate()
    assert again["copied"] == 3 and again["below_target_after"] == 0


def test_a_source_that_lost_the_items_bytes_is_not_copied(estate: dict[str, object]) -> None:
    """rclone's own hash check agrees at both ends, but with bytes that are not the item's: the
    copy is refused against the catalogue and removed, the other item lands."""
    from flows.pipelines import replicate

    bad, good = ingest(estate["root"], "hot", 2, phase=Phase.LIQUID)  # type: ignore[arg-type]
    source = estate["root"] / "hot" / bad  # type: ignore[operator]
    source.write_bytes(b"x" * source.stat().st_size)  # same size, other bytes
    report = replicate()
    assert report["copied"] == 1 and report["failed"] == 1
    assert replicas_of(bad) == {"hot": "READY"}
    assert replicas_of(good) == {"hot": "READY", "warm": "READY"}
    assert not (estate["root"] / "warm" / bad).exists()  # type: ignore[operator]
    with session_scope() as s:
        [failed] = s.scalars(select(Transfer).where(col(Transfer.state) == "FAILED")).all()
    assert failed.error is not None and "no longer holds the item's bytes" in failed.error


def test_a_path_taken_by_another_item_is_not_planned_as_a_destination(estate: dict[str, object]) -> None:
    """Planning reads other items' live rows at the chunk's paths: the copy goes elsewhere."""
    a, b = ingest(estate["root"], "hot", 2, phase=Phase.GAS)  # type: ignore[arg-type]
    with session_scope() as s:
        catalog.set_phase(s, a, Phase.LIQUID)
        warm = catalog.get_storage(s, "warm")
        other = catalog.get_item(s, b)
        s.add(Replica(item_oid=other.oid, storage_id=warm.id, path=a, state=ReplicaState.READY))
    with session_scope() as s:
        plan = make_plan(s, "replicate")
        names = {st.id: st.name for st in s.scalars(select(Storage))}
    assert [(names[c.dst_storage_id], c.dst_path) for c in plan.copies] == [("cold", a)]


def test_checkout_verified(estate: dict[str, object], tmp_path: Path) -> None:
    from flows.checkout import checkout_flow
    from flows.pipelines import replicate

    names = ingest(estate["root"], "hot", 2, phase=Phase.LIQUID)  # type: ignore[arg-type]
    replicate()
    with session_scope() as s:
        catalog.set_storage_state(s, "hot", StorageState.OFFLINE)  # must come from the other copy
    out = tmp_path / "out"
    result = checkout_flow(str(out), items=names)
    assert result["files"] == 2 and not result["failed"]
    for name in names:
        assert (out / name).read_bytes() == (estate["root"] / "hot" / name).read_bytes()  # type: ignore[operator]


@pytest.mark.postgres
def test_two_concurrent_replicate_runs_copy_nothing_twice(pg_db_url: str, estate: dict[str, object]) -> None:
    ingest(estate["root"], "hot", 20, phase=Phase.LIQUID)  # type: ignore[arg-type]
    with session_scope() as s:
        plans = [make_plan(s, "replicate"), make_plan(s, "replicate")]
    assert len(plans[0].copies) == len(plans[1].copies) == 20
    results: list[apply.BatchResult] = []
    barrier = threading.Barrier(2)

    def run(plan: apply.Plan) -> None:
        barrier.wait()
        for b in apply.batch_copies(plan.copies, max_files=7, max_bytes=10**9):
            results.append(apply.apply_copy_batch(b, actor="test"))

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


def test_deletions_rechecked_at_apply_time(estate: dict[str, object]) -> None:
    """Two stale plans that each delete a different copy of a LIQUID->GAS item cannot both apply."""
    from flows.pipelines import replicate

    [name] = ingest(estate["root"], "hot", 1, phase=Phase.LIQUID)  # type: ignore[arg-type]
    replicate()
    with session_scope() as s:
        item = catalog.get_item(s, name)
        reps = s.scalars(select(Replica).where(col(Replica.item_oid) == item.oid)).all()
        assert len(reps) == 2
        item_oid = item.oid
    from lifecycle.planner import DeleteReplica

    policy = policy_from()
    results = [
        apply.apply_delete_batch(
            apply.DeleteBatch(
                r.storage_id, (DeleteReplica(r.uid, item_oid, r.storage_id, r.path, 1, "test"),)
            ),
            policy=policy,
        )
        for r in reps
    ]
    assert sum(r.done for r in results) == 0  # LIQUID needs both
    with session_scope() as s:
        catalog.set_phase(s, name, Phase.GAS)
    results = [
        apply.apply_delete_batch(
            apply.DeleteBatch(
                r.storage_id, (DeleteReplica(r.uid, item_oid, r.storage_id, r.path, 1, "test"),)
            ),
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
