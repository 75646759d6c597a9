"""What every `dlm` command module shares: the catalogue session and the `--json` option."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from sqlmodel import Session

from lifecycle.catalogue.db import check_schema_known, get_engine, init_db, schema_ready, session_scope

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


@contextmanager
def catalogue() -> Iterator[Session]:
    """A session on the configured catalogue; creates the schema on first use."""
    engine = get_engine()
    if not schema_ready(engine):
        init_db()
    else:
        check_schema_known(engine)
    with session_scope() as session:
        yield session
