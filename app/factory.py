"""The web application factory: settings, database, broker client, API and pages."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path

from flask import Flask, request

from app.config import Settings, from_env
from app.db import Database
from app.notify import EventHub, Notifier


def _secret_key(settings: Settings) -> str:
    if settings.secret_key:
        return settings.secret_key
    # Standalone/dev: one random key per install, kept beside the SQLite database.
    path = settings.home / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(48))
        path.chmod(0o600)
    return path.read_text().strip()


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or from_env()
    logging.basicConfig(level=settings.log_level)
    app = Flask(__name__, static_folder="web/static", template_folder="web/templates")
    app.config.update(
        SECRET_KEY=_secret_key(settings),
        TESTING=settings.testing,
        MAX_CONTENT_LENGTH=settings.max_upload_bytes,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        API_TITLE="MedMaaS",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api/v1",
        OPENAPI_JSON_PATH="openapi.json",
    )
    settings.artifacts.mkdir(parents=True, exist_ok=True)
    app.extensions["medmaas.settings"] = settings
    app.extensions["medmaas.db"] = Database(settings.sqlalchemy_url, notifier=Notifier(settings.broker_url))
    app.extensions["medmaas.hub"] = EventHub(settings.broker_url)  # started by the first watcher

    from app.broker import create_celery

    app.extensions["medmaas.celery"] = create_celery(settings)

    @app.before_request
    def _cap_json_bodies() -> None:
        # Uploads may be GBs; everything else is small JSON.
        if request.mimetype != "multipart/form-data":
            request.max_content_length = settings.max_json_bytes

    from app.errors import register_error_handlers

    register_error_handlers(app)

    from app.api import init_api

    init_api(app)

    web_init = Path(__file__).parent / "web" / "__init__.py"
    if web_init.exists():
        from app.web import init_web

        init_web(app)
    return app
