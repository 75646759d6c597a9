"""API tokens: who may use the REST API, as whom, and whether as an administrator.

A token is a random secret handed out once, when it is created; the catalogue keeps only its
SHA-256 (so a copy of the database gives no one a working token). `authenticate` turns a
secret into a `Principal` (the token's owner, whether it is an admin); a revoked token, or one
never issued, is refused. Every change made with a token is recorded with its owner as actor.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, field_validator
from sqlalchemy import Index, select, update
from sqlmodel import Field, Session, SQLModel, col

from lifecycle.catalogue.inputs import InputModel, field_label
from lifecycle.catalogue.models import UTCDateTime, utcnow
from lifecycle.catalogue.public import IsoDateTime
from lifecycle.errors import InvalidValueError, NotFoundError
from lifecycle.names import validate_owner

# Every secret starts with this, so a leaked one is recognisable (and scanners can find it).
PREFIX = "dlm_"
_ID_HEX = 12  # token ids: 12 hex digits, shown by `dlm token list`
_SECRET_BYTES = 32


class Token(SQLModel, table=True):
    """One API token; the secret itself is never stored, only its SHA-256 (hex)."""

    __tablename__ = "token"
    __table_args__ = (Index("uq_token_hash", "secret_sha256", unique=True),)

    id: str = Field(primary_key=True, max_length=32)
    owner: str
    admin: bool = False
    secret_sha256: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class TokenCreate(InputModel):
    """A new token: its owner (the actor of every change made with it) and whether it is an admin's."""

    owner: str
    admin: bool = False

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str) -> str:
        return validate_owner(value, what=field_label("owner"))


class TokenPublic(BaseModel):
    """A token as listed: never its secret."""

    id: str
    owner: str
    admin: bool
    created_at: IsoDateTime
    revoked_at: IsoDateTime | None

    @classmethod
    def of(cls, token: Token) -> TokenPublic:
        return cls(
            id=token.id,
            owner=token.owner,
            admin=token.admin,
            created_at=token.created_at,
            revoked_at=token.revoked_at,
        )


class NewTokenPublic(TokenPublic):
    """A token just created, with its secret: shown this once, never again."""

    secret: str


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a token's owner, and whether it may see and change everything."""

    token_id: str
    owner: str
    admin: bool


class TokenNotFoundError(NotFoundError):
    pass


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(data: TokenCreate, *, session: Session) -> NewTokenPublic:
    """Issue a token; the result carries the secret, which is not kept anywhere."""
    token_id = secrets.token_hex(_ID_HEX // 2)
    secret = f"{PREFIX}{secrets.token_urlsafe(_SECRET_BYTES)}"
    token = Token(id=token_id, owner=data.owner, admin=data.admin, secret_sha256=_digest(secret))
    session.add(token)
    session.flush()
    return NewTokenPublic(**dict(TokenPublic.of(token)), secret=secret)


def list_tokens(*, session: Session) -> list[TokenPublic]:
    """Every token, oldest first (revoked ones too, with when)."""
    rows = session.scalars(select(Token).order_by(col(Token.created_at), col(Token.id))).all()
    return [TokenPublic.of(t) for t in rows]


def revoke_token(token_id: str, *, session: Session) -> TokenPublic:
    """Revoke a token from now on (revoking it again changes nothing). Raises TokenNotFoundError."""
    token_id = token_id.strip().lower()
    token = session.get(Token, token_id) if token_id else None
    if token is None:
        raise TokenNotFoundError(f"no token {token_id[:40]!r}: `dlm token list` shows the ids")
    if token.revoked_at is None:
        session.execute(
            update(Token)
            .where(col(Token.id) == token.id, col(Token.revoked_at).is_(None))
            .values(revoked_at=utcnow())
        )
        session.refresh(token)
    return TokenPublic.of(token)


def authenticate(secret: str, *, session: Session) -> Principal | None:
    """The principal a secret stands for; None for an unknown, malformed or revoked token."""
    if not secret.startswith(PREFIX) or len(secret) > 200:
        return None
    digest = _digest(secret)
    row: Any = session.execute(
        select(col(Token.id), col(Token.owner), col(Token.admin), col(Token.secret_sha256)).where(
            col(Token.secret_sha256) == digest, col(Token.revoked_at).is_(None)
        )
    ).first()
    if row is None or not hmac.compare_digest(str(row[3]), digest):
        return None
    return Principal(token_id=str(row[0]), owner=str(row[1]), admin=bool(row[2]))


def check_token_id(token_id: str) -> str:
    """A token id as typed (12 hex digits). Raises InvalidValueError."""
    value = token_id.strip().lower()
    if len(value) != _ID_HEX or any(c not in "0123456789abcdef" for c in value):
        raise InvalidValueError(
            f"invalid token id {token_id[:40]!r}: {_ID_HEX} hex digits, as `dlm token list` shows"
        )
    return value
