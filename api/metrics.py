"""GET /metrics: the catalogue's state for Prometheus (an admin token; scrape with a bearer token).

One fresh registry per scrape, filled from the same `public.status` as `dlm status`: items by
state and by target phase, items below their phase's target, live bytes, and per storage its
used and capacity bytes and live copies; transfers per storage pair, kind and state (count and
bytes); and pipeline runs per pipeline and outcome from the catalogue's run log (count, summed
and last duration), so a Grafana panel can graph run durations and failure rates.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from api.auth import Admin
from lifecycle.catalogue import overview, public
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.run_log import run_totals

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
def metrics(who: Admin) -> Response:
    """Prometheus text exposition of the catalogue's state."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

    with session_scope() as s:
        st = public.status(session=s)
        moved = overview.transfer_totals(session=s)
        runs = run_totals(s)
    registry = CollectorRegistry(auto_describe=False)
    by_state = Gauge("dlm_items", "Items by state", ["state"], registry=registry)
    for state, n in st.items_by_state.items():
        by_state.labels(state=state).set(n)
    by_phase = Gauge("dlm_live_items_by_phase", "Live items by target phase", ["phase"], registry=registry)
    for phase, n in st.items_by_phase.items():
        by_phase.labels(phase=phase).set(n)
    Gauge(
        "dlm_items_below_target",
        "Live items with fewer intact copies than their phase needs",
        registry=registry,
    ).set(st.below_target)
    Gauge("dlm_live_bytes", "Bytes of live items (one copy each)", registry=registry).set(st.bytes)
    used = Gauge(
        "dlm_storage_used_bytes", "Bytes on a storage", ["storage", "tier", "state"], registry=registry
    )
    cap = Gauge("dlm_storage_capacity_bytes", "A storage's capacity", ["storage"], registry=registry)
    copies = Gauge("dlm_storage_copies", "Live copies on a storage", ["storage"], registry=registry)
    for u in st.storages:
        used.labels(storage=u.name, tier=u.tier, state=u.state).set(u.used_bytes)
        copies.labels(storage=u.name).set(u.replicas)
        if u.capacity_bytes is not None:
            cap.labels(storage=u.name).set(u.capacity_bytes)
    pair = ["source", "destination", "kind", "state"]
    reg = registry
    transfers = Gauge("dlm_transfers", "Transfers per storage pair, kind and state", pair, registry=reg)
    moved_bytes = Gauge("dlm_transfer_bytes", "Bytes of those transfers", pair, registry=reg)
    for t in moved:
        labels = {"source": t.src or "", "destination": t.dst or "", "kind": t.kind, "state": t.state}
        transfers.labels(**labels).set(t.transfers)
        moved_bytes.labels(**labels).set(t.bytes)
    how = ["pipeline", "outcome"]
    run_count = Gauge("dlm_pipeline_runs", "Finished pipeline runs (no dry runs)", how, registry=reg)
    run_seconds = Gauge("dlm_pipeline_run_seconds_sum", "Summed wall time of those runs", how, registry=reg)
    last = Gauge("dlm_pipeline_last_run_seconds", "Wall time of the newest run", how, registry=reg)
    last_end = Gauge(
        "dlm_pipeline_last_run_finished_timestamp_seconds", "When the newest run finished", how, registry=reg
    )
    for r in runs:
        labels = {"pipeline": r.pipeline, "outcome": r.outcome}
        run_count.labels(**labels).set(r.runs)
        run_seconds.labels(**labels).set(r.seconds)
        last.labels(**labels).set(r.last_seconds)
        last_end.labels(**labels).set(r.last_finished.timestamp())
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
