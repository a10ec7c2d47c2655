"""HTTP API v1: one blueprint per resource, all behind Bearer API keys.

Views parse and serialise; the queries are the stores' (app.stores), which take the
request's session and tenant from the accessors below and raise domain errors that
app.errors answers with the error body."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery
from flask import Flask, Response, current_app, g, request
from flask_smorest import Api
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter, Map

from app import auth
from app.config import Settings
from app.db import Database
from app.errors import ApiError, ErrorBodySchema, http_exception_response
from app.models import MAX_ID, KeyRole

F = TypeVar("F", bound=Callable[..., Any])

# The role each view needs, by view function (recorded by `requires`). A route that declares
# none needs admin: forgetting the declaration fails closed.
_ROLE_ATTR = "_medmaas_required_role"
DEFAULT_ROLE = KeyRole.admin


def requires(role: KeyRole | str) -> Callable[[F], F]:
    """Declare the role a /api/v1 view needs (viewer < member < admin); checked after the key
    in the before_request hook, so a key without it gets 403 before the view runs."""
    needed = KeyRole(role)

    def decorate(view: F) -> F:
        setattr(view, _ROLE_ATTR, needed)
        return view

    return decorate


def declared_role(view: Callable[..., Any] | None) -> KeyRole | None:
    """A registered view's `requires` declaration, found on the view or on any function it
    wraps (flask-smorest wraps views), or None."""
    while view is not None:
        declared = getattr(view, _ROLE_ATTR, None)
        if declared is not None:
            return declared
        view = getattr(view, "__wrapped__", None)
    return None


def required_role(view: Callable[..., Any] | None) -> KeyRole:
    """The role a view needs: its declaration, else DEFAULT_ROLE (admin: fail closed)."""
    return declared_role(view) or DEFAULT_ROLE


# Ids and versions are 32-bit integer columns (app.models.MAX_ID): anything outside 1..MAX_ID
# names no row, so paths answer 404 and query/body fields 422 before the database sees them.


class IdConverter(IntegerConverter):
    """`<id:job_id>`: a positive integer that fits the id columns; others match no route (404)."""

    def __init__(self, map: Map, *args: Any, **kwargs: Any) -> None:
        super().__init__(map, min=1, max=MAX_ID)


class MedmaasApi(Api):
    # Error responses in the OpenAPI document carry the real error body, and each operation
    # lists its own error statuses (app.api.openapi) rather than a catch-all `default`.
    ERROR_SCHEMA = ErrorBodySchema
    DEFAULT_ERROR_RESPONSE_NAME = None

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
    if "api_key_id" in g:  # already checked for this request (the rate limiter asks first)
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'", "unauthorized")
    session = db_session()
    try:
        key = auth.verify(session, token.strip())
    except auth.KeyRefused as exc:
        raise ApiError(401, str(exc), "unauthorized") from None
    if auth.touch(session, key):  # last_used_at moved (at most once a minute); otherwise no extra round trip
        session.commit()
    g.tenant_id = key.tenant_id
    g.api_key_id = key.id
    g.api_key_prefix = key.prefix  # for the audit trail
    g.api_key_role = key.role


def require_role() -> None:
    """403 unless the request's key has the role the matched view declares (see `requires`).
    Unmatched URLs (404/405) have no view and fall through to their own error."""
    if request.endpoint is None:
        return
    needed = required_role(current_app.view_functions.get(request.endpoint))
    role = KeyRole(g.api_key_role)
    if not role.allows(needed):
        raise ApiError(
            403,
            f"This route needs the {needed.value} role; this API key has the {role.value} role",
            "forbidden",
            {"required_role": needed.value, "key_role": role.value},
        )


def init_api(app: Flask) -> None:
    api = MedmaasApi(
        app,
        spec_kwargs={
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}],
        },
    )
    from app.api import openapi

    openapi.install(api, app)
    from app.limits import init_limits

    # before the authentication hook below, so refused keys are counted by address
    init_limits(app, api, app.extensions["medmaas.settings"])

    @app.teardown_appcontext
    def _close_session(_exc: Any) -> None:
        session = g.pop("db_session", None)
        if session is not None:
            session.close()

    from app.api import audit, health, jobs, keys

    blueprints = [jobs.blp, keys.blp, audit.blp]
    for name in ("datasets", "models", "onnx", "scoring", "usage"):
        try:
            module = __import__(f"app.api.{name}", fromlist=["blp"])
        except ModuleNotFoundError as exc:
            if exc.name != f"app.api.{name}":
                raise
            continue
        blueprints.append(module.blp)
    blueprints.append(__import__("app.api.lifecycle", fromlist=["blp"]).blp)  # tags, compare, clone
    blueprints.append(__import__("app.api.cards", fromlist=["blp"]).blp)  # model cards
    for blp in blueprints:
        api.register_blueprint(blp)

    @app.before_request
    def _authenticate_api() -> None:
        # Every /api/v1 route needs a key; the OpenAPI document is public documentation.
        path = request.path
        if path.startswith("/api/v1/") and path != "/api/v1/openapi.json":
            require_api_key()
            require_role()

    from app.api import auditing

    auditing.install(app)  # after _authenticate_api: an audit entry knows its key
    from app.api.nul import refuse_nul

    app.before_request(refuse_nul)  # after auditing.install: the refusal is recorded with its key
    app.register_blueprint(health.bp)
    app.extensions["medmaas.api"] = api
