"""Sign in with an API key, server-side web sessions, CSRF tokens, and error pages.

Signing in opens a row in `web_sessions`; the cookie (Flask's signed session) carries only
that session's random id (plus the CSRF token and flash messages), and the table only the
id's sha256. Every request looks the session up: it ends on sign-out, when its key is revoked
or expires, MEDMAAS_SESSION_LIFETIME_S after sign-in, or after MEDMAAS_SESSION_IDLE_TIMEOUT_S
without a request. An ended session stays ended: a copy of the cookie replayed later finds
the row ended and gets the sign-in page (pages) or 401 (the JSON twins).

The CSRF token is random per cookie, rendered into every form as a hidden field and compared
in constant time on every POST (or sent as X-CSRF-Token by scripts).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import abort, flash, g, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.exceptions import HTTPException

from app import auth
from app.api import auditing, db_session, settings
from app.config import Settings
from app.errors import ApiError, error_response
from app.models import ApiKey, KeyRole, Tenant, WebSession, utcnow
from app.web.blueprint import UI_API_PREFIX, bp

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_ENDPOINTS = frozenset({"web.login"})
# The role a form POST needs, as its API twin requires it: member by default (submit, upload,
# predict, cancel, delete); admin to point an alias. Signing out needs none; the key pages
# check admin themselves (with a page that says so).
FORM_ROLES: dict[str, KeyRole | None] = {
    "web.logout": None,
    "web.model_set_alias": KeyRole.admin,
    "web.key_create": None,
    "web.key_revoke": None,
    "web.key_rotate": None,
}
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SESSION_ID = "sid"  # the cookie's key for the web session's random id
LAST_SEEN_EVERY_S = 60.0  # last_seen_at is written at most this often (not a write per click)


def csrf_token() -> str:
    token = session.get("csrf")
    if not token:
        token = session["csrf"] = secrets.token_urlsafe(32)
    return token


def _csrf_ok() -> bool:
    expected = session.get("csrf")
    presented = request.form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER) or ""
    return bool(expected) and hmac.compare_digest(str(expected), str(presented))


def is_ui_api() -> bool:
    return request.path.startswith(UI_API_PREFIX)


def _token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def open_web_session(db: Session, key: ApiKey, config: Settings) -> str:
    """Record a new web session for `key`; returns its random id (for the cookie only)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    db.add(
        WebSession(
            token_sha256=_token_sha256(token),
            key_id=key.id,
            tenant_id=key.tenant_id,
            created_at=now,
            last_seen_at=now,
            expires_at=now + timedelta(seconds=config.session_lifetime_s),
        )
    )
    db.flush()
    return token


def _why_ended(ws: WebSession, key: ApiKey, config: Settings) -> str | None:
    now = utcnow()
    refused = auth.refusal(key, now)
    if refused is not None:
        return f"the API key is no longer valid ({refused.removeprefix('API key ')})"  # revoked / expired
    if ws.expires_at <= now:
        return "it reached its lifetime"
    idle = config.session_idle_timeout_s
    if idle > 0 and (now - ws.last_seen_at).total_seconds() > idle:
        return "it was idle too long"
    return None


def _load_signed_in_key() -> tuple[ApiKey, Tenant] | None:
    """The signed-in key and tenant of this request's cookie, or None. A session found past its
    end (expired, idle, key revoked or expired) is ended on the spot, and the reason flashed."""
    token = session.get(SESSION_ID)
    if not isinstance(token, str) or not token:
        return None
    db = db_session()
    row = db.execute(
        select(WebSession, ApiKey, Tenant)
        .join(ApiKey, ApiKey.id == WebSession.key_id)
        .join(Tenant, Tenant.id == WebSession.tenant_id)
        .where(WebSession.token_sha256 == _token_sha256(token), WebSession.ended_at.is_(None))
    ).first()
    if row is None:
        return None
    ws, key, tenant = row
    config = settings()
    why = _why_ended(ws, key, config)
    if why is not None:
        ws.ended_at = utcnow()
        db.commit()
        g.web_session_end = why
        return None
    now, idle = utcnow(), config.session_idle_timeout_s
    refresh_s = min(LAST_SEEN_EVERY_S, idle / 2) if idle > 0 else LAST_SEEN_EVERY_S
    if (now - ws.last_seen_at).total_seconds() > refresh_s:
        ws.last_seen_at = now  # committed by the guard
    return key, tenant


def end_web_session() -> None:
    """Sign-out: the cookie's session ends server-side (a copy of the cookie is then useless)."""
    token = session.get(SESSION_ID)
    if isinstance(token, str) and token:
        db = db_session()
        ws = db.scalar(select(WebSession).where(WebSession.token_sha256 == _token_sha256(token)))
        if ws is not None and ws.ended_at is None:
            ws.ended_at = utcnow()
            db.commit()
    session.clear()


def _safe_next(target: str | None) -> str | None:
    """Only same-site relative paths, never //host or scheme URLs (no open redirect)."""
    if not target:
        return None
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return None
    return target


@bp.app_context_processor
def _template_globals() -> dict[str, Any]:
    return {"csrf_token": csrf_token, "csrf_field": CSRF_FIELD}


@bp.before_request
def _guard() -> ResponseReturnValue | None:
    if request.method not in SAFE_METHODS:
        if is_ui_api():
            abort(405)  # the JSON twins are read-only; changes go through forms (with CSRF)
        if not _csrf_ok():
            abort(400, "The form's security token is missing or out of date. Reload the page and try again.")
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    found = _load_signed_in_key()
    if found is None:
        was_signed_in = SESSION_ID in session
        session.pop(SESSION_ID, None)
        if is_ui_api():
            return error_response(401, "Not signed in (or the session ended)", "unauthorized")
        if was_signed_in:
            why = g.get("web_session_end")
            flash(f"Your session ended{': ' + why if why else ''}. Sign in again.", "error")
        nxt = request.full_path if request.method == "GET" else None
        return redirect(url_for("web.login", next=_safe_next(nxt.rstrip("?") if nxt else None)))
    key, tenant = found
    g.tenant_id, g.api_key_id = tenant.id, key.id
    g.web_tenant_name, g.web_key_prefix, g.web_key_role = tenant.name, key.prefix, key.role
    auth.touch(db_session(), key)
    db_session().commit()
    if request.method not in SAFE_METHODS:
        needed = FORM_ROLES.get(request.endpoint or "", KeyRole.member)
        if needed is not None and not KeyRole(key.role).allows(needed):
            article = "an" if needed == KeyRole.admin else "a"
            abort(
                403,
                f"This needs {article} {needed.value} key or higher; you signed in with a {KeyRole(key.role).value} key.",
            )
    return None


@bp.route("/login", methods=["GET", "POST"])
def login() -> ResponseReturnValue:
    nxt = _safe_next(request.values.get("next"))
    if request.method == "GET":
        if _load_signed_in_key() is not None:
            return redirect(nxt or url_for("web.jobs"))
        return render_template("login.html", next=nxt)
    presented = (request.form.get("api_key") or "").strip()
    key = auth.authenticate(db_session(), presented) if presented else None
    if key is None:
        error = "Enter your API key." if not presented else "That API key is not valid or has been revoked."
        return render_template("login.html", next=nxt, error=error), 401
    auditing.identify(key)  # the sign-in is recorded as this key's, with its commit below
    end_web_session()  # a fresh session (and CSRF token) on every sign-in
    token = open_web_session(db_session(), key, settings())
    session.permanent = True  # the cookie expires with the session (PERMANENT_SESSION_LIFETIME)
    session[SESSION_ID] = token
    csrf_token()
    auth.touch(db_session(), key)
    db_session().commit()
    return redirect(nxt or url_for("web.jobs"))


@bp.route("/logout", methods=["POST"])
def logout() -> ResponseReturnValue:
    end_web_session()
    flash("Signed out.", "info")
    return redirect(url_for("web.login"))


# -- errors: HTML pages for pages, the API's JSON body for /ui/api ----------------------

_TITLES = {
    400: "Bad request",
    401: "Not signed in",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Too large",
    422: "Invalid input",
}


def error_page(status: int, message: str, code: str | None = None, details: Any = None) -> ResponseReturnValue:
    if is_ui_api():
        return error_response(status, message, code, details)
    title = _TITLES.get(status, "Error")
    return render_template("error.html", status=status, title=title, message=message), status


@bp.errorhandler(HTTPException)
def _http_error(exc: HTTPException) -> ResponseReturnValue:
    status = exc.code or 500
    default = type(exc).description
    message = (
        exc.description
        if exc.description and exc.description != default
        else {
            404: "There is nothing here, or it belongs to another tenant.",
        }.get(status, exc.description or "")
    )
    return error_page(status, message)


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError) -> ResponseReturnValue:
    return error_page(exc.status, exc.message, exc.code, exc.details)
