"""Session fixtures: real PostgreSQL, a real SeaweedFS S3 server, the rclone binary.

A catalogue fixture runs each test on SQLite and on PostgreSQL. When CI=true a missing
PostgreSQL or S3 server fails the run instead of skipping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from devrig.postgres import fresh_postgres_database, in_ci
from lifecycle import settings as settings_mod
from lifecycle.catalogue.db import dispose_engines, get_engine, init_db


def unavailable(what: str, why: str) -> None:
    """A part the test needs is missing: a failure in CI, a skip elsewhere."""
    if in_ci():
        pytest.fail(f"{what} is required in CI but unavailable: {why}", pytrace=False)
    pytest.skip(f"{what} unavailable: {why}")


@pytest.fixture(autouse=True)
def _isolated_env(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """Each test gets its own DLM_HOME and no leaked DLM_* settings."""
    for key in list(os.environ):
        if key.startswith("DLM_") and key != "DLM_TEST_POSTGRES_URL" and not key.startswith("DLM_SOAK"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("DLM_HOME", str(tmp_path_factory.mktemp("dlmhome")))
    # The session shares one Prefect test harness, whose server runs no lease repossessor: a
    # slot a killed run held stays taken until a later run on the same DLM home releases it
    # (tasks/orphans.py; the fault tests' `dlm_proc` does so for the runs it kills). A leak
    # would hold the next batch on that storage back: let it fail in minutes, not hang an hour.
    monkeypatch.setenv("DLM_TRANSFER__SLOT_WAIT_S", "120")
    settings_mod.reset_settings()
    yield
    settings_mod.reset_settings()


@pytest.fixture(scope="session", autouse=True)
def _no_prefect_server_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A `dlm` command starts its DLM home's Prefect server on first use, detached: stop every
    one a test left running under this session's temporary directories (by its pid file)."""
    yield
    from deployments.server import is_prefect_server, stop_pid

    for pid_file in tmp_path_factory.getbasetemp().glob("**/prefect/server.pid"):
        text = pid_file.read_text().strip()
        if text.isdigit() and is_prefect_server(int(text)):
            stop_pid(int(text))


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the session, schema migrated, dropped at the end."""
    try:
        with fresh_postgres_database() as url:
            init_db(url)
            yield url
    except RuntimeError as exc:
        unavailable("PostgreSQL", str(exc))


def truncate_all(url: str) -> None:
    engine = get_engine(url)
    with engine.begin() as conn:
        # every table of the catalogue but the schema version (a new table needs no edit here)
        tables = conn.execute(
            sa.text(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                "AND tablename <> 'alembic_version'"
            )
        ).scalars()
        conn.execute(sa.text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The catalogue URL, once on SQLite and once on PostgreSQL; DLM_DATABASE_URL points at it."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalogue.db'}"
        init_db(url)
    else:
        url = request.getfixturevalue("postgres_url")
        truncate_all(url)
    monkeypatch.setenv("DLM_DATABASE_URL", url)
    settings_mod.reset_settings()
    yield url
    if request.param == "sqlite":
        get_engine(url).dispose()
        dispose_engines()


@pytest.fixture
def pg_db_url(postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """PostgreSQL only (claims, concurrency, COPY)."""
    truncate_all(postgres_url)
    monkeypatch.setenv("DLM_DATABASE_URL", postgres_url)
    settings_mod.reset_settings()
    return postgres_url


# --------------------------------------------------------------------------- S3 (SeaweedFS)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real SeaweedFS S3 server on free loopback ports, with access keys; stopped at the end."""
    from devrig.seaweed import SeaweedError, SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    try:
        server.start()
    except SeaweedError as exc:
        server.stop()
        unavailable("SeaweedFS S3 server", str(exc))
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: object, monkeypatch: pytest.MonkeyPatch) -> object:
    """The S3 server's credentials in the environment, as AWS_* and DLM_TEST_S3_*."""
    from devrig.seaweed import SeaweedServer

    assert isinstance(s3_server, SeaweedServer)
    for prefix in ("AWS", "DLM_TEST_S3"):
        monkeypatch.setenv(f"{prefix}_ACCESS_KEY_ID", s3_server.access_key)
        monkeypatch.setenv(f"{prefix}_SECRET_ACCESS_KEY", s3_server.secret_key)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: object) -> Iterator[str]:
    """A new, empty bucket on the test S3 server, deleted with its objects afterwards: each
    bucket takes volume slots of the session's one server until it is deleted."""
    from devrig.seaweed import SeaweedServer

    assert isinstance(s3_env, SeaweedServer)
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_env.create_bucket(name)
    yield name
    # best effort: a test that stopped or broke the server loses its bucket with it
    with contextlib.suppress(Exception):
        s3_env.delete_bucket(name)


# --------------------------------------------------------------------------- rclone


@pytest.fixture(scope="session")
def rclone_path() -> str:
    from lifecycle.transfer.binary import RcloneNotFoundError, rclone_binary

    try:
        return rclone_binary()
    except RcloneNotFoundError as exc:
        unavailable("rclone", str(exc))
        raise


# --------------------------------------------------------------------------- Prefect


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's test harness (a temporary API server), started once per session (~5 s)."""
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def flows_env(prefect_harness: None, rclone_path: str) -> None:
    """Flows can run: the Prefect harness is up and rclone is there."""


# --------------------------------------------------------------------------- a headless browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's `chromium` (or DLM_TEST_CHROMIUM): no browser download."""
    path = os.environ.get("DLM_TEST_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        unavailable("chromium", "apt-get install -y chromium")
    assert path
    return path


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Any]:
    """A headless chromium driven by playwright, for one test module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("the playwright package", "pip install 'dlm[test]'")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that run flows go last, in their order: the first one starts Prefect's harness,
    whose threads use the global random module, and hypothesis fails a property test that
    runs after that (FlakyStrategyDefinition). Everything else keeps its place."""
    items.sort(key=lambda item: item.get_closest_marker("prefect") is not None)
