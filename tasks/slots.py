"""Per-storage limits: a batch holds one slot of the Prefect global concurrency limit
`storage:NAME` of every storage it touches, for as long as it moves or deletes bytes.

A copy batch src -> dst holds both storages' slots (acquired together, all or none, so two
batches never deadlock); a delete batch its storage's. A limit that does not exist yet is
created with DLM_TRANSFER__STORAGE_SLOTS slots; an operator changes it afterwards from the
Prefect UI or `prefect gcl update storage:NAME --limit N` (`--disable` lifts it).

Slots are leased: the holder renews its lease while the batch runs (a thread, every 3/4 of
DLM_TRANSFER__SLOT_LEASE_S, the first time 3/4 of a lease after acquiring), and a holder
that dies without releasing (kill -9, a lost machine) stops renewing, so the server's
repossessor frees its slot at most slot_lease_s + PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS
after the last renewal. Sooner on the same host: the next DLM run there releases the leases of
dead holders as it starts (tasks/orphans.py).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from lifecycle.errors import TransientError
from lifecycle.settings import get_settings
from tasks import orphans

log = logging.getLogger("dlm.slots")

PREFIX = "storage:"
RENEW_AT = 0.75  # of a lease: when the holder renews it
# A slot request or release the server could not answer (503: Prefect's SQLite database was busy;
# or a dropped connection) is tried again after FIRST_RETRY_S, doubling up to MAX_RETRY_S, for
# RETRY_FOR_S at most. Prefect's own client waits 2 s before its first retry, and Prefect 3.9 on
# SQLite answers a slot request 503 whenever another write commits while it runs (its transaction
# reads, then writes): a batch waited 2 s for its slots in most runs.
FIRST_RETRY_S = 0.05
MAX_RETRY_S = 2.0
RETRY_FOR_S = 60.0
_known: set[tuple[str, str]] = set()  # (API URL, limit) this process saw exist
_ensuring = threading.Lock()


def limit_name(storage: str) -> str:
    """The global concurrency limit of a storage: `storage:NAME`."""
    return f"{PREFIX}{storage}"


def ensure_limits(names: Sequence[str], *, default: int | None = None) -> None:
    """Create each global concurrency limit that does not exist yet, with `default` slots
    (DLM_TRANSFER__STORAGE_SLOTS); an existing one is left as the operator set it."""
    from prefect.settings import PREFECT_API_URL

    api = str(PREFECT_API_URL.value() or "")
    if all((api, n) in _known for n in names):
        return
    with _ensuring:  # the batches of one run start together: one of them looks the limits up
        missing = [n for n in names if (api, n) not in _known]
        if missing:
            _ensure(api, missing, default)


def _ensure(api: str, missing: Sequence[str], default: int | None) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    slots = default if default is not None else get_settings().transfer.storage_slots
    with get_client(sync_client=True) as client:
        for name in missing:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with suppress(ObjectAlreadyExists):  # another worker created it first
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=slots, active=True)
                    )
            _known.add((api, name))


def _holder() -> Any:
    """The task run (or flow run) holding the slots, shown with the lease in Prefect."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.runtime import flow_run, task_run

    if task_run.id:
        return ConcurrencyLeaseHolder(type="task_run", id=uuid.UUID(str(task_run.id)))
    if flow_run.id:
        return ConcurrencyLeaseHolder(type="flow_run", id=uuid.UUID(str(flow_run.id)))
    return None


def _send_once(client: Any, path: str, body: dict[str, Any]) -> Any:
    """POST body to the API path through a sync Prefect client's connection, headers and auth,
    once: not through its own retrying send, which waits 2 s before retrying a 503 (and, with
    retries turned off, before giving up). Raises httpx.HTTPStatusError for an error status."""
    import httpx

    http = client._client  # the client's httpx.Client (Prefect's subclass: retries in send)
    request = http.build_request("POST", path, json=body)
    if getattr(http, "enable_csrf_support", False):  # a server with CSRF protection on
        http._add_csrf_headers(request)
    response = httpx.Client.send(http, request)
    response.raise_for_status()
    return response


# Answers worth another try, as Prefect's client retries them (503: busy; 502: a proxy in front
# of a restarting server; 429: rate-limited; 408: request timeout).
RETRY_STATUSES = frozenset({408, 429, 502, 503})


def _answered(request: Callable[[], Any], what: str) -> Any:
    """request()'s response, tried again while the server answers a RETRY_STATUSES status or
    the connection drops (see FIRST_RETRY_S; a Retry-After it sends is waited for at least).
    Raises TransientError naming `what` once RETRY_FOR_S have passed, any other HTTP error as is."""
    import httpx

    give_up = time.monotonic() + RETRY_FOR_S
    delay = FIRST_RETRY_S
    while True:
        wait = delay
        try:
            return request()
        except httpx.HTTPStatusError as exc:
            code = exc.response.status_code
            if code not in RETRY_STATUSES:
                raise
            why = f"the Prefect server answered {code}"
            with suppress(ValueError):
                wait = max(wait, float(exc.response.headers.get("Retry-After") or 0))
        except httpx.TransportError as exc:
            why = f"the Prefect server did not answer ({type(exc).__name__})"
        if time.monotonic() + wait > give_up:
            raise TransientError(f"{why} for {RETRY_FOR_S:g}s: could not {what}")
        time.sleep(wait)
        delay = min(delay * 2, MAX_RETRY_S)


def acquire_slots(names: list[str], *, wait_s: float, lease_s: float) -> Any:
    """One slot of each limit in `names`, leased for lease_s (a ConcurrencyLimitWithLeaseResponse:
    no limits when none of them exists, and a lease all the same when they are inactive). Waits
    while the slots are all taken, as the server's Retry-After says, up to wait_s; then raises
    TimeoutError."""
    import httpx
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse

    holder = _holder()
    body: dict[str, Any] = {"names": names, "slots": 1, "mode": "concurrency", "lease_duration": lease_s}
    if holder is not None:
        body["holder"] = holder.model_dump(mode="json")
    deadline = time.monotonic() + wait_s
    with get_client(sync_client=True) as client:
        while True:
            try:
                response = _answered(
                    lambda: _send_once(client, "/v2/concurrency_limits/increment-with-lease", body),
                    f"request a slot of {', '.join(names)}",
                )
                return ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:  # 423: every slot is taken
                    raise
                retry = float(exc.response.headers.get("Retry-After") or 1)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            time.sleep(min(retry, left))  # then one more request, however little time was left


def release_slots(lease_id: uuid.UUID) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        _answered(
            lambda: _send_once(
                client, "/v2/concurrency_limits/decrement-with-lease", {"lease_id": str(lease_id)}
            ),
            f"release the slot lease {lease_id}",
        )


@contextmanager
def _kept(lease_id: uuid.UUID, lease_s: float) -> Iterator[None]:
    """Renew the lease every RENEW_AT of lease_s while the block runs, from a thread that makes
    its first request only when the first renewal is due: leaving the block (a batch of a second
    or two) never waits for a client to start or a renewal to answer, as Prefect's own
    maintain_concurrency_lease makes it wait (it renews at once). A renewal that fails is logged
    and tried again after 1 s, doubling up to 10 s, until one succeeds (a server restart must not
    kill a transfer; past the lease, the slots may have been given to others meanwhile)."""
    stop = threading.Event()
    ctx = contextvars.copy_context()  # the caller's Prefect settings (API URL) and run context

    def renew() -> None:
        due = lease_s * RENEW_AT
        if stop.wait(due):  # no client until a renewal is due
            return
        from prefect.client.orchestration import get_client

        renewed = time.monotonic() - due  # when the lease was last granted or renewed (about)
        retry = 1.0
        while True:
            try:
                with get_client(sync_client=True) as client:
                    client.renew_concurrency_lease(lease_id=lease_id, lease_duration=lease_s)
                renewed, retry, wait = time.monotonic(), 1.0, due
            except Exception as exc:  # logged; tried again before the lease runs out
                if stop.is_set():
                    return
                left = renewed + lease_s - time.monotonic()
                log.warning(
                    "renewing the slot lease %s failed (%s); %s",
                    lease_id,
                    exc,
                    f"trying again, {left:.0f}s of it left"
                    if left > 0
                    else "the slots may be free for others now",
                )
                wait, retry = retry, min(retry * 2, 10.0)
            if stop.wait(wait):
                return

    thread = threading.Thread(target=ctx.run, args=(renew,), name=f"dlm-slot-lease-{lease_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


@contextmanager
def storage_slots(storages: Sequence[str]) -> Iterator[None]:
    """Hold one slot of each storage's limit for the duration of the block.

    What Prefect's `concurrency()` does (acquire with a lease, renew it while the block runs,
    release; _kept renews), with the lease recorded under `$DLM_HOME/runs/` while held (tasks/orphans.py), so
    that the next run on this host releases it at once if this process is killed.

    Raises TransientError when the slots are not free within DLM_TRANSFER__SLOT_WAIT_S (the
    batch task is then retried like any transient failure).
    """
    # the events Prefect's own `concurrency()` emits (it keeps the lease id to itself, so not it)
    from prefect.concurrency._events import (
        emit_concurrency_acquisition_events,
        emit_concurrency_release_events,
    )
    from prefect.settings import PREFECT_API_URL

    names = sorted({limit_name(s) for s in storages})
    if not names:
        yield
        return
    t = get_settings().transfer
    ensure_limits(names)
    try:
        acquired = acquire_slots(names, wait_s=t.slot_wait_s, lease_s=t.slot_lease_s)
    except TimeoutError:
        raise TransientError(
            f"waited {t.slot_wait_s:g}s for a slot of {', '.join(names)}: other batches hold "
            "them all (raise the limit with `prefect gcl update`, or DLM_TRANSFER__SLOT_WAIT_S)"
        ) from None
    if not acquired.limits:  # the limits are gone or inactive (`prefect gcl update --disable`)
        yield
        return
    record: Path | None = None
    emitted: Any = None
    try:
        record = orphans.record_lease(acquired.lease_id, names, str(PREFECT_API_URL.value() or ""))
        emitted = emit_concurrency_acquisition_events(acquired.limits, 1)
        with _kept(acquired.lease_id, t.slot_lease_s):
            yield
    finally:
        # never raises: the batch's own outcome (or error) is what the caller must see
        try:
            release_slots(acquired.lease_id)
        except Exception as exc:
            # renewals have stopped: the server frees the slots at most a lease later; the record
            # stays, so the next run on this host releases them at once
            log.warning("releasing the slots of %s failed: %s", ", ".join(names), exc)
        else:
            if record is not None:
                record.unlink(missing_ok=True)
            if emitted is not None:
                emit_concurrency_release_events(acquired.limits, 1, emitted)
