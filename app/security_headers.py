"""The security headers every response carries: pages, the API, errors, files, /metrics.

One after_request hook (registered by app.factory) so the pages and the API cannot drift
apart. A view that sets one of these headers itself keeps its own value (the SSE streams'
`Cache-Control: no-cache`, for instance)."""

from __future__ import annotations

from flask import Response, request

# Pages load scripts, styles and data only from this origin; nothing inline.
PAGE_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# Anything else (JSON, files, SVG drawings) is data: a browser that renders it runs nothing.
DATA_CONTENT_SECURITY_POLICY = "default-src 'none'; frame-ancestors 'none'"
HSTS = "max-age=31536000"


def add_security_headers(response: Response) -> Response:
    headers = response.headers
    page = response.mimetype == "text/html"
    headers.setdefault(
        "Content-Security-Policy", PAGE_CONTENT_SECURITY_POLICY if page else DATA_CONTENT_SECURITY_POLICY
    )
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "same-origin")
    # Tenants' data (answers to a key or a session) must not stay in shared or browser caches;
    # the app's own static files (scripts, styles) may.
    if request.endpoint != "static":
        headers.setdefault("Cache-Control", "no-store")
    if request.is_secure:
        headers.setdefault("Strict-Transport-Security", HSTS)
    return response
