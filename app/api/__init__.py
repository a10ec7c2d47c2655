"""HTTP API v1: one blueprint per resource, all behind Bearer API keys.

Views parse and serialise; the queries are the stores' (app.stores), which take the
request's session and tenant from the accessors below and raise domain errors that
app.errors answers with the error body."""

from __future__ import annotations

from typing import Any

from celery import Celery
from flask import Flask, Response, current_app, g, request
from flask_smorest import Api
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from app import auth
from app.config import Settings
from app.db import Database
from app.errors import ApiError, http_exception_response


class MedmaasApi(Api):
    def handle_http_exception(self, error: HTTPException) -> tuple[Response, int]:
        return http_exception_response(error)


def settings() -> Settings:
    return current_app.extensions["medmaas.settings"]


def database() -> Database:
    return current_app.extensions["medmaas.db"]


def celery() -> Celery:
    return current_app.extensions["medmaas.celery"]


def db_session() -> Session:
    """The request's session (closed at teardown)."""
    if "db_session" not in g:
        g.db_session = database().sessionmaker()
    return g.db_session


def tenant_id() -> int:
    return g.tenant_id


def require_api_key() -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'", "unauthorized")
    session = db_session()
    key = auth.authenticate(session, token.strip())
    if key is None:
        raise ApiError(401, "Invalid API key", "unauthorized")
    auth.touch(session, key)
    if session.dirty:  # last_used_at moved (at most once a minute); otherwise no extra round trip
        session.commit()
    g.tenant_id = key.tenant_id
    g.api_key_id = key.id


def init_api(app: Flask) -> None:
    api = MedmaasApi(
        app,
        spec_kwargs={
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}],
        },
    )

    @app.teardown_appcontext
    def _close_session(_exc: Any) -> None:
        session = g.pop("db_session", None)
        if session is not None:
            session.close()

    from app.api import health, jobs

    blueprints = [jobs.blp]
    for name in ("datasets", "models", "scoring"):
        try:
            module = __import__(f"app.api.{name}", fromlist=["blp"])
        except ModuleNotFoundError as exc:
            if exc.name != f"app.api.{name}":
                raise
            continue
        blueprints.append(module.blp)
    for blp in blueprints:
        api.register_blueprint(blp)

    @app.before_request
    def _authenticate_api() -> None:
        # Every /api/v1 route needs a key; the OpenAPI document is public documentation.
        path = request.path
        if path.startswith("/api/v1/") and path != "/api/v1/openapi.json":
            require_api_key()

    app.register_blueprint(health.bp)
    app.extensions["medmaas.api"] = api
