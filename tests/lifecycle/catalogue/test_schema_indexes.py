"""The migrated catalogue has exactly the indexes the models declare (a fresh catalogue, built by
the migrations, matches the models), and migration 0007 drops and its downgrade restores the
indexes no query uses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from lifecycle.catalogue import models, run_log, tokens
from tests.conftest import unavailable

TABLE_MODULES = (models, run_log, tokens)  # every table, on SQLModel.metadata


@contextmanager
def _catalogue(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalogue.db'}"
        return
    from devrig.postgres import fresh_postgres_database

    try:
        with fresh_postgres_database("dlm_ix") as url:
            yield url
    except RuntimeError as exc:
        unavailable("PostgreSQL", str(exc))  # a failure in CI


def _declared(dialect: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """index name -> (table, columns) as the models declare them for `dialect`."""
    out = {}
    for table in SQLModel.metadata.tables.values():
        for ix in table.indexes:
            only = ix._ddl_if  # SQLAlchemy's record of .ddl_if(dialect=...)
            if only is not None and only.dialect is not None and only.dialect != dialect:
                continue
            out[str(ix.name)] = (table.name, tuple(c.name for c in ix.columns) or ("<expr>",))
    return out


def _present(engine: sa.Engine) -> dict[str, tuple[str, tuple[str, ...]]]:
    """index name -> (table, columns) in the database (indexes behind constraints left out)."""
    inspector = sa.inspect(engine)
    out = {}
    for table in inspector.get_table_names():
        for ix in inspector.get_indexes(table):
            if ix.get("duplicates_constraint"):
                continue
            cols: Any = ix["column_names"]
            out[str(ix["name"])] = (table, tuple(c or "<expr>" for c in cols))
    return out


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_migrated_catalogue_has_the_declared_indexes(backend: str, tmp_path: Path) -> None:
    from lifecycle.catalogue.db import get_engine, init_db

    with _catalogue(backend, tmp_path) as url:
        init_db(url)
        engine = get_engine(url)
        present = {k: v for k, v in _present(engine).items() if v[0] != "alembic_version"}
        assert present == _declared(engine.dialect.name)
        engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migration_0007_drops_the_unused_indexes_and_its_downgrade_restores_them(
    backend: str, tmp_path: Path
) -> None:
    from alembic import command

    from lifecycle.catalogue.db import alembic_config, get_engine, init_db

    with _catalogue(backend, tmp_path) as url:
        engine = get_engine(url)
        command.upgrade(alembic_config(engine), "0006")
        before = set(_present(engine))
        assert {"ix_event_ts", "ix_replica_verified"} <= before
        init_db(url)
        after = set(_present(engine))
        dropped = {"ix_event_ts"} | ({"ix_replica_verified"} if backend == "postgres" else set())
        assert after == before - dropped
        command.downgrade(alembic_config(engine), "0006")
        assert set(_present(engine)) == before
        engine.dispose()
