"""Who a request comes from: a ``Caller``, or 401.

Accepted, in this order: ``Authorization: Bearer TOKEN`` (``openacct token create``);
``Authorization: MUNGE CREDENTIAL`` (a login node's credential for this one request, from
``munge.for_request``, checked by ``munge.verify``; 503 where this host cannot ask munged);
the user name in the header ``api_sso_header``, only from a peer in ``api_trusted_proxies`` (the
center's single sign-on proxy); the portal's session cookie, whose value is a bearer token.
Administrators are the users named in ``api_admins``. Endpoints take ``Caller`` as a parameter
(``CurrentCaller``), and the database session as ``openacct.api.database.Database``.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Literal, cast

from fastapi import Depends, HTTPException, Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from openacct.api import tokens
from openacct.api.database import Database
from shared import networks
from shared.config import get_settings
from shared.events import NAME
from shared.models import User

log = logging.getLogger("openacct.api")
SESSION_COOKIE = "openacct_session"
Via = Literal["token", "sso", "munge", "session"]


@dataclass(frozen=True)
class Caller:
    user_id: int
    user: str
    admin: bool
    scope: tokens.Scope
    via: Via


def unauthorized(reason: str) -> HTTPException:
    return HTTPException(401, reason, headers={"WWW-Authenticate": 'Bearer realm="openacct"'})


NO_CREDENTIALS = ("no credentials: send Authorization: Bearer TOKEN (openacct token create), "
                  "or MUNGE CREDENTIAL from a login node")


def _as_caller(session: Session, name: str, scope: tokens.Scope, via: Via) -> Caller:
    user = session.scalar(select(User).where(User.name == name)) if NAME.fullmatch(name) else None
    if user is None or not user.active:
        raise unauthorized(f"no active user {name}" if NAME.fullmatch(name) else "not a valid user name")
    return Caller(user_id=user.id, user=user.name, admin=user.name in get_settings().api_admins,
                  scope=scope, via=via)


def by_token(session: Session, token: str, via: Via) -> Caller:
    """The caller a bearer token proves (also the portal's check of a pasted token), else 401."""
    row = tokens.find(session, token.strip())
    if row is None:
        raise unauthorized("unknown token")
    now = dt.datetime.now(dt.UTC)
    why = tokens.unusable(row, now)
    if why is not None:
        raise unauthorized(why)
    tokens.note_use(row, now)
    return _as_caller(session, row.user.name, cast(tokens.Scope, row.scope), via)


def _by_munge(session: Session, credential: str, request: Request, body: bytes) -> Caller:
    from openacct.api import munge  # only a login node's requests need it

    path = _api_path(request)
    if path is None:  # the portal's pages: a browser's, never a login node's
        raise unauthorized(f"MUNGE credentials are for the API's requests ({munge.API_ROOT}) only")
    query = request.scope.get("query_string", b"").decode("latin-1")
    try:
        name = munge.verify(credential.strip(), munge.for_request(request.method, path, query, body))
    except munge.MungeUnavailable as down:
        # The server's trouble, not the caller's credential: a token still works meanwhile. The
        # detail (munged's socket, its error) is the operator's, in the log, not the caller's.
        log.error("MUNGE credentials cannot be checked: %s", down)
        raise HTTPException(503, "the API cannot check MUNGE credentials now: use a bearer token, "
                                 "or tell your center") from None
    except munge.MungeRefused as refused:
        raise unauthorized(f"MUNGE credential refused: {refused}") from None
    # A PI manages their own projects from a login node as they would with a manage token.
    return _as_caller(session, name, "manage", "munge")


_trusted_proxies = lru_cache(maxsize=8)(networks.parse)


def _from_trusted_proxy(request: Request) -> bool:
    peer = request.client.host if request.client else ""
    return networks.contains(_trusted_proxies(tuple(get_settings().api_trusted_proxies)), peer)


def _api_path(request: Request) -> str | None:
    """The request's path (percent-decoded) below any root path, if it is one of the API's."""
    from openacct.api import munge

    path, root = request.scope["path"], request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path if path.startswith(munge.API_ROOT) else None


async def request_body(request: Request) -> bytes:
    """The body a MUNGE credential is bound to, read for such requests only (Starlette keeps it
    for the endpoint)."""
    return await request.body() if request.headers.get("authorization", "")[:6].upper() == "MUNGE " else b""


RequestBody = Annotated[bytes, Depends(request_body)]


def identify(request: Request, session: Session, body: bytes) -> Caller | None:
    """The caller a request's credentials prove, None when it carries none; 401 for bad ones."""
    authorization = request.headers.get("authorization")
    if authorization:
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            return by_token(session, credential, "token")
        if scheme.upper() == "MUNGE" and credential.strip():
            return _by_munge(session, credential, request, body)
        raise unauthorized("Authorization is Bearer TOKEN or MUNGE CREDENTIAL")
    header = get_settings().api_sso_header
    if header and request.headers.get(header) and _from_trusted_proxy(request):
        return _as_caller(session, request.headers[header].strip(), "manage", "sso")
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        return by_token(session, cookie, "session")
    return None


def caller(request: Request, session: Database, body: RequestBody) -> Caller:
    """The FastAPI dependency: the caller, or 401."""
    found = identify(request, session, body)
    if found is None:
        raise unauthorized(NO_CREDENTIALS)
    return found


def caller_or_none(request: Request, session: Database) -> Caller | None:
    """For pages that show a login form to a caller without credentials (still 401 for bad ones)."""
    return identify(request, session, b"")  # no MUNGE credential is taken on the portal's pages


CurrentCaller = Annotated[Caller, Depends(caller)]
