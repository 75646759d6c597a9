"""The integrity flows end to end: verify and reconcile on real SQLite/PostgreSQL, SeaweedFS S3 and rclone."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlmodel import col

from lifecycle.catalogue import audit, catalog, storages
from lifecycle.catalogue import ingest as ingesting
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.models import Event, Item, Replica, Storage, Transfer, utcnow
from lifecycle.states import Phase
from lifecycle.transfer import operations as rclone_mod
from tests.factories import Estate, three_tier_estate

pytestmark = [pytest.mark.prefect, pytest.mark.s3, pytest.mark.rclone]


@pytest.fixture
def estate(db_url: str, tmp_path: Path, s3_bucket: str, s3_env: object, flows_env: None) -> Estate:
    """hot posix (site-a), warm posix (site-a), cold S3 (site-b)."""
    return three_tier_estate(tmp_path, server=s3_env, bucket=s3_bucket)


@pytest.fixture
def published() -> Iterator[list[dict[str, Any]]]:
    """The audit events handed to publishers (what becomes Prefect events), in order."""
    seen: list[dict[str, Any]] = []

    def record(events: Sequence[dict[str, Any]]) -> None:
        seen.extend(events)

    audit.add_publisher(record)
    yield seen
    audit.remove_publisher(record)


def payload(name: str, size: int) -> bytes:
    block = hashlib.sha256(name.encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def ingest(root: Path, names: Sequence[str], *, phase: Phase, size: int = 3000) -> None:
    src = root / "src"
    src.mkdir(exist_ok=True)
    files = []
    for name in names:
        f = src / name.replace("/", "_")
        f.write_bytes(payload(name, size))
        files.append(str(f))
    with session_scope() as s:
        hot = storages.get_storage("hot", session=s)
        sources = ingesting.plan_ingest(storage=hot, paths=files, upload=True, session=s)
        for source, name in zip(sources, names, strict=True):
            source.name = name
        ingesting.ingest(
            storage=hot, sources=sources, options=ingesting.IngestOptions(phase=phase), session=s
        )


def flip_byte(path: Path, at: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def copies(name: str) -> dict[str, tuple[str, str]]:
    """storage name -> (replica state, path) of NAME's copies that are not DELETED."""
    with session_scope() as s:
        item = catalog.get_item(name, session=s)
        rows = s.execute(
            select(col(Storage.name), col(Replica.state), col(Replica.path))
            .join(Storage, col(Storage.id) == col(Replica.storage_id))
            .where(col(Replica.item_oid) == item.oid, col(Replica.state) != "DELETED")
        ).all()
    return {n: (st, p) for n, st, p in rows}


def item_state(name: str) -> str:
    with session_scope() as s:
        return str(catalog.get_item(name, session=s).state)


def event_kinds(name: str) -> list[str]:
    with session_scope() as s:
        oid = catalog.get_item(name, session=s).oid
        return [
            e.kind for e in s.scalars(select(Event).where(col(Event.item_oid) == oid).order_by(col(Event.id)))
        ]


def below_target() -> int:
    with session_scope() as s:
        return catalog.status(session=s).below_target


def s3_object(estate: Estate, key: str) -> bytes:
    body = estate.s3.client().get_object(Bucket=estate.bucket, Key=key)["Body"]
    try:
        return bytes(body.read())
    finally:
        body.close()


def copy_bytes(estate: Estate, storage: str, path: str) -> bytes:
    if storage == "cold":
        return s3_object(estate, path)
    return (estate.root / storage / path).read_bytes()


# --------------------------------------------------------------------------- verify


def test_flipped_byte_in_a_posix_copy_is_found_and_repaired(
    estate: Estate, published: list[dict[str, Any]]
) -> None:
    from flows.integrity import verify
    from flows.pipelines import replicate

    root = estate.root
    ingest(root, ["obs/a.dat", "obs/b.dat"], phase=Phase.LIQUID)
    replicate()
    [(other, (_, other_path))] = [(n, v) for n, v in copies("obs/a.dat").items() if n != "hot"]
    good = payload("obs/a.dat", 3000)
    flip_byte(root / "hot" / "obs/a.dat")

    report = verify().as_json()

    assert report["corrupted"] == 1 and report["lost"] == 0
    assert report["intact"] == 3  # b on both storages, a's other copy
    assert report["repaired"] == 1 and report["repair_failed"] == 0
    assert (root / "hot" / "obs/a.dat").read_bytes() == good  # the bytes are the item's again
    assert copy_bytes(estate, other, other_path) == good  # the good copy was only read
    assert {n: st for n, (st, _) in copies("obs/a.dat").items()} == {"hot": "READY", other: "READY"}
    kinds = event_kinds("obs/a.dat")
    assert kinds.index("replica.corrupted") < kinds.index("replica.repaired")
    assert "item.corrupted" not in kinds and item_state("obs/a.dat") == "READY"
    assert [e["kind"] for e in published if e["kind"].startswith("replica.")][-2:] == [
        "replica.corrupted",
        "replica.repaired",
    ]
    with session_scope() as s:
        transfers = s.scalars(select(Transfer)).all()
    assert [t.state for t in transfers if t.kind == "copy"][-1] == "DONE"
    assert below_target() == 0
    again = verify().as_json()  # everything intact now
    assert again["corrupted"] == again["lost"] == 0 and again["intact"] == 4


def test_flipped_byte_in_the_only_copy_corrupts_the_item_and_deletes_nothing(
    estate: Estate, published: list[dict[str, Any]]
) -> None:
    from flows.integrity import verify

    root = estate.root
    ingest(root, ["solo.dat"], phase=Phase.GAS)
    path = root / "hot" / "solo.dat"
    flip_byte(path)
    flipped = path.read_bytes()

    report = verify().as_json()

    assert report["corrupted"] == 1 and report["items_corrupted"] == 1 and report["repaired"] == 0
    assert list(report["unrepairable"].values()) == ["no intact copy on another online storage"]
    assert item_state("solo.dat") == "CORRUPTED"
    assert copies("solo.dat") == {"hot": ("CORRUPTED", "solo.dat")}
    assert path.read_bytes() == flipped  # nothing deleted or rewritten
    with session_scope() as s:
        st = catalog.status(session=s)
    assert st.below_target == 1 and st.items_by_state == {"CORRUPTED": 1}
    assert "item.corrupted" in [e["kind"] for e in published]
    # an operator restores the bytes: the next verify finds the copy intact and the item READY
    path.write_bytes(payload("solo.dat", 3000))
    again = verify().as_json()
    assert again["recovered"] == 1 and again["items_repaired"] == 1
    assert item_state("solo.dat") == "READY" and copies("solo.dat") == {"hot": ("READY", "solo.dat")}
    assert event_kinds("solo.dat")[-2:] == ["replica.repaired", "item.repaired"]
    assert below_target() == 0


def test_budget_reads_only_the_oldest_verified_copies(estate: Estate) -> None:
    from flows.integrity import verify

    names = [f"b/f{i}.dat" for i in range(4)]
    ingest(estate.root, names, phase=Phase.GAS, size=3000)
    now = utcnow()
    ages = {names[0]: None, names[1]: now - timedelta(days=3), names[2]: now - timedelta(days=2)}
    ages[names[3]] = now - timedelta(days=1)
    with session_scope() as s:
        for name, when in ages.items():
            oid = catalog.get_item(name, session=s).oid
            s.execute(update(Replica).where(col(Replica.item_oid) == oid).values(verified_at=when))
    flip_byte(estate.root / "hot" / names[3])  # the newest-verified: outside a small budget

    first = verify(budget="6000B").as_json()

    assert first["selected"] == 2 and first["bytes_read"] == 6000 and first["budget_reached"]
    assert first["corrupted"] == 0  # the corrupt copy was not read
    with session_scope() as s:
        verified = {
            name: s.execute(
                select(col(Replica.verified_at)).where(
                    col(Replica.item_oid) == catalog.get_item(name, session=s).oid
                )
            ).scalar_one()
            for name in names
        }
    assert verified[names[0]] is not None and verified[names[0]] >= now
    assert verified[names[1]] is not None and verified[names[1]] >= now
    assert verified[names[2]] == ages[names[2]] and verified[names[3]] == ages[names[3]]
    second = verify(budget=6000).as_json()  # now f2 and f3 are the oldest
    assert second["selected"] == 2 and second["corrupted"] == 1
    assert item_state(names[3]) == "CORRUPTED"


def test_trusted_s3_checksums_are_not_downloaded(estate: Estate, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.integrity import verify
    from flows.pipelines import replicate

    ingest(estate.root, ["t/a.dat", "t/b.dat"], phase=Phase.SOLID)
    replicate()
    assert all(copies(n)["cold"][0] == "READY" for n in ("t/a.dat", "t/b.dat"))
    calls: list[list[str]] = []
    real_run = rclone_mod.run

    def spy(args: Sequence[str], **kwargs: Any) -> Any:
        calls.append(list(args))
        return real_run(args, **kwargs)

    monkeypatch.setattr(rclone_mod, "run", spy)

    untrusted = verify(storage="cold").as_json()
    hashsums = [a for a in calls if a[0] == "hashsum"]
    assert untrusted["intact"] == 2 and untrusted["bytes_read"] == 6000 and untrusted["bytes_trusted"] == 0
    assert len(hashsums) == 1 and "--download" in hashsums[0]  # one process, bytes recomputed

    with session_scope() as s:
        s.execute(update(Storage).where(col(Storage.name) == "cold").values(trust_stored_checksums=True))
    calls.clear()
    trusted = verify(storage="cold").as_json()
    hashsums = [a for a in calls if a[0] == "hashsum"]
    assert trusted["intact"] == 2 and trusted["bytes_read"] == 0 and trusted["bytes_trusted"] == 6000
    assert len(hashsums) == 1 and "--download" not in hashsums[0]  # the ETags, no download
    # posix copies are never "trusted": their hashes are always computed from the bytes
    calls.clear()
    verify(storage="hot")
    assert all("--download" in a for a in calls if a[0] == "hashsum")


# --------------------------------------------------------------------------- reconcile


def test_file_deleted_behind_dlms_back_is_lost_then_repaired(
    estate: Estate, published: list[dict[str, Any]]
) -> None:
    from flows.integrity import reconcile
    from flows.pipelines import replicate

    root = estate.root
    ingest(root, ["r/a.dat", "r/b.dat"], phase=Phase.LIQUID)
    replicate()
    with session_scope() as s:
        used_before = storages.get_storage("hot", session=s).used_bytes
    (root / "hot" / "r/a.dat").unlink()

    report = reconcile(storage="hot").as_json()

    assert report["missing"] == 1 and report["lost"] == 1 and report["matched"] == 1
    assert report["unknown"] == 0 and report["repaired"] == 1
    assert (root / "hot" / "r/a.dat").read_bytes() == payload("r/a.dat", 3000)
    assert copies("r/a.dat")["hot"] == ("READY", "r/a.dat")  # same storage, same path
    kinds = event_kinds("r/a.dat")
    assert kinds.index("replica.lost") < kinds.index("replica.repaired")
    assert {"replica.lost", "replica.repaired"} <= {e["kind"] for e in published}
    assert report["below_target_after"] == 0 and item_state("r/a.dat") == "READY"
    with session_scope() as s:
        assert storages.get_storage("hot", session=s).used_bytes == used_before
    assert reconcile(storage="hot").as_json()["lost"] == 0


def test_lost_only_copy_corrupts_the_item_and_replicate_cannot_pretend(estate: Estate) -> None:
    from flows.integrity import reconcile

    ingest(estate.root, ["gone.dat"], phase=Phase.GAS)
    (estate.root / "hot" / "gone.dat").unlink()
    report = reconcile(storage="hot").as_json()
    assert report["lost"] == 1 and report["items_corrupted"] == 1 and report["repaired"] == 0
    assert item_state("gone.dat") == "CORRUPTED" and report["below_target_after"] == 1


def test_size_mismatch_is_corrupted_then_repaired(estate: Estate) -> None:
    from flows.integrity import reconcile
    from flows.pipelines import replicate

    root = estate.root
    ingest(root, ["s/a.dat"], phase=Phase.LIQUID)
    replicate()
    with (root / "hot" / "s/a.dat").open("ab") as f:
        f.write(b"appended behind DLM's back")

    report = reconcile(storage="hot").as_json()

    assert report["resized"] == 1 and report["corrupted"] == 1 and report["repaired"] == 1
    assert (root / "hot" / "s/a.dat").read_bytes() == payload("s/a.dat", 3000)
    assert copies("s/a.dat")["hot"][0] == "READY"
    kinds = event_kinds("s/a.dat")
    assert kinds.index("replica.corrupted") < kinds.index("replica.repaired")


def test_unknown_s3_object_is_reported_then_adopted_with_its_metadata(estate: Estate) -> None:
    from flows.integrity import reconcile
    from flows.pipelines import replicate

    ingest(estate.root, ["known.dat"], phase=Phase.SOLID)
    replicate()
    assert copies("known.dat")["cold"][0] == "READY"
    client = estate.s3.client()
    body = b"dark data from an instrument\n" * 100
    client.put_object(
        Bucket=estate.bucket,
        Key="incoming/run-7.dat",
        Body=body,
        Metadata={"project": "p1", "kind": "raw", "detector": "B-12"},
    )
    client.put_object(Bucket=estate.bucket, Key="incoming/run-8.dat.a1b2c3.partial", Body=b"x")
    client.put_object(Bucket=estate.bucket, Key=".dlm-checkout-abc/run-9.dat", Body=b"y")
    with session_scope() as s:
        before = dict(catalog.table_counts(session=s))

    seen = reconcile(storage="cold").as_json()

    assert seen["unknown"] == 1 and seen["ignored"] == 2 and seen["matched"] == 1
    assert [o["path"] for o in seen["unknown_objects"]] == ["incoming/run-7.dat"]
    assert seen["unknown_objects"][0]["size"] == len(body)
    assert seen["adopted"] == 0 and seen["lost"] == 0
    with session_scope() as s:
        assert dict(catalog.table_counts(session=s)) == before  # reporting changes nothing

    adopted = reconcile(storage="cold", adopt=True).as_json()

    assert adopted["adopted"] == 1 and adopted["unknown_objects"][0]["adopted as"]
    head = client.head_object(Bucket=estate.bucket, Key="incoming/run-7.dat")
    with session_scope() as s:
        item = catalog.get_item("incoming/run-7.dat", session=s)
        assert str(item.oid) == adopted["unknown_objects"][0]["adopted as"]
        assert item.meta == head["Metadata"] == {"project": "p1", "kind": "raw", "detector": "B-12"}
        assert (item.checksum, item.checksum_algo) == (hashlib.md5(body).hexdigest(), "md5")
        assert item.size == len(body) and item.state == "READY"
        events = s.scalars(select(Event).where(col(Event.item_oid) == item.oid)).all()
        assert len(events) == 1 and events[0].kind == "item.ready"
    assert copies("incoming/run-7.dat") == {"cold": ("READY", "incoming/run-7.dat")}
    assert reconcile(storage="cold").as_json()["unknown"] == 0


def test_reconcile_dry_run_and_bad_storage(estate: Estate) -> None:
    from flows.integrity import reconcile
    from lifecycle.errors import StorageNotFoundError

    ingest(estate.root, ["d.dat"], phase=Phase.GAS)
    (estate.root / "hot" / "d.dat").unlink()
    report = reconcile(storage="hot", dry_run=True).as_json()
    assert report["missing"] == 1 and report["lost"] == 0
    assert copies("d.dat")["hot"][0] == "READY" and item_state("d.dat") == "READY"
    with pytest.raises(StorageNotFoundError):
        reconcile(storage="nowhere")


def test_adopted_items_are_items_like_any_other(estate: Estate) -> None:
    """An adopted posix file: MD5 computed from its bytes (posix keeps none), phase met."""
    from flows.integrity import reconcile

    f = estate.root / "warm" / "lab" / "notes.txt"
    f.parent.mkdir()
    f.write_bytes(b"lab notes")
    report = reconcile(storage="warm", adopt=True).as_json()
    assert report["adopted"] == 1
    with session_scope() as s:
        item = s.scalars(select(Item).where(col(Item.name) == "lab/notes.txt")).one()
    assert item.checksum == hashlib.md5(b"lab notes").hexdigest() and item.meta == {}
    assert report["below_target_after"] == 0


def test_unreachable_storage_never_makes_copies_lost(estate: Estate, monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrong keys: verify reports the copies unreadable and reconcile fails; no copy changes state."""
    from flows.integrity import reconcile, verify
    from flows.pipelines import replicate
    from lifecycle.errors import StorageError

    ingest(estate.root, ["k/a.dat"], phase=Phase.SOLID)
    replicate()
    monkeypatch.setenv("DLM_TEST_S3_SECRET_ACCESS_KEY", "wrong-secret")
    report = verify(storage="cold").as_json()
    assert report["unreadable"] == 1 and report["lost"] == report["corrupted"] == 0
    with pytest.raises(StorageError):  # the listing failed: nothing is judged missing
        reconcile(storage="cold")
    assert {n: st for n, (st, _) in copies("k/a.dat").items()} == {
        "hot": "READY",
        "warm": "READY",
        "cold": "READY",
    }
    assert item_state("k/a.dat") == "READY"


def test_reconcile_of_every_storage_adopts_each_object_on_its_own_storage_and_names_it(
    estate: Estate,
) -> None:
    """`dlm run reconcile --adopt` with no --storage lists hot, warm and cold one after the other:
    every unknown object becomes an item whose one copy is on the storage that holds it (the bytes
    untouched), and each row of the merged report says on which storage the object is."""
    from flows.integrity import reconcile

    root = estate.root
    files = {
        ("hot", "incoming/a.dat"): b"A on hot\n" * 50,
        ("warm", "incoming/b.dat"): b"B on warm\n" * 60,
    }
    for (storage, path), body in files.items():
        (root / storage / path).parent.mkdir(parents=True, exist_ok=True)
        (root / storage / path).write_bytes(body)
    estate.s3.client().put_object(Bucket=estate.bucket, Key="incoming/c.dat", Body=b"C on cold\n" * 70)
    (root / "warm" / "incoming" / "x.dat.a1b2c3.partial").write_bytes(b"half")

    report = reconcile(adopt=True).as_json()

    assert report["unknown"] == 3 and report["adopted"] == 3, report
    rows = {o["path"]: o for o in report["unknown_objects"]}
    assert {p: o["storage"] for p, o in rows.items()} == {
        "incoming/a.dat": "hot",
        "incoming/b.dat": "warm",
        "incoming/c.dat": "cold",
    }
    assert [(o["storage"], o["path"]) for o in report["temporary_objects"]] == [
        ("warm", "incoming/x.dat.a1b2c3.partial")
    ]
    for (storage, path), body in files.items():
        assert copies(path) == {storage: ("READY", path)}
        assert (root / storage / path).read_bytes() == body
        with session_scope() as s:
            assert catalog.get_item(path, session=s).checksum == hashlib.md5(body).hexdigest()
    assert copies("incoming/c.dat") == {"cold": ("READY", "incoming/c.dat")}


def test_reconcile_of_every_storage_with_one_failing_still_reports_what_it_adopted(estate: Estate) -> None:
    """One storage that cannot be listed fails the run (Prefect marks it failed, `dlm run` exits
    1), but what the run did on the others (an object adopted on hot) is not lost: the error
    carries the report, with the failure named, for `dlm run --json` to print first."""
    import shutil

    from flows.integrity import reconcile
    from lifecycle.reports import RunFailedError

    (estate.root / "hot" / "incoming").mkdir(parents=True)
    (estate.root / "hot" / "incoming" / "a.dat").write_bytes(b"A on hot\n" * 50)
    shutil.rmtree(estate.root / "warm")  # its root is gone: warm cannot be listed

    with pytest.raises(RunFailedError, match="reconcile warm") as failed:
        reconcile(adopt=True)

    report = failed.value.report.as_json()
    assert report["adopted"] == 1 and report["storage"] == "cold, hot, warm"
    assert [(o["storage"], o["path"], bool(o["adopted as"])) for o in report["unknown_objects"]] == [
        ("hot", "incoming/a.dat", True)
    ]
    assert len(report["failures"]) == 1 and "warm" in report["failures"][0]
    assert copies("incoming/a.dat") == {"hot": ("READY", "incoming/a.dat")}
