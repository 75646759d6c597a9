"""Who is asking: the bearer token of every request, checked against the catalogue's tokens."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lifecycle.catalogue.db import session_scope
from lifecycle.catalogue.tokens import Principal, authenticate

_bearer = HTTPBearer(auto_error=False, description="a token from `dlm token create`")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def check_token(secret: str) -> Principal | None:
    """The principal of a token's secret; None for an unknown, malformed or revoked one."""
    with session_scope() as s:
        return authenticate(secret, session=s)


def principal(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The request's principal. 401 without a bearer token, or with an unknown or revoked one."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "missing bearer token: send Authorization: Bearer TOKEN", headers=_CHALLENGE)
    found = check_token(credentials.credentials)
    if found is None:
        raise HTTPException(401, "invalid or revoked token", headers=_CHALLENGE)
    return found


def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
    """The request's principal, which must be an admin (403 otherwise)."""
    if not who.admin:
        raise HTTPException(403, "this needs an admin token")
    return who


Who = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]


def scope(who: Principal) -> str | None:
    """The owner whose items a principal sees (None: an admin sees every owner's)."""
    return None if who.admin else who.owner
