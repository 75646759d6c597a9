"""Redaction of secrets in text: every URL's password becomes `***` before anything shows it."""

from __future__ import annotations

import logging
import re
from typing import Any

# scheme://user:password@host...: the password runs to the last '@' before the host's '/'
# (passwords may hold '@'); a URL with only a user name (`user@host`) keeps it.
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'\"]*):[^/\s'\"]*@")
_log_redaction_installed = False


def redact(text: str) -> str:
    """`text` with the password of every URL in it replaced: `postgresql://dlm:***@db/dlm`."""
    if "@" not in text or "://" not in text:
        return text
    return _URL_PASSWORD.sub(r"\g<head>:***@", text)


def has_password(url: str) -> bool:
    """Whether `url` holds a password (`scheme://user:secret@host`)."""
    return redact(url) != url


def redact_value(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with every string redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


def install_log_redaction() -> None:
    """Redact every log record of this process (all loggers, all handlers) as it is made."""
    global _log_redaction_installed
    if _log_redaction_installed:
        return
    make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a record whose args do not fit: leave it to the handler to report
            return record
        if "@" in message and "://" in message:
            record.msg, record.args = redact(message), None
        return record

    logging.setLogRecordFactory(factory)
    _log_redaction_installed = True
