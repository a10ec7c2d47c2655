"""Text in an /api/v1 request may not contain NUL: PostgreSQL cannot store or compare it
(a 500 the fuzz test found), and no stored name or id can hold one. Checked once the key is
known (so the refusal is audited): a NUL in the path names nothing (404), in the query string
or a JSON body it is invalid input (422). Multipart fields are read by their views; the
database's refusal of a NUL there is answered 400 (app.errors)."""

from __future__ import annotations

from typing import Any

from flask import request

from app.errors import NUL_MESSAGE, ApiError

NUL = "\x00"


def holds_nul(value: Any) -> bool:
    """Whether a parsed JSON value has a NUL character in any string, keys included."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if NUL in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def refuse_nul() -> None:
    if not request.path.startswith("/api/v1/"):
        return
    if NUL in request.path:
        raise ApiError(404, "Nothing has a name with a NUL character", "not_found")
    bad = sorted({name for name, value in request.args.items(multi=True) if NUL in name or NUL in value})
    if bad:
        raise ApiError(422, NUL_MESSAGE, "validation_error", {"query": {name: [NUL_MESSAGE] for name in bad}})
    if request.is_json and holds_nul(request.get_json(silent=True)):
        raise ApiError(422, NUL_MESSAGE, "validation_error", {"json": [NUL_MESSAGE]})
