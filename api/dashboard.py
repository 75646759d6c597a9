"""The operator dashboard at `/`: one server-rendered, read-only HTML page of the catalogue's state.

Access is an admin token's: `/login` takes the token in a form and sets it as an HttpOnly,
SameSite=Strict cookie; every page load checks it again as the API checks a bearer token
(`api.auth.check_token`), so a revoked token's cookie stops working at once. `/logout` clears
it. The login form is the page's only form and the dashboard changes nothing, so a forged
cross-site request can do no harm; the login POST is also refused from another origin.

The numbers come from `lifecycle.catalogue.overview` (the same status as `dlm status` and
GET /metrics, in bulk SQL). Links to the Prefect UI's runs use PREFECT_UI_URL, else the UI of
the Prefect server the DLM commands use (deployments/server.py); with none known the page says so.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.concurrency import run_in_threadpool

from api.auth import check_token
from deployments import server as prefect_server
from lifecycle.catalogue import overview
from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.tokens import Principal
from lifecycle.settings import get_settings
from lifecycle.states import ItemState, Phase, TransferState
from lifecycle.units import format_size

router = APIRouter(include_in_schema=False)

COOKIE = "dlm_dashboard"
COOKIE_MAX_AGE_S = 12 * 3600
ROWS = 20  # rows of each list on the page
REFRESH_S = 60  # the page reloads itself this often
MAX_LOGIN_BODY = 4096
MAX_DETAILS = 300  # characters of an event's details shown
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
NOT_ADMIN = "this needs an admin token (dlm token create --owner NAME --admin); {owner}'s is not one"


# --------------------------------------------------------------------------- rendering


def _when(ts: datetime | None) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _compact(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    return text if len(text) <= MAX_DETAILS else text[: MAX_DETAILS - 1] + "…"


def _percent(used: int, capacity: int | None) -> str:
    return "-" if not capacity else f"{100 * used / capacity:.1f}%"


@cache
def _templates() -> Environment:
    env = Environment(
        loader=PackageLoader("api", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(size=format_size, when=_when, percent=_percent, n="{:,}".format, compact=_compact)
    return env


def _page(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = _templates().get_template(template).render(**context)
    return HTMLResponse(html, status_code=status, headers=HEADERS)


def _login_page(error: str | None = None, status: int = 200) -> HTMLResponse:
    return _page("login.html", status, error=error)


def _to(path: str, *, forget: bool = False) -> RedirectResponse:
    response = RedirectResponse(path, status_code=303, headers=HEADERS)
    if forget:
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


# --------------------------------------------------------------------------- the Prefect UI


def prefect_ui_url() -> str | None:
    """The Prefect UI to link runs to: PREFECT_UI_URL, else the UI of the Prefect server the
    DLM commands use (PREFECT_API_URL or the profile's, the one `dlm serve` announced, the DLM
    home's own server), if one is running; None when none is known. Only http(s) URLs."""
    url = os.environ.get("PREFECT_UI_URL", "").strip()
    if not url:
        api_url = prefect_server.configured_api_url() or prefect_server.announced_api_url()
        if not api_url:
            home = prefect_server.home_server_status(get_settings().home)
            api_url = home.url if home is not None else ""
        url = prefect_server.ui_url(api_url) if api_url else ""
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        return None
    return url.rstrip("/")


# --------------------------------------------------------------------------- routes


def _admin(request: Request) -> Principal | None:
    secret = request.cookies.get(COOKIE)
    who = check_token(secret) if secret else None
    return who if who is not None and who.admin else None


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request) -> Response:
    """The dashboard (an admin's login cookie; otherwise a redirect to /login)."""
    who = _admin(request)
    if who is None:
        return _to("/login", forget=COOKIE in request.cookies)
    with session_scope() as s:
        view = overview.overview(session=s, limit=ROWS)
    return _page(
        "dashboard.html",
        view=view,
        who=who,
        now=datetime.now(UTC),
        prefect_ui=prefect_ui_url(),
        item_states=list(ItemState),
        phases=list(Phase),
        transfer_states=list(TransferState),
        refresh_s=REFRESH_S,
    )


@router.get("/login", response_class=HTMLResponse)
def login_form() -> Response:
    return _login_page()


def _same_origin(request: Request) -> bool:
    """Whether a form POST came from a page of this server (no Origin header: not a browser's
    cross-site form, which always sends one)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


async def _form_token(request: Request) -> str | None:
    """The `token` field of a url-encoded form body of at most MAX_LOGIN_BODY bytes."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_LOGIN_BODY:
            return None
    values = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4).get("token") or [""]
    return values[0].strip() or None


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check the token of the login form: an admin's sets the cookie and goes to the dashboard;
    any other gets the form again with one line saying why."""
    if not _same_origin(request):
        return _login_page("login refused: the form was not sent from this server's page", 403)
    try:
        secret = await _form_token(request)
    except ValueError:
        secret = None
    if secret is None:
        return _login_page("no token given: paste an admin token from `dlm token create --admin`", 400)
    who = await run_in_threadpool(check_token, secret)
    if who is None:
        return _login_page("invalid or revoked token", 401)
    if not who.admin:
        return _login_page(NOT_ADMIN.format(owner=who.owner), 403)
    response = _to("/")
    response.set_cookie(
        COOKIE,
        secret,
        max_age=COOKIE_MAX_AGE_S,
        path="/",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.get("/logout")
def logout() -> Response:
    return _to("/login", forget=True)
