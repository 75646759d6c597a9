"""Rendering for the CLI: rich tables for people, JSON for scripts."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from enum import Enum
from typing import Any

from rich.console import Console
from rich.table import Table

from lifecycle.redact import redact
from lifecycle.units import format_size

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Enum):
        return str(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def print_json(data: Any) -> None:
    """JSON on stdout, with the password of any URL in it redacted."""
    sys.stdout.write(redact(json.dumps(data, default=_default, indent=2, ensure_ascii=False)) + "\n")


def when(ts: datetime | None) -> str:
    return ts.strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def size(n: int | None) -> str:
    return format_size(n)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*("-" if v is None else redact(str(v)) for v in r))
    out.print(t)
