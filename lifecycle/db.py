"""Engines, sessions and schema migrations for the catalogue (SQLite or PostgreSQL)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, event, func, inspect
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, create_engine

from lifecycle.errors import DLMError, TransientError
from lifecycle.settings import get_settings

MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE (see _sqlite_begin).
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    """Writers take SQLite's write lock when their transaction starts, so two processes never
    both read and then both try to write (which SQLite answers with 'database is locked' at
    once instead of waiting); with the busy timeout, writers queue instead."""
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite files get WAL, foreign keys and a busy timeout.

    Raises DLMError for a URL that is not a database DLM can use.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with a long text
        raise DLMError(f"invalid database URL {url!r}") from exc
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True)
    raise DLMError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql")


_ENGINES: dict[str, Engine] = {}


def get_engine(url: str | None = None) -> Engine:
    """The engine for `url`, or for the configured catalogue; one per URL per process."""
    key = url or get_settings().db_url
    engine = _ENGINES.get(key)
    if engine is None:
        engine = _ENGINES[key] = make_engine(key)
    return engine


def dispose_engines() -> None:
    """Close every cached engine's connections and forget the engines (tests, forked workers)."""
    for engine in list(_ENGINES.values()):
        engine.dispose()
    _ENGINES.clear()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits when the block ends and rolls back on error."""
    with Session(get_engine(url), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except OperationalError as exc:
            session.rollback()
            raise TransientError(f"database error: {str(exc.orig).strip().splitlines()[0]}") from exc
        except BaseException:
            session.rollback()
            raise


def _alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def init_db(url: str | None = None) -> str:
    """Create or upgrade the catalogue schema to the newest migration; returns its revision.

    Raises TransientError when the database cannot be reached.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    engine = get_engine(url)
    try:
        with engine.connect() as conn:
            conn.close()
    except OperationalError as exc:
        msg = str(exc.orig).strip().splitlines()[0]
        raise TransientError(f"cannot reach the catalogue database: {msg}") from exc
    command.upgrade(_alembic_config(engine), "head")
    with engine.connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
    return rev or ""


def schema_ready(engine: Engine) -> bool:
    return inspect(engine).has_table("item")


def one_of(dialect: str, column: Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """`column IN values`; on PostgreSQL `column = ANY(array)`: one parameter instead of
    thousands for the driver to render and convert per statement."""
    result: ColumnElement[bool]
    if dialect == "postgresql":
        result = column == func.any(bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
    else:
        result = column.in_(values)
    return result


def none_of(dialect: str, column: Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """`column NOT IN values`; on PostgreSQL `column <> ALL(array)` (not `~one_of`, which
    SQLAlchemy renders as `<> ANY`)."""
    result: ColumnElement[bool]
    if dialect == "postgresql":
        result = column != func.all(bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
    else:
        result = column.notin_(values)
    return result
