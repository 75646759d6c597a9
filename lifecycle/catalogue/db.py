"""Engines, sessions and schema migrations for the catalogue (SQLite or PostgreSQL)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, event, func, inspect, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, create_engine

from lifecycle.errors import ConflictError, InvalidValueError, TransientError
from lifecycle.redact import redact
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

    Raises InvalidValueError for a URL that is not a database DLM can use (the message shows
    the URL with its password redacted), TransientError if a SQLite file's directory cannot be made.
    """
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError with a long text
        raise InvalidValueError(
            f"invalid database URL {redact(url)[:200]!r} (DLM_DATABASE_URL): use sqlite:///PATH "
            "or postgresql://USER@HOST/DB"
        ) from exc
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            try:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise TransientError(
                    f"cannot create the catalogue's directory {str(Path(parsed.database).parent)!r}: "
                    f"{exc.strerror}"
                ) from None
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True)
    raise InvalidValueError(
        f"unsupported database {parsed.get_backend_name()!r} in DLM_DATABASE_URL: use sqlite or postgresql"
    )


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


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def _unreachable(exc: OperationalError) -> TransientError:
    msg = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
    return TransientError(f"cannot reach the catalogue database: {msg}")


def _known_revisions() -> set[str]:
    """The revisions of this DLM's migrations (read from the files, without loading alembic)."""
    found = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        m = _REVISION.search(path.read_text(encoding="utf-8"))
        if m:
            found.add(m.group(1))
    return found


_REVISION = re.compile(r"""^revision\s*(?::\s*str\s*)?=\s*['"]([^'"]+)['"]""", re.MULTILINE)


def current_revision(engine: Engine) -> str | None:
    """The catalogue's schema revision (None before the first migration).

    Raises TransientError when the database cannot be reached.
    """
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            rev = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except OperationalError as exc:
        raise _unreachable(exc) from exc
    return str(rev) if rev else None


def check_schema_known(engine: Engine) -> None:
    """Refuse a catalogue migrated by a newer DLM (this one cannot know its tables).

    Raises ConflictError naming the revision; TransientError when the database cannot be reached.
    """
    rev = current_revision(engine)
    if rev is not None and rev not in _known_revisions():
        raise ConflictError(f"catalogue schema {rev} is newer than this DLM; upgrade DLM")


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """One migrating process at a time: a PostgreSQL advisory lock (held by its own connection
    until the end), or an exclusive lock on a file beside a SQLite catalogue."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK_KEY})
                conn.commit()
        return
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    import fcntl

    try:
        lock = open(f"{database}.migrate.lock", "a+b")  # noqa: SIM115 (closed below)
    except OSError:  # a read-only directory: SQLite's own write lock is all there is
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_MIGRATION_LOCK_KEY = 0x444C4D5F4D494752 & 0x7FFFFFFFFFFFFFFF  # "DLM_MIGR": one key for all DLMs


def init_db(url: str | None = None) -> str:
    """Create or upgrade the catalogue schema to the newest migration; returns its revision.

    Concurrent calls (several `dlm init` on a fresh database) run one after the other.
    Raises TransientError when the database cannot be reached, ConflictError when the
    catalogue's schema is newer than this DLM.
    """
    from alembic import command

    engine = get_engine(url)
    check_schema_known(engine)  # also: the database can be reached
    try:
        with _migration_lock(engine):
            check_schema_known(engine)  # another DLM may have migrated it while we waited
            command.upgrade(alembic_config(engine), "head")
    except OperationalError as exc:
        raise _unreachable(exc) from exc
    return current_revision(engine) or ""


def schema_ready(engine: Engine) -> bool:
    """Whether the catalogue's tables exist; raises TransientError when the database cannot be reached."""
    try:
        return inspect(engine).has_table("item")
    except OperationalError as exc:
        raise _unreachable(exc) from exc


def one_of(dialect: str, column: Any, values: Sequence[Any]) -> ColumnElement[bool]:
    """`column IN values`; on PostgreSQL `column = ANY(array)`: one parameter instead of
    thousands for the driver to render and convert per statement."""
    result: ColumnElement[bool]
    if dialect == "postgresql":
        result = column == func.any(bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
    else:
        result = column.in_(values)
    return result
