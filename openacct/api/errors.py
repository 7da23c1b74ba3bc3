"""Every error is JSON ``{"error": "one clear line"}`` with its status: the framework's own (404
for no such route, 405, 422 for a body of the wrong shape), the domain's (``OpenAcctError``) and
the database's, so that hostile input never gets a 500 nor a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException

from shared.errors import AlreadyExists, NotFound, OpenAcctError

log = logging.getLogger("openacct.api")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _where(loc: tuple[Any, ...]) -> str:
    """``("body", "user")`` as ``user``, ``("query", "limit")`` as ``limit``."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "cookie")]
    return ".".join(parts)


def validation_message(errors: list[dict[str, Any]]) -> str:
    """The first problem, naming its field: one line a person can act on."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the body is not valid JSON"
    where = _where(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        return f"{where} is required"
    if first.get("type") == "extra_forbidden":
        return f"{where} is not a field of this request"
    return f"{where}: {message}" if where else message


def install(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.method} {request.url.path[:200]}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed here"
        return error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, validation_message(list(exc.errors())))

    @app.exception_handler(OpenAcctError)
    async def _domain(request: Request, exc: OpenAcctError) -> JSONResponse:
        # Endpoints check access before they call the domain code: its NotFound names what the
        # caller may already see (a member who is not there), never another's project.
        status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, AlreadyExists) else 422
        return error(status, str(exc))

    @app.exception_handler(IntegrityError)
    async def _conflict(request: Request, exc: IntegrityError) -> JSONResponse:
        # Two requests made the same change at once: the later one's insert lost the race.
        return error(409, "conflicts with a change made at the same time: try again")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error(500, "internal error (the server's log says more)")
