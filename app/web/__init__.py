"""Browser pages: sign in with an API key, follow jobs live (progress, ETA, loss curves),
submit training and scoring jobs, upload datasets and browse the model registry.

Server-rendered Jinja templates with a little vanilla JavaScript; the only third-party
browser code is uPlot, vendored under static/vendor (no CDN, no build step).

Pages authenticate with a server-side session (app.web.session_auth): the signed cookie
holds its random id, checked against the database on every request, so signing out, revoking
the key or the session's lifetime ends it for every copy of the cookie. Every POST
carries a per-session CSRF token. The /api/v1 routes stay Bearer-only: the pages read JSON
from session-authenticated GET twins under /ui/api/ that reuse the API's queries,
serialisers and SSE generator.
"""

from __future__ import annotations

from flask import Flask


def init_web(app: Flask) -> None:
    import importlib

    from app.web import filters
    from app.web.blueprint import bp

    # Each module adds its routes to bp.
    for module in ("session_auth", "jobs", "library", "explain", "audit", "usage", "keys"):
        importlib.import_module(f"app.web.{module}")
    importlib.import_module("app.web.lifecycle")  # compare, clone, tags, model cards

    filters.register(app)
    app.register_blueprint(bp)
