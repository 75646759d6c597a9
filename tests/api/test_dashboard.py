"""The operator dashboard at `/` of `dlm api`, in a real headless chromium.

The real server (`dlm api` in a subprocess) on a real PostgreSQL catalogue whose items sit on
real posix and SeaweedFS S3 storages, copied there by rclone. The test signs in through the
login form as an operator would and checks that every number on the page is the catalogue's,
counted here with SQL of its own; and that nothing is shown without an admin's login: no
cookie, a non-admin token, a revoked token's cookie. Screenshots are saved under the test's
tmp dir and their paths printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from deployments.server import free_port
from lifecycle.apply.copy import apply_copy_batch
from lifecycle.apply.records import delete_item_now
from lifecycle.catalogue.db import get_engine, session_scope
from lifecycle.catalogue.models import Transfer, utcnow
from lifecycle.catalogue.run_log import PipelineRun
from lifecycle.catalogue.storages import get_storage, set_storage_state
from lifecycle.catalogue.tokens import TokenCreate, create_token, revoke_token
from lifecycle.planning.pipelines import policy_from
from lifecycle.settings import get_settings
from lifecycle.states import ItemState, Phase, StorageState, TransferKind, TransferState
from tests.factories import (
    copy_batch,
    ingest_payloads,
    on_hot_and,
    payload,
    three_tier_estate,
)

pytestmark = [pytest.mark.postgres, pytest.mark.s3, pytest.mark.rclone]

PAGE_TIMEOUT_MS = 30_000
STARTUP_TIMEOUT_S = 30.0
PREFECT_UI = "http://127.0.0.1:9"  # no server there: the page only links to it
LIVE = ("INITIALISED", "READY", "CORRUPTED")


@contextmanager
def dlm_api(db_url: str, home: Path, **env: str) -> Iterator[str]:
    """`dlm api` on a free loopback port in a subprocess on the catalogue `db_url`; yields its
    base URL and stops it (by its pid) afterwards."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_", "PREFECT_"))}
    clean.update(DLM_DATABASE_URL=db_url, DLM_HOME=str(home / "dlm"), PREFECT_HOME=str(home / "pf"), **env)
    log = home / "api.log"
    home.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dlm.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
            env=clean,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            try:
                if httpx.get(f"{base}/login", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                pytest.fail(f"dlm api did not start:\n{tail}", pytrace=False)
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def new_token(owner: str, *, admin: bool) -> tuple[str, str]:
    """(id, secret) of a new token, made through the core."""
    with session_scope() as s:
        made = create_token(TokenCreate(owner=owner, admin=admin), session=s)
    return made.id, made.secret


def sign_in(page: Any, base: str, secret: str) -> None:
    """Fill in and send the login form, as an operator does."""
    page.goto(f"{base}/")
    page.wait_for_url(f"{base}/login")
    page.fill("#token", secret)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def number(text: str) -> int:
    """An integer as the page prints it ('12,345 B' is 12345)."""
    digits = re.sub(r"[^0-9]", "", text)
    assert digits, f"no number in {text!r}"
    return int(digits)


def screenshot(page: Any, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    print(f"screenshot: {path}")


# --------------------------------------------------------------------------- the catalogue, counted here


def rows(db_url: str, sql: str) -> list[Any]:
    with get_engine(db_url).connect() as conn:
        return list(conn.execute(sa.text(sql)).all())


def counted(db_url: str) -> dict[str, Any]:
    """What the dashboard should show, counted with SQL written here (not the app's queries)."""
    policy = get_settings().policy
    live = ", ".join(f"'{s}'" for s in LIVE)
    below_sql = f"""
        SELECT i.name, i.version FROM item i
        WHERE i.state IN ({live}) AND (
            SELECT count(*) FROM replica r JOIN storage s ON s.id = r.storage_id
            WHERE r.item_oid = i.oid AND r.state = 'READY' AND s.state IN ('online', 'draining')
        ) < CASE i.target_phase WHEN 'SOLID' THEN {policy.copies_solid}
            WHEN 'LIQUID' THEN {policy.copies_liquid} WHEN 'GAS' THEN {policy.copies_gas}
            ELSE {policy.copies_plasma} END
        ORDER BY i.name, i.version"""
    return {
        "storages": {
            name: (used, cap, state, tier)
            for name, used, cap, state, tier in rows(
                db_url, "SELECT name, used_bytes, capacity_bytes, state, tier FROM storage"
            )
        },
        # the bytes of the copies each storage holds (what used_bytes must add up to)
        "held": dict(
            rows(
                db_url,
                "SELECT s.name, COALESCE(SUM(i.size), 0) FROM storage s "
                "LEFT JOIN replica r ON r.storage_id = s.id AND r.state = 'READY' "
                "LEFT JOIN item i ON i.oid = r.item_oid GROUP BY s.name",
            )
        ),
        "copies": dict(
            rows(
                db_url,
                "SELECT s.name, count(r.uid) FROM storage s LEFT JOIN replica r ON r.storage_id = s.id "
                "AND r.state IN ('PENDING', 'COPYING', 'READY', 'DELETING', 'CORRUPTED') GROUP BY s.name",
            )
        ),
        "by_state": dict(rows(db_url, "SELECT state, count(*) FROM item GROUP BY state")),
        "by_phase": dict(
            rows(
                db_url,
                f"SELECT target_phase, count(*) FROM item WHERE state IN ({live}) GROUP BY target_phase",
            )
        ),
        "below": [f"{n}@v{v}" for n, v in rows(db_url, below_sql)],
        "transfers": dict(rows(db_url, "SELECT state, count(*) FROM transfer GROUP BY state")),
        "last_event": rows(db_url, "SELECT max(id) FROM event")[0][0],
    }


# --------------------------------------------------------------------------- an estate with history


def build_estate(tmp_path: Path, s3: object, bucket: str) -> dict[str, str]:
    """hot and warm posix (1 MiB capacity each, site-a), cold on S3 (no capacity, site-b); items
    in three phases, copies made by rclone, one copy that failed, one item deleted, warm
    draining, and one failed transfer whose stored error holds a URL with a password. Returns
    the failed transfers' ids by name."""
    three_tier_estate(tmp_path / "estate", server=s3, bucket=bucket, posix_capacity_bytes=2**20)
    staging = tmp_path / "staging"
    on_hot_and("cold", ["c1.dat", "c2.dat"], staging=staging)  # GAS, 2 copies
    gas = ingest_payloads(
        "hot", {f"g{k}.dat": payload(f"g{k}", 1000 + 137 * k) for k in range(4)}, staging=staging
    )
    liquid = {"l1.dat": payload("l1", 5000), "l2.dat": payload("l2", 6100), "l3.dat": payload("l3", 7300)}
    ingest_payloads("hot", liquid, staging=staging, phase=Phase.LIQUID)
    done = apply_copy_batch(copy_batch(["l3.dat"], "hot", "warm"))  # l3 at target, l1 and l2 below
    assert done.done == 1, done.errors
    ingest_payloads("hot", {"s1.dat": payload("s1", 9000)}, staging=staging, phase=Phase.SOLID)
    # a copy that fails: its source vanished behind DLM's back
    oids = ingest_payloads("hot", {"gone.dat": payload("gone", 4000)}, staging=staging)
    (tmp_path / "estate" / "hot" / "gone.dat").unlink()
    failed = apply_copy_batch(copy_batch(["gone.dat"], "hot", "warm"))
    assert failed.done == 0 and failed.errors
    # an item deleted (its copy removed from hot), warm draining
    delete_item_now(gas["g3.dat"], policy=policy_from())
    assert not (tmp_path / "estate" / "hot" / "g3.dat").exists()
    with session_scope() as s:
        set_storage_state("warm", StorageState.DRAINING, session=s)
    # an error as an old rclone might have stored it, with a URL's password in it
    with session_scope() as s:
        secret_row = Transfer(
            item_oid=oids["gone.dat"],
            kind=TransferKind.COPY,
            src_storage_id=get_storage("hot", session=s).id,
            dst_storage_id=get_storage("cold", session=s).id,
            state=TransferState.FAILED,
            error="Failed to copy: s3://ops:hunter2@cold.example/gone.dat: AccessDenied",
            flow_run_id=str(uuid.uuid4()),
        )
        s.add(secret_row)
        # two finished runs in the run log (real runs write it: tests/api/test_run_metrics.py)
        now = utcnow()
        s.add(
            PipelineRun(
                pipeline="replicate",
                outcome="completed",
                started_at=now,
                duration_s=12.5,
                copied=3,
                bytes_moved=4096,
                flow_run_id=str(uuid.uuid4()),
            )
        )
        s.add(
            PipelineRun(
                pipeline="verify",
                partition="2/4",
                outcome="failed",
                started_at=now,
                duration_s=3.5,
                failed=1,
                error="listing s3://ops:hunter2@cold.example failed",
                flow_run_id=str(uuid.uuid4()),
            )
        )
        s.flush()
        return {"secret": str(secret_row.id), "flow_run_id": str(secret_row.flow_run_id)}


# --------------------------------------------------------------------------- tests


def test_dashboard_shows_the_catalogues_numbers(
    pg_db_url: str,
    s3_env: object,
    s3_bucket: str,
    rclone_path: str,
    browser: Any,
    tmp_path: Path,
) -> None:
    injected = build_estate(tmp_path, s3_env, s3_bucket)
    _, admin = new_token("ops", admin=True)
    want = counted(pg_db_url)
    assert want["by_state"].get("DELETED") == 1 and want["transfers"].get("FAILED") == 2
    assert want["below"] == ["l1.dat@v1", "l2.dat@v1", "s1.dat@v1"], want["below"]

    with dlm_api(pg_db_url, tmp_path / "api", PREFECT_UI_URL=PREFECT_UI) as base:
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        sign_in(page, base, admin)
        assert page.url == f"{base}/"
        page.locator("#storages").wait_for()
        screenshot(page, tmp_path / "dashboard.png")

        text: Callable[[str], str] = lambda selector: page.locator(selector).inner_text().strip()  # noqa: E731

        # storages: used bytes, capacity, fill, state, tier, copies
        assert set(want["storages"]) == {"hot", "warm", "cold"}
        for name, (used, cap, state, tier) in want["storages"].items():
            row = f'#storages tr[data-storage="{name}"]'
            assert used == want["held"][name], f"{name}: used_bytes {used} != bytes of its copies"
            assert number(text(f"{row} .used-bytes")) == used, name
            if cap is None:
                assert text(f"{row} .capacity-bytes") == "not set"
            else:
                assert number(text(f"{row} .capacity-bytes")) == cap
                assert text(f"{row} .percent") == f"{100 * used / cap:.1f}%"
                meter = page.locator(f"{row} meter")
                assert (meter.get_attribute("value"), meter.get_attribute("max")) == (str(used), str(cap))
            assert text(f"{row} .state") == state
            assert text(f"{row} .tier") == tier
            assert number(text(f"{row} .copies")) == want["copies"][name]
        assert text('#storages tr[data-storage="warm"] .state') == "draining"

        # items by state and by phase, below target
        for state in ItemState:
            cell = f'#items-by-state tr[data-key="{state}"] .count'
            assert number(text(cell)) == want["by_state"].get(state.value, 0), state
        for phase in Phase:
            cell = f'#items-by-phase tr[data-key="{phase}"] .count'
            assert number(text(cell)) == want["by_phase"].get(phase.value, 0), phase
        assert number(text("#below-target-count")) == len(want["below"])
        listed = page.locator("#below-target tr[data-below]").evaluate_all(
            "rows => rows.map(r => r.dataset.below)"
        )
        assert listed == want["below"]

        # transfers, failures (error shown, password never), events, the Prefect links
        for state in TransferState:
            cell = f'#transfers-by-state tr[data-key="{state}"] .count'
            assert number(text(cell)) == want["transfers"].get(state.value, 0), state
        failures = page.locator("#failures tr[data-transfer]")
        assert failures.count() == 2
        gone = page.locator("#failures tr[data-transfer]", has_text="hot → warm")
        assert "gone.dat@v1" in gone.inner_text() and gone.locator(".error").inner_text().strip()
        secret = page.locator(f'#failures tr[data-transfer="{injected["secret"]}"]')
        assert "s3://ops:***@cold.example/gone.dat" in secret.locator(".error").inner_text()
        assert "hunter2" not in page.content()
        run = secret.locator("a", has_text="run")
        assert run.get_attribute("href") == f"{PREFECT_UI}/runs/flow-run/{injected['flow_run_id']}"
        assert page.locator('#prefect-links a[href="http://127.0.0.1:9/runs"]').count() == 1
        assert page.locator("#no-prefect-ui").count() == 0
        runs = page.locator("#runs tr[data-run]")
        assert runs.count() == 2
        newest, oldest = runs.nth(0).inner_text(), runs.nth(1).inner_text()
        assert "verify (2/4)" in newest and "failed" in newest and "3.5" in newest, newest
        assert "hunter2" not in newest and "***" in newest
        assert "replicate" in oldest and "completed" in oldest and "12.5" in oldest, oldest
        first_event = page.locator("#events tr[data-event]").first
        assert first_event.get_attribute("data-event") == str(want["last_event"])
        assert page.locator("#transfers tr[data-transfer]").count() == sum(want["transfers"].values())
        page.close()


def test_dashboard_needs_an_admin_login(pg_db_url: str, browser: Any, tmp_path: Path) -> None:
    admin_id, admin = new_token("ops", admin=True)
    _, alice = new_token("alice", admin=False)
    _, other_admin = new_token("ops2", admin=True)

    with dlm_api(pg_db_url, tmp_path / "api") as base:
        # without a login: a redirect to the form, nothing of the catalogue
        bare = httpx.get(f"{base}/", timeout=10)
        assert bare.status_code == 303 and bare.headers["location"] == "/login"
        assert "storage" not in bare.text.lower()
        # a login POST from another site's page is refused, and sets no cookie
        forged = httpx.post(
            f"{base}/login", data={"token": admin}, headers={"Origin": "http://evil.example"}, timeout=10
        )
        assert forged.status_code == 403 and "set-cookie" not in forged.headers

        context = browser.new_context(viewport={"width": 1200, "height": 800})
        page = context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.goto(f"{base}/")
        assert page.url == f"{base}/login"
        assert page.locator("#storages").count() == 0

        # a non-admin token and a bad one get the form again, with one line saying why
        sign_in(page, base, alice)
        assert page.url == f"{base}/login"
        assert "needs an admin token" in page.locator("#login-error").inner_text()
        assert context.cookies() == []
        screenshot(page, tmp_path / "login-refused.png")
        sign_in(page, base, "dlm_not-a-token")
        assert page.locator("#login-error").inner_text().strip() == "invalid or revoked token"
        assert page.locator("#storages").count() == 0

        # an admin gets in: the cookie is HttpOnly and SameSite=Strict; it opens no API route
        sign_in(page, base, admin)
        assert page.url == f"{base}/"
        page.locator("#storages").wait_for()
        assert page.locator("#no-prefect-ui").inner_text().strip().startswith("No Prefect UI is known")
        assert page.locator("#prefect-links").count() == 0
        [cookie] = context.cookies()
        assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict")
        assert cookie["value"] == admin
        api = httpx.get(f"{base}/api/storages", cookies={cookie["name"]: cookie["value"]}, timeout=10)
        assert api.status_code == 401

        # the token revoked: the same cookie no longer opens the page
        with session_scope() as s:
            revoke_token(admin_id, session=s)
        page.goto(f"{base}/")
        assert page.url == f"{base}/login"
        assert page.locator("#storages").count() == 0
        assert context.cookies() == []

        # signing out ends a login
        sign_in(page, base, other_admin)
        page.locator("#storages").wait_for()
        page.click("text=sign out")
        page.wait_for_url(f"{base}/login")
        page.goto(f"{base}/")
        assert page.url == f"{base}/login"
        context.close()
