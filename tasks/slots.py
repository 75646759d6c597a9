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
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from lifecycle.errors import TransientError
from lifecycle.settings import get_settings
from tasks import orphans

log = logging.getLogger("dlm.slots")

PREFIX = "storage:"
RENEW_AT = 0.75  # of a lease: when the holder renews it
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


@contextmanager
def _kept(lease_id: uuid.UUID, lease_s: float) -> Iterator[None]:
    """Renew the lease every RENEW_AT of lease_s while the block runs, from a thread that makes
    its first request only when the first renewal is due: leaving the block (a batch of a second
    or two) never waits for a client to start or a renewal to answer, as Prefect's own
    maintain_concurrency_lease makes it wait (it renews at once). A renewal that fails is logged
    and tried again at the next turn (a server restart must not kill a transfer)."""
    stop = threading.Event()
    ctx = contextvars.copy_context()  # the caller's Prefect settings (API URL) and run context

    def renew() -> None:
        if stop.wait(lease_s * RENEW_AT):  # no client until a renewal is due
            return
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while True:
                try:
                    client.renew_concurrency_lease(lease_id=lease_id, lease_duration=lease_s)
                except Exception as exc:  # logged; the next turn tries again
                    if not stop.is_set():
                        log.warning("renewing the slot lease %s failed (%s); trying again", lease_id, exc)
                if stop.wait(lease_s * RENEW_AT):
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
    # Prefect 3.9's own pieces of `concurrency()`: it keeps the lease id to itself
    from prefect.concurrency._events import (
        emit_concurrency_acquisition_events,
        emit_concurrency_release_events,
    )
    from prefect.concurrency._sync import (
        acquire_concurrency_slots_with_lease,
        release_concurrency_slots_with_lease,
    )
    from prefect.settings import PREFECT_API_URL

    names = sorted({limit_name(s) for s in storages})
    if not names:
        yield
        return
    t = get_settings().transfer
    ensure_limits(names)
    try:
        acquired = acquire_concurrency_slots_with_lease(
            names, 1, timeout_seconds=t.slot_wait_s, lease_duration=t.slot_lease_s, holder=_holder()
        )
    except TimeoutError:
        raise TransientError(
            f"waited {t.slot_wait_s:g}s for a slot of {', '.join(names)}: other batches hold "
            "them all (raise the limit with `prefect gcl update`, or DLM_TRANSFER__SLOT_WAIT_S)"
        ) from None
    if not acquired.limits:  # the limits are gone or inactive (`prefect gcl update --disable`)
        yield
        return
    record = orphans.record_lease(acquired.lease_id, names, str(PREFECT_API_URL.value() or ""))
    emitted = emit_concurrency_acquisition_events(acquired.limits, 1)
    try:
        with _kept(acquired.lease_id, t.slot_lease_s):
            yield
    finally:
        release_concurrency_slots_with_lease(acquired.lease_id)
        record.unlink(missing_ok=True)  # (kept when the release failed: the next run retries it)
        emit_concurrency_release_events(acquired.limits, 1, emitted)
