"""One database session per request, committed once the endpoint has returned and before the
response goes out (a 201 is never sent for a write that then fails), rolled back if it raised."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from shared.db import committed, new_session


def _request_session() -> Iterator[Session]:
    # Not session_scope: FastAPI runs a dependency's setup and teardown in different threads,
    # where a context variable set in one cannot be reset in the other. A write makes the session
    # current for the shortcuts itself (shared.db.as_current).
    with committed(new_session()) as session:
        yield session


# scope="function": the commit runs before the response is sent, not after.
Database = Annotated[Session, Depends(_request_session, scope="function")]
