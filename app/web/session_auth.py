"""Sign in with an API key, a signed session cookie, CSRF tokens, and error pages.

The cookie (Flask's signed session) holds only the API key's id and its tenant id. Each
request re-reads the key: a revoked key signs the browser out at its next click. The
CSRF token is random per session, rendered into every form as a hidden field and compared
in constant time on every POST (or sent as X-CSRF-Token by scripts).
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any
from urllib.parse import urlsplit

from flask import Response, abort, flash, g, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from werkzeug.exceptions import HTTPException

from app import auth
from app.api import db_session
from app.errors import ApiError, error_response
from app.models import ApiKey, Tenant
from app.web.blueprint import UI_API_PREFIX, bp

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_ENDPOINTS = frozenset({"web.login"})
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"

# Pages load scripts, styles and data only from this origin; nothing inline.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)


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


def _load_signed_in_key() -> tuple[ApiKey, Tenant] | None:
    key_id, tenant = session.get("key_id"), session.get("tenant_id")
    if not isinstance(key_id, int) or not isinstance(tenant, int):
        return None
    row = (
        db_session()
        .execute(
            select(ApiKey, Tenant)
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(ApiKey.id == key_id, ApiKey.tenant_id == tenant, ApiKey.revoked_at.is_(None))
        )
        .first()
    )
    if row is None or auth.refusal(row[0]) is not None:  # revoked or expired since sign-in
        return None
    return row[0], row[1]


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
        was_signed_in = "key_id" in session
        session.pop("key_id", None)
        session.pop("tenant_id", None)
        if is_ui_api():
            return error_response(401, "Not signed in (or the API key was revoked)", "unauthorized")
        if was_signed_in:
            flash("Your session ended: the API key is no longer valid. Sign in again.", "error")
        nxt = request.full_path if request.method == "GET" else None
        return redirect(url_for("web.login", next=_safe_next(nxt.rstrip("?") if nxt else None)))
    key, tenant = found
    g.tenant_id, g.api_key_id = tenant.id, key.id
    g.web_tenant_name, g.web_key_prefix = tenant.name, key.prefix
    auth.touch(db_session(), key)
    db_session().commit()
    return None


@bp.after_request
def _security_headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if response.mimetype == "text/html":
        response.headers.setdefault("Cache-Control", "no-store")
    return response


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
    session.clear()  # a fresh session (and CSRF token) on every sign-in
    session["key_id"], session["tenant_id"] = key.id, key.tenant_id
    csrf_token()
    auth.touch(db_session(), key)
    db_session().commit()
    return redirect(nxt or url_for("web.jobs"))


@bp.route("/logout", methods=["POST"])
def logout() -> ResponseReturnValue:
    session.clear()
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
