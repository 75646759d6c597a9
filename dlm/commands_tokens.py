"""`dlm token ...` (create, list, revoke the REST API's tokens) and `dlm api` (serve the REST API).

Parse, call, render: the rules are in lifecycle.catalogue.tokens, the API in api/.
"""

from __future__ import annotations

from typing import Annotated

import typer

from dlm import render
from dlm.common import JsonOpt, catalogue
from lifecycle.catalogue import tokens

token_app = typer.Typer(help="API tokens: create, list, revoke.", no_args_is_help=True)


@token_app.command("create")
def token_create(
    owner: Annotated[str, typer.Option(help="who the token acts as (the actor of its changes)")],
    admin: Annotated[bool, typer.Option("--admin", help="may see and change every owner's items")] = False,
    json_: JsonOpt = False,
) -> None:
    """Issue a token. Its secret is printed once, as the last line: it is not kept anywhere."""
    data = tokens.TokenCreate.build({"owner": "--owner"}, owner=owner, admin=admin)
    with catalogue() as s:
        new = tokens.create_token(data, session=s)
    if json_:
        render.print_json(new)
        return
    kind = "admin token" if new.admin else "token"
    render.out.print(f"{kind} {new.id} for {new.owner} (shown once, keep it safe):", markup=False)
    render.out.print(new.secret, markup=False, soft_wrap=True)


@token_app.command("list")
def token_list(json_: JsonOpt = False) -> None:
    """Every token: id, owner, admin, created, revoked (never the secrets)."""
    with catalogue() as s:
        rows = tokens.list_tokens(session=s)
    if json_:
        render.print_json(rows)
        return
    render.table(
        "API tokens",
        ["id", "owner", "admin", "created", "revoked"],
        [
            (t.id, t.owner, "yes" if t.admin else "no", render.when(t.created_at), render.when(t.revoked_at))
            for t in rows
        ],
    )


@token_app.command("revoke")
def token_revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="as `dlm token list` shows")],
) -> None:
    """Revoke a token: requests with it are refused from now on."""
    value = tokens.check_token_id(token_id)
    with catalogue() as s:
        t = tokens.revoke_token(value, session=s)
    render.out.print(f"token {t.id} of {t.owner} revoked", markup=False)


def api(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")] = 8080,
) -> None:
    """Serve the REST API (OpenAPI at /api/openapi.json, docs at /api/docs) and the operator
    dashboard at / (an admin token's login); Ctrl-C stops."""
    import uvicorn

    from api.app import create_app

    with catalogue():
        pass  # the schema exists (or is created) before the first request
    render.out.print(
        f"DLM API on http://{host}:{port}/api (docs: /api/docs; operator dashboard: /)", markup=False
    )
    uvicorn.run(create_app(), host=host, port=port, log_level="info", server_header=False)
