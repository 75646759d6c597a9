"""SQL plumbing shared by every writer of the catalogue.

Session factories, the worker id on rows held in flight, dialect checks, insert-or-ignore, and
the chunks that keep an IN list under the database's parameter limits.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, SQLModel

from lifecycle.catalogue.db import session_scope
from lifecycle.errors import DLMError

SessionFactory = Callable[[], AbstractContextManager[Session]]


def worker_id() -> str:
    """host:pid of this process, written on the rows it holds in flight (see lifecycle.recovery)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def default_sessions() -> AbstractContextManager[Session]:
    """A session on the configured catalogue, committed on success (lifecycle.catalogue.db)."""
    return session_scope()


def insert_ignore(session: Session, table: Any) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING for the session's dialect. Raises DLMError on another."""
    name = session.get_bind().dialect.name
    if name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if name == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    raise DLMError(f"unsupported database {name}")


def is_postgres(session: Session) -> bool:
    """Whether the session talks to PostgreSQL (row locks, SKIP LOCKED) rather than SQLite."""
    return session.get_bind().dialect.name == "postgresql"


# Values per IN list: well under SQLite's and PostgreSQL's limits on bound parameters.
CHUNK = 500


def chunks(seq: Sequence[Any], n: int = CHUNK) -> Iterable[Sequence[Any]]:
    """Consecutive slices of `seq` of at most `n` values, for `col.in_(chunk)` queries."""
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def core_table(name: str) -> Table:
    """The Core table of a catalogue model (bulk paths bypass the ORM)."""
    return SQLModel.metadata.tables[name]
