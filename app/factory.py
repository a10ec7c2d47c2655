"""The web application factory: settings, database, broker client, API and pages."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from flask import Flask, request

from app import auth
from app.config import Settings, from_env
from app.db import Database
from app.notify import EventHub, Notifier
from app.secret_key import secret_key
from app.stores import models as models_store

MAX_JSON_DEPTH = 100  # objects/arrays inside one another; real specs need a handful
_LONG_NUMBER = re.compile(rb"[0-9]{4000}")  # near Python's int digit limit (4300): a ValueError in json.loads


def json_depth(raw: bytes | str, limit: int = MAX_JSON_DEPTH) -> int:
    """How deep `[`/`{` nest in a JSON text (outside strings), counted without recursion;
    stops counting once past `limit`. Cheap for the common case: a text with no more than
    `limit` brackets in all cannot nest deeper."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if data.count(b"[") + data.count(b"{") <= limit:
        return 0
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _check_json_text(raw: bytes | str, where: str | None = None) -> None:
    """400 for JSON the parser would fail on with something other than a JSONDecodeError:
    nesting past MAX_JSON_DEPTH (RecursionError) or a number with too many digits."""
    from app.errors import ApiError

    details = {where: ["Nested too deeply."]} if where else None
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise ApiError(400, f"JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)", "bad_request", details)
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if _LONG_NUMBER.search(data):
        try:
            json.loads(data)
        except ValueError as exc:
            if not isinstance(exc, json.JSONDecodeError):
                raise ApiError(400, f"Malformed JSON: {exc}", "bad_request", details) from None
        except RecursionError:
            raise ApiError(400, "JSON nested too deeply", "bad_request", details) from None


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or from_env()
    logging.basicConfig(level=settings.log_level)
    app = Flask(__name__, static_folder="web/static", template_folder="web/templates")
    app.config.update(
        SECRET_KEY=secret_key(settings),
        TESTING=settings.testing,
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.cookies_secure,
        PERMANENT_SESSION_LIFETIME=settings.session_lifetime_s,  # the browser drops it too
        API_TITLE="MedMaaS",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api/v1",
        OPENAPI_JSON_PATH="openapi.json",
    )
    settings.artifacts.mkdir(parents=True, exist_ok=True)
    app.extensions["medmaas.settings"] = settings
    auth.configure_cache(settings.api_key_cache_s)
    models_store.SERVING.ttl_s = settings.model_cache_s
    models_store.SERVING.clear()
    app.extensions["medmaas.db"] = Database(settings.sqlalchemy_url, notifier=Notifier(settings.broker_url))
    app.extensions["medmaas.hub"] = EventHub(settings.broker_url)  # started by the first watcher

    from app.broker import create_celery

    app.extensions["medmaas.celery"] = create_celery(settings)

    from app.api import IdConverter

    app.url_map.converters["id"] = IdConverter  # `<id:job_id>`: 1..2^31-1, else 404

    @app.before_request
    def _cap_json_bodies() -> None:
        # Uploads may be GBs; everything else is small JSON.
        if request.mimetype != "multipart/form-data":
            request.max_content_length = settings.max_json_bytes
        # Hostile JSON is a 400 before any parser recurses into it (JSON bodies, and the
        # JSON text fields of the pages' url-encoded forms).
        if request.is_json:
            _check_json_text(request.get_data(cache=True))
        elif request.mimetype == "application/x-www-form-urlencoded":
            for name, value in request.form.items(multi=True):
                _check_json_text(value, name)

    from app.errors import register_error_handlers
    from app.security_headers import add_security_headers

    register_error_handlers(app)
    app.after_request(add_security_headers)

    from app.api import init_api

    init_api(app)

    web_init = Path(__file__).parent / "web" / "__init__.py"
    if web_init.exists():
        from app.web import init_web

        init_web(app)
    return app
