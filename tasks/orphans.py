"""What a run on this host holds in Prefect, written down so that a later run can clean up after
one that was killed (kill -9, a closed terminal, an OOM kill) without telling the server.

A `dlm run` sends no heartbeats (dlm/server_cli.py), so nothing on the server notices its
process is gone: its flow run would stay Running in the UI for good, and the `storage:NAME`
slots its batches held would stay taken until the server's repossessor frees them (a lease
plus a pass, about 75 s; never on a server without one). So each flow run and each slot lease
is recorded while held, as a file under `$DLM_HOME/runs/` naming the host, the pid (and its
start time, so a reused pid is not mistaken for the holder) and the API; the holder removes it
when done. Every DLM flow run starts by looking there (`clean_up_dead_runs`): a record of this
host whose process is gone has its lease released (`decrement-with-lease`, which also revokes
it: the repossessor never frees it twice) and its flow run, with the task runs still running
in it, marked Crashed. Records of other hosts are theirs to clean up (or their leases the
repossessor's).

Imports Prefect only inside the functions that talk to the server: `dead_records` serves the
check `dlm run` makes before deciding it has nothing to do.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifecycle.integrity.recovery import claim_is_dead
from lifecycle.settings import get_settings

log = logging.getLogger("dlm.orphans")

FLOW_RUN = "flow-run"
LEASE = "lease"


def records_dir() -> Path:
    return get_settings().home / "runs"


def process_started(pid: int) -> str:
    """The start time of process `pid` (clock ticks since boot, from /proc), "" where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


def _path(kind: str, key: str) -> Path:
    return records_dir() / f"{kind}-{key}.json"


def _write(kind: str, key: str, data: dict[str, Any]) -> Path:
    """Write a record atomically (a reader never sees half of one)."""
    path = _path(kind, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"kind": kind, "id": key, **_me(), **data}))
    tmp.replace(path)
    return path


def _me() -> dict[str, Any]:
    """Who holds a record: this host, this process and when it started."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_started(os.getpid())}


def _is_dead(record: dict[str, Any]) -> bool:
    """Whether the process that wrote `record` on this host is gone (or its pid now belongs to
    another process). A record of another host is never judged dead here."""
    host, pid = record.get("host"), record.get("pid")
    if host != socket.gethostname() or not isinstance(pid, int):
        return False
    if claim_is_dead(f"{host}:{pid}", stale=False):
        return True
    started = record.get("started")
    return bool(started) and pid != os.getpid() and process_started(pid) not in ("", started)


def dead_records() -> list[Path]:
    """The records left by processes of this host that are gone (no Prefect, no network)."""
    found = []
    try:
        paths = sorted(records_dir().glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and _is_dead(record):
            found.append(path)
    return found


# --------------------------------------------------------------------------- what a run holds


_held: dict[str, int] = {}  # flow run id -> how many nested tracked_run blocks hold its record
_held_lock = threading.Lock()


@contextmanager
def tracked_run() -> Iterator[None]:
    """The block of a DLM flow run: first clean up after this host's dead runs, then record
    this flow run until the block ends (nested blocks of one run, e.g. its partitions run
    here in turn, keep one record). Outside a flow run (or without a server) does nothing."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL

    run_id = str(flow_run.get_id() or "")
    api = str(PREFECT_API_URL.value() or "")
    if not run_id or not api:
        yield
        return
    with _held_lock:
        first = _held.get(run_id, 0) == 0
        _held[run_id] = _held.get(run_id, 0) + 1
    if first:
        clean_up_dead_runs()
        _write(FLOW_RUN, run_id, {"api": api})
    try:
        yield
    finally:
        with _held_lock:
            _held[run_id] -= 1
            last = _held[run_id] == 0
            if last:
                del _held[run_id]
        if last:
            _path(FLOW_RUN, run_id).unlink(missing_ok=True)


def record_lease(lease_id: uuid.UUID, limits: Sequence[str], api: str) -> Path:
    """Record a slot lease this process holds (tasks/slots.py); remove the file on release."""
    from prefect.runtime import flow_run

    return _write(
        LEASE, str(lease_id), {"api": api, "limits": list(limits), "flow_run": str(flow_run.get_id() or "")}
    )


# --------------------------------------------------------------------------- cleaning up


@dataclass
class CleanUp:
    released: int = 0  # slot leases of dead processes released
    crashed: int = 0  # flow runs of dead processes marked Crashed
    failed: int = 0  # records kept for the next run (the server did not answer)


def clean_up_dead_runs() -> CleanUp:
    """Release the slot leases and crash the flow runs that dead processes of this host left
    (see the module docstring); each record done is removed, one the server could not be
    told about is kept for the next run. Never raises."""
    done = CleanUp()
    for path in dead_records():
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        try:
            _settle(record, done)
        except Exception as exc:  # the server is down or refuses: try again next run
            done.failed += 1
            _logger().warning("could not clean up after dead run record %s: %s", path.name, exc)
            continue
        with suppress(OSError):
            path.unlink()
    if done.released or done.crashed:
        _logger().warning(
            "cleaned up after runs killed on this host: %d slot lease(s) released, "
            "%d flow run(s) marked Crashed",
            done.released,
            done.crashed,
        )
    return done


def _logger() -> Any:
    """The flow run's logger (its lines in the UI too), or a plain one outside a run."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _settle(record: dict[str, Any], done: CleanUp) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    api = str(record.get("api") or "")
    if not api:
        return
    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        if record.get("kind") == LEASE:
            client.release_concurrency_slots_with_lease(uuid.UUID(str(record["id"])))
            done.released += 1
        elif record.get("kind") == FLOW_RUN:
            done.crashed += _crash(client, uuid.UUID(str(record["id"])), record)


def _crash(client: Any, run_id: uuid.UUID, record: dict[str, Any]) -> int:
    """Mark flow run `run_id` Crashed, and its task runs still running, unless it already
    ended; returns 1 if it was marked."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    why = f"the process running it (pid {record.get('pid')} on {record.get('host')}) is gone"
    try:
        run = client.read_flow_run(run_id)
    except ObjectNotFound:
        return 0
    tasks = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
        task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(
                type=TaskRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED])
            )
        ),
    )
    for task in tasks:
        client.set_task_run_state(task.id, Crashed(message=why), force=True)
    if run.state is not None and run.state.is_final():
        return 0
    client.set_flow_run_state(run_id, Crashed(message=why), force=True)
    return 1
