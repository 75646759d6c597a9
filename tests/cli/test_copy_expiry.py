"""The expiry of one copy: `dlm items set-expiry REF --storage S`, then a real `dlm run expire`
(a subprocess): the expired copy's bytes are gone, every other copy's bytes are still there,
and a copy the item needs (its last intact one, or one its phase needs) is kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from lifecycle.states import Phase
from tests.dlm_process import run_dlm
from tests.factories import Estate, copies_of, events_of, on_hot_and, payload, three_tier_estate

pytestmark = [pytest.mark.prefect, pytest.mark.s3, pytest.mark.rclone]


def test_an_expired_copy_goes_and_the_copies_an_item_needs_stay(  # type: ignore[no-untyped-def]
    dlm, db_url: str, tmp_path: Path, s3_env, s3_bucket: str, flows_env: None
) -> None:
    estate: Estate = three_tier_estate(tmp_path / "st", server=s3_env, bucket=s3_bucket)
    staging = tmp_path / "staging"
    on_hot_and("cold", ["a.dat", "b.dat", "c.dat"], staging=staging)  # GAS: one copy needed
    on_hot_and("cold", ["liquid.dat"], staging=staging, phase=Phase.LIQUID)  # needs both
    on_hot_and("warm", ["solo.dat"], staging=staging)
    assert dlm("items", "set-expiry", "solo.dat", "--storage", "warm", "--at", "2020-01-01").code == 0

    r = dlm("items", "set-expiry", "a.dat", "--storage", "cold", "--at", "2020-01-01")
    assert r.code == 0, r.err
    assert "a.dat v1: its copy on cold expires 2020-01-01" in r.out and r.err == ""
    assert dlm("items", "set-expiry", "b.dat", "-s", "cold", "--lifetime", "30d").code == 0
    assert dlm("items", "set-expiry", "c.dat", "-s", "cold", "--at", "2020-01-01").code == 0
    assert dlm("items", "set-expiry", "c.dat", "-s", "cold", "--never").code == 0  # cleared again
    r = dlm("items", "set-expiry", "liquid.dat", "-s", "cold", "--at", "2020-01-01")
    assert r.code == 0 and "needs 2: expire keeps this one" in r.err, r.err
    # both of solo.dat's copies expire: one may go, the last intact one must stay
    r = dlm("items", "set-expiry", "solo.dat", "-s", "hot", "--at", "2020-01-01")
    assert r.code == 0, r.err

    done = run_dlm("run", "expire")
    assert done.returncode == 0, done.stderr[-3000:]

    assert estate.read("cold", "a.dat") is None  # the expired copy's bytes are gone
    assert estate.read("hot", "a.dat") == payload("a.dat")
    assert [(c.storage, c.state) for c in copies_of("a.dat", deleted=True)] == [
        ("cold", "DELETED"),
        ("hot", "READY"),
    ]
    for name in ("b.dat", "c.dat", "liquid.dat"):
        assert estate.read("hot", name) == payload(name), name
        assert estate.read("cold", name) == payload(name), name
    # solo.dat: both copies expired; one went, the other is the last intact copy and stays
    left = [(c.storage, c.state) for c in copies_of("solo.dat")]
    assert len(left) == 1 and left[0][1] == "READY", left
    assert estate.read(left[0][0], "solo.dat") == payload("solo.dat")
    kinds = [k for k, _ in events_of("liquid.dat")]
    assert "replica.expiry_changed" in kinds and kinds[-1] == "policy.refused"
    [(_, changed)] = [(k, d) for k, d in events_of("a.dat") if k == "replica.expiry_changed"]
    assert changed["storage"] == "cold" and changed["to"].startswith("2020-01-01")
    assert [d["reason"] for k, d in events_of("solo.dat") if k == "policy.refused"][-1].endswith(
        "it is the item's last intact copy"
    )
