"""GET /metrics: the catalogue's state for Prometheus (an admin token; scrape with a bearer token).

One fresh registry per scrape, filled from the same `public.status` as `dlm status`: items by
state and by target phase, items below their phase's target, live bytes, and per storage its
used and capacity bytes and live copies.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from api.auth import Admin
from lifecycle.catalogue import public
from lifecycle.catalogue.db import session_scope

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
def metrics(who: Admin) -> Response:
    """Prometheus text exposition of the catalogue's state."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

    with session_scope() as s:
        st = public.status(session=s)
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
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
