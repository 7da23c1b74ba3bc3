"""The API's application: the JSON API under /api/v1 (OpenAPI at /api/v1/openapi.json, docs at
/api/docs) and the portal at /, every error as ``{"error": ...}``, bodies at most 64 KiB."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from openacct.api import errors, portal, routes
from openacct.api.body_limit import BodyLimit

STATIC = Path(__file__).with_name("static")


def create_app() -> FastAPI:
    app = FastAPI(
        title="OpenAcct", version=version("openacct"),
        description="Balances, usage, jobs, statements and membership for users, PIs and the managers "
                    "they name. Authenticate with `Authorization: Bearer TOKEN` (openacct token create).",
        openapi_url="/api/v1/openapi.json", docs_url="/api/docs", redoc_url=None,
    )
    errors.install(app)
    app.add_middleware(BodyLimit)
    app.include_router(routes.router)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(portal.router)
    return app
