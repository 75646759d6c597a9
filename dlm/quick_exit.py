"""A finished `dlm` process exits without tearing its imported modules down.

Finalizing the interpreter (clearing some 3,000 modules of Prefect, SQLAlchemy, pydantic...)
takes longer than a `dlm run` with nothing to do spends working. `armed()` wraps the command:
once it has ended, and every other exit handler has run (Prefect's drain their event and log
queues; this one is registered first, so it runs last), logging and the standard streams are
flushed and the process exits with the command's code at once.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress

_code: list[int] = []


def _exit_now() -> None:
    if not _code:
        return  # the command did not end normally (an uncaught exception): exit as usual
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):
            stream.flush()
    os._exit(_code[0])


@contextmanager
def armed() -> Iterator[None]:
    """Run a whole command in this block; call it before anything registers an exit handler."""
    atexit.register(_exit_now)
    try:
        yield
    except SystemExit as exc:
        code = exc.code
        if code is None or isinstance(code, int):
            _code.append(code or 0)
        raise
    _code.append(0)
