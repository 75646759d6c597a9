"""What every DLM task shares: retries on transient errors only, and no result caching."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lifecycle.errors import DLMError, TransientError
from lifecycle.settings import get_settings


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a task only when it failed with a TransientError (a timeout, a storage briefly gone)."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False


def transfer_retries() -> int:
    """DLM_TRANSFER__RETRIES (default 2): how often a batch task is retried after a transient
    error. Read when the tasks are defined (a worker's start); an invalid setting leaves the
    default here and is reported by the first core call that reads the settings."""
    try:
        return get_settings().transfer.retries
    except DLMError:
        return 2


def dlm_task(
    name: str, *, task_run_name: str | None = None, retry_delay_seconds: float = 5
) -> Callable[[Any], Any]:
    """A task that works on one batch: retried on transient errors only (transfer_retries()
    times), never cached (its inputs are large and its effects are not pure)."""
    return task(
        name=name,
        task_run_name=task_run_name or name,
        cache_policy=NO_CACHE,
        retries=transfer_retries(),
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=transient_only,
    )
