"""Bearer tokens: made, listed and revoked by an administrator (``openacct token``), looked up by
the API. Only a token's SHA-256 is stored; the token itself is shown once, when it is made."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import InvalidInput, NotFound
from shared.models import ApiToken, User

Scope = Literal["read", "manage"]
# Recognisable in a leaked file or a secret scanner's rules.
PREFIX = "oa_"
# A token's last use is written at most this often: a read per request, not a write.
LAST_USED_EVERY = dt.timedelta(minutes=1)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(session: Session, user: User, *, scope: Scope, expires_days: int | None,
           label: str = "", actor: str = "") -> tuple[ApiToken, str]:
    """The stored row and the token, which nobody can get back later."""
    if expires_days is not None and not 1 <= expires_days <= 3660:
        raise InvalidInput(f"--expires is a number of days from 1 to 3660, not {expires_days}")
    token = PREFIX + secrets.token_urlsafe(32)
    expires_at = None if expires_days is None else dt.datetime.now(dt.UTC) + dt.timedelta(days=expires_days)
    row = ApiToken(user_id=user.id, token_hash=digest(token), scope=scope, label=label,
                   expires_at=expires_at, actor=actor)
    session.add(row)
    session.flush()
    return row, token


def listed(session: Session, user: User | None = None) -> list[ApiToken]:
    query = select(ApiToken).order_by(ApiToken.id)
    if user is not None:
        query = query.where(ApiToken.user_id == user.id)
    return list(session.scalars(query))


def revoke(session: Session, token_id: int) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFound(f"no token #{token_id}")
    if row.revoked_at is None:
        row.revoked_at = dt.datetime.now(dt.UTC)
        session.flush()
    return row


def unusable(row: ApiToken, now: dt.datetime) -> str | None:
    """Why a stored token lets nobody in, or None while it does."""
    if row.revoked_at is not None:
        return "the token was revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "the token has expired"
    return None


def find(session: Session, token: str) -> ApiToken | None:
    """The stored row of a token, usable or not; None for one never made."""
    if not token.startswith(PREFIX) or len(token) > 200:
        return None
    return session.scalar(select(ApiToken).where(ApiToken.token_hash == digest(token)))


def note_use(row: ApiToken, now: dt.datetime) -> None:
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
        row.last_used_at = now
