"""A fresh PostgreSQL database for a test session or a benchmark, dropped afterwards.

Used by tests/conftest.py and bench/. When CI=true a missing part is a failure, not a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@contextmanager
def fresh_postgres_database(prefix: str = "dlm_test") -> Iterator[str]:
    """Create a fresh database on the server of DLM_TEST_POSTGRES_URL; yield its URL; drop it.

    Raises RuntimeError if the server cannot be reached.
    """
    admin_url = sa.engine.make_url(os.environ.get("DLM_TEST_POSTGRES_URL", DEFAULT_PG))
    if admin_url.drivername == "postgresql":
        admin_url = admin_url.set(drivername="postgresql+psycopg")
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        raise RuntimeError(f"PostgreSQL not reachable at {admin_url!r}: {exc.orig}") from exc
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        from lifecycle.catalogue.db import dispose_engines

        dispose_engines()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
