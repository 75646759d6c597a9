"""What every DLM task shares: retries on transient errors only, and no result caching."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from lifecycle.errors import TransientError


def transient_only(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a task only when it failed with a TransientError (a timeout, a storage briefly gone)."""
    try:
        state.result()
    except TransientError:
        return True
    except Exception:
        return False
    return False


def dlm_task(
    name: str, *, task_run_name: str | None = None, retry_delay_seconds: float = 5
) -> Callable[[Any], Any]:
    """A task that works on one batch: two retries for transient errors, never cached (its
    inputs are large and its effects are not pure)."""
    return task(
        name=name,
        task_run_name=task_run_name or name,
        cache_policy=NO_CACHE,
        retries=2,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=transient_only,
    )
