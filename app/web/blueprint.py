"""The one blueprint every page module adds its routes to."""

from __future__ import annotations

from flask import Blueprint

bp = Blueprint("web", __name__)

# Session-authenticated JSON / SSE for the pages' scripts (GET only).
UI_API_PREFIX = "/ui/api/"
