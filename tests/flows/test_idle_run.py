"""A run with nothing to do: `dlm run` tells so without Prefect (flows/plan_report.idle_report),
and leaves every run that has something to do (recover, copy, tombstone) to the flow.

The report it gives is the flow's own for the same catalogue, so `dlm run --json` reads the
same whichever path answered.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from sqlmodel import col

from flows.plan_report import idle_report
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Item, Replica, Storage
from lifecycle.reports import PipelineReport
from lifecycle.runs import PLACEMENT, Pipeline
from lifecycle.states import ItemState, Phase, ReplicaState, StorageState, Tier
from tests.factories import copies_of, ingest_payloads, payload, posix_storage, states_of

pytestmark = [pytest.mark.prefect, pytest.mark.rclone]
# what these tests check does not depend on the database (the checks' SQL runs on both in
# test_work_of_any_kind_goes_to_the_flow)
SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


@pytest.fixture
def two_disks(db_url: str, tmp_path: Path, flows_env: None) -> Path:
    """Posix storages 'hot' and 'warm'; two LIQUID items on 'hot', replicated by a flow run."""
    from flows.pipelines import replicate

    with session_scope() as s:
        posix_storage(s, "hot", tmp_path / "hot")
        posix_storage(s, "warm", tmp_path / "warm", tier=Tier.WARM)
    items = {n: payload(n) for n in ("a.dat", "b.dat")}
    ingest_payloads("hot", items, staging=tmp_path / "in", phase=Phase.LIQUID)
    first = replicate()
    assert isinstance(first, PipelineReport) and first.copied == 2
    return tmp_path


def _comparable(report: PipelineReport) -> dict[str, Any]:
    data = report.as_json()
    data.pop("stages")
    data.pop("nothing_to_do", None)
    return data


@SQLITE_ONLY
def test_nothing_to_do_is_the_flows_report_without_a_flow_run(two_disks: Path) -> None:
    from flows.registry import FLOWS

    for pipeline in PLACEMENT:
        idle = idle_report(pipeline)
        assert idle is not None, pipeline
        assert idle.nothing_to_do and not idle.dry_run and not idle.has_failures
        flowed = FLOWS[pipeline]()  # the flow on the same catalogue: it found nothing either
        assert isinstance(flowed, PipelineReport) and flowed.nothing_to_do is None
        assert _comparable(idle) == _comparable(flowed), pipeline
        assert set(idle.stages) <= set(flowed.stages)
    assert idle_report(Pipeline.REPLICATE) is not None  # and the flows changed nothing


@SQLITE_ONLY
def test_a_shortfall_alone_is_nothing_to_do(two_disks: Path) -> None:
    with session_scope() as s:
        s.execute(update(Storage).where(col(Storage.name) == "warm").values(state=StorageState.OFFLINE.value))
    ingest_payloads("hot", {"c.dat": payload("c.dat")}, staging=two_disks / "in2", phase=Phase.LIQUID)

    idle = idle_report(Pipeline.REPLICATE)

    # every item lacks its second copy now ('warm' is offline), and nothing can be done about it
    assert idle is not None and (idle.plan.copies, idle.plan.shortfalls) == (0, 3)
    assert [a.action for a in idle.actions] == ["shortfall"] * 3 and idle.below_target_after == 3


def test_work_of_any_kind_goes_to_the_flow(two_disks: Path) -> None:
    """Each thing a run would do makes idle_report step aside; the flow then does it and the
    next run has nothing to do again."""
    from flows.pipelines import replicate

    # an item below its target: copies to make
    ingest_payloads("hot", {"c.dat": payload("c.dat")}, staging=two_disks / "in2", phase=Phase.LIQUID)
    assert idle_report(Pipeline.REPLICATE) is None
    assert replicate().copied == 1  # type: ignore[union-attr]
    assert idle_report(Pipeline.REPLICATE) is not None

    # a copy a dead run left COPYING (its bytes are all there): recovery settles it READY
    row = next(c for c in copies_of("a.dat") if c.storage == "warm")
    with session_scope() as s:
        s.execute(
            update(Replica)
            .where(col(Replica.uid) == row.uid)
            .values(state=ReplicaState.COPYING.value, claimed_by=f"{socket.gethostname()}:999999999")
        )
    assert idle_report(Pipeline.REPLICATE) is None
    recovered = replicate()
    assert isinstance(recovered, PipelineReport) and recovered.recovered is not None
    assert recovered.recovered.completed == 1 and states_of("a.dat") == [("hot", "READY"), ("warm", "READY")]
    assert idle_report(Pipeline.REPLICATE) is not None

    # a temporary file a dead upload left on a posix storage: recovery removes it
    temp = two_disks / "warm" / f".dlm-tmp-{socket.gethostname()}-999999999-x1"
    temp.write_bytes(b"half an upload")
    assert idle_report(Pipeline.REPLICATE) is None
    assert temp.exists()  # looking changed nothing
    cleaned = replicate()
    assert isinstance(cleaned, PipelineReport) and cleaned.recovered is not None
    assert cleaned.recovered.temp_removed == 1 and not temp.exists()
    assert idle_report(Pipeline.REPLICATE) is not None

    # an expired item whose copies are all gone: the run leaves its tombstone
    with session_scope() as s:
        expired = update(Item).where(col(Item.name) == "b.dat").values(state=ItemState.EXPIRED.value)
        oid = s.execute(expired.returning(col(Item.oid))).scalar_one()
        gone = update(Replica).where(col(Replica.item_oid) == oid)
        s.execute(gone.values(state=ReplicaState.DELETED.value))
    assert idle_report(Pipeline.REPLICATE) is None
    tombstoned = replicate()
    assert isinstance(tombstoned, PipelineReport) and tombstoned.settled is not None
    assert tombstoned.settled.deleted_items == 1
    assert idle_report(Pipeline.REPLICATE) is not None


@SQLITE_ONLY
def test_a_run_killed_on_this_host_is_cleaned_up_by_the_next_flow(two_disks: Path) -> None:
    """A record left by a dead process (tasks/orphans.py) is work: the next flow run marks that
    run Crashed and forgets it. A live process's record is left alone; one whose pid now
    belongs to another process (its start time differs) counts as dead."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect.states import Running

    from flows.pipelines import replicate
    from tasks.orphans import dead_records, process_started, records_dir

    @flow(name="killed-elsewhere")
    def killed_elsewhere() -> None:
        pass

    with get_client(sync_client=True) as client:
        victim = client.create_flow_run(killed_elsewhere, state=Running())
    api, host, parent = str(PREFECT_API_URL.value()), socket.gethostname(), os.getppid()
    records = records_dir()
    records.mkdir(parents=True, exist_ok=True)

    def record(name: str, **who: Any) -> Path:
        path = records / f"flow-run-{name}.json"
        data = {"kind": "flow-run", "id": str(uuid.uuid4()), "host": host, "api": api, **who}
        path.write_text(json.dumps(data))
        return path

    dead = record("dead", pid=999999999, id=str(victim.id))
    alive = record("alive", pid=parent, started=process_started(parent))
    reused = record("reused", pid=parent, started="1")
    elsewhere = record("elsewhere", pid=999999999, host="another-host")
    assert dead_records() == [dead, reused]
    assert idle_report(Pipeline.REPLICATE) is None

    replicate()

    assert [p.exists() for p in (dead, alive, reused, elsewhere)] == [False, True, False, True]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(victim.id).state
    assert state is not None and state.is_crashed() and "is gone" in (state.message or "")
    alive.unlink()
    elsewhere.unlink()
    assert idle_report(Pipeline.REPLICATE) is not None


@SQLITE_ONLY
def test_the_flow_dlm_run_starts_applies_the_plan_it_just_made(
    two_disks: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dlm run` plans once: the flow it starts right after finding work applies that plan
    (here: an item registered in between waits for the next run, which copies it). Only
    `dlm run` keeps its plan, only once, and only while fresh."""
    from flows import plan_report
    from flows.pipelines import replicate

    ingest_payloads("hot", {"c.dat": payload("c.dat")}, staging=two_disks / "in2", phase=Phase.LIQUID)
    assert idle_report(Pipeline.REPLICATE, keep_plan=True) is None
    ingest_payloads("hot", {"d.dat": payload("d.dat")}, staging=two_disks / "in3", phase=Phase.LIQUID)
    first = replicate()
    assert isinstance(first, PipelineReport) and first.copied == 1
    assert states_of("c.dat") == [("hot", "READY"), ("warm", "READY")]
    assert states_of("d.dat") == [("hot", "READY")]
    again = replicate()  # the kept plan was taken: this run plans for itself
    assert isinstance(again, PipelineReport) and again.copied == 1
    assert states_of("d.dat") == [("hot", "READY"), ("warm", "READY")]

    ingest_payloads("hot", {"e.dat": payload("e.dat")}, staging=two_disks / "in4", phase=Phase.LIQUID)
    assert idle_report(Pipeline.REPLICATE) is None  # not kept: another caller's look
    ingest_payloads("hot", {"f.dat": payload("f.dat")}, staging=two_disks / "in5", phase=Phase.LIQUID)
    monkeypatch.setattr(plan_report, "PLAN_REUSE_S", 0.0)
    assert idle_report(Pipeline.REPLICATE, keep_plan=True) is None  # kept, but stale at once
    fresh = replicate()
    assert isinstance(fresh, PipelineReport) and fresh.copied == 2


def test_an_expiry_cleared_after_dlm_run_planned_keeps_the_item(two_disks: Path) -> None:
    """The expire plan `dlm run` keeps from its idle check may be seconds old when the flow
    applies it: an item whose expiry the user cleared in between is not expired, and none of
    its copies is deleted (the bytes stay on both storages)."""
    from flows.pipelines import expire
    from lifecycle.catalogue.catalog import get_item, set_expiry
    from lifecycle.catalogue.models import utcnow

    with session_scope() as s:
        set_expiry("a.dat", utcnow() - timedelta(hours=1), session=s)
    assert idle_report(Pipeline.EXPIRE, keep_plan=True) is None  # the plan expires a.dat
    with session_scope() as s:
        set_expiry("a.dat", None, session=s)  # the user keeps it after all
    report = expire()
    assert isinstance(report, PipelineReport)
    assert report.settled is not None and (report.settled.expired, report.deleted) == (0, 0)
    with session_scope() as s:
        assert get_item("a.dat", session=s).state == ItemState.READY
    assert states_of("a.dat") == [("hot", "READY"), ("warm", "READY")]
    for storage in ("hot", "warm"):
        assert (two_disks / storage / "a.dat").read_bytes() == payload("a.dat")


@pytest.mark.parametrize("state", [StorageState.OFFLINE, StorageState.DRAINING])
def test_a_storage_taken_offline_after_dlm_run_planned_gets_no_copy(
    two_disks: Path, state: StorageState
) -> None:
    """The operator takes 'warm' offline (or drains it) between `dlm run`'s idle check and the
    flow that applies its plan: the copy planned onto it is not made, neither file nor row."""
    from flows.pipelines import replicate
    from lifecycle.catalogue.storages import set_storage_state

    ingest_payloads("hot", {"c.dat": payload("c.dat")}, staging=two_disks / "in2", phase=Phase.LIQUID)
    assert idle_report(Pipeline.REPLICATE, keep_plan=True) is None  # the plan copies c.dat to warm
    with session_scope() as s:
        set_storage_state("warm", state, session=s)
    report = replicate()
    assert isinstance(report, PipelineReport) and report.copied == 0
    assert not (two_disks / "warm" / "c.dat").exists()
    assert states_of("c.dat") == [("hot", "READY")]


def test_a_copy_expiry_cleared_after_dlm_run_planned_keeps_the_copy(two_disks: Path) -> None:
    """The user clears the expiry of an item's copy on 'warm' between `dlm run`'s idle check
    (whose plan deletes that copy) and the flow that applies the plan: the copy stays."""
    from flows.pipelines import expire
    from lifecycle.catalogue.catalog import set_replica_expiry
    from lifecycle.catalogue.inputs import ExpiryChange
    from lifecycle.catalogue.models import utcnow
    from tests.factories import on_hot_and

    on_hot_and("warm", ["g.dat"], staging=two_disks / "in2")  # GAS: one copy is enough
    with session_scope() as s:
        set_replica_expiry("g.dat", "warm", ExpiryChange(at=utcnow() - timedelta(hours=1)), session=s)
    assert idle_report(Pipeline.EXPIRE, keep_plan=True) is None  # the plan deletes g.dat on warm
    with session_scope() as s:
        set_replica_expiry("g.dat", "warm", ExpiryChange(never=True), session=s)
    report = expire()
    assert isinstance(report, PipelineReport) and report.deleted == 0
    assert states_of("g.dat") == [("hot", "READY"), ("warm", "READY")]
    for storage in ("hot", "warm"):
        assert (two_disks / storage / "g.dat").read_bytes() == payload("g.dat")


@SQLITE_ONLY
def test_a_run_that_waited_for_the_writer_lock_plans_again(db_url: str, two_disks: Path) -> None:
    """Another run held the catalogue's writer lock when the flow `dlm run` started began: it
    applied meanwhile, so the plan kept from the idle check is dropped and the flow plans
    again (here: an item registered in between is copied by this run)."""
    import fcntl
    import threading

    from flows.pipelines import replicate
    from lifecycle.settings import get_settings

    ingest_payloads("hot", {"c.dat": payload("c.dat")}, staging=two_disks / "in2", phase=Phase.LIQUID)
    assert idle_report(Pipeline.REPLICATE, keep_plan=True) is None
    ingest_payloads("hot", {"d.dat": payload("d.dat")}, staging=two_disks / "in3", phase=Phase.LIQUID)
    database = get_settings().db_url.removeprefix("sqlite:///")
    held = threading.Event()

    def another_run() -> None:
        with open(f"{database}.writer", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held.set()
            time.sleep(1.5)
            fcntl.flock(lock, fcntl.LOCK_UN)

    other = threading.Thread(target=another_run)
    other.start()
    assert held.wait(10)
    try:
        report = replicate()
    finally:
        other.join()
    assert isinstance(report, PipelineReport) and report.copied == 2
    for name in ("c.dat", "d.dat"):
        assert states_of(name) == [("hot", "READY"), ("warm", "READY")]
        assert (two_disks / "warm" / name).read_bytes() == payload(name)
