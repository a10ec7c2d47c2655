"""One error body for every failure: {"error": {"code", "message", "details"}}.

Stores and the core raise domain errors (app.stores' NotFound / Conflict / Invalid, the
kinds' SpecError, UploadTooLarge, IngestError); `as_api_error` is the one place they are
given an HTTP status, and the handlers registered here answer them for the API and the
pages alike (each with its own ApiError rendering: JSON for the API, an error page or the
JSON twin's body for the pages)."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}


class ErrorDetailSchema(Schema):
    code = fields.String(required=True, metadata={"description": "machine-readable, e.g. not_found, validation_error"})
    message = fields.String(required=True, metadata={"description": "one sentence for a person"})
    details = fields.Raw(
        required=True,
        allow_none=True,
        metadata={"description": "what exactly was refused (field messages, limits), or null"},
    )


class ErrorBodySchema(Schema):
    """The body of every error answer (documented in OpenAPI as the API's ERROR_SCHEMA)."""

    error = fields.Nested(ErrorDetailSchema, required=True)


# Text may not contain NUL (PostgreSQL cannot store it): refused by app.api.nul, documented
# as a pattern on every string (app.api.openapi), and caught from the database (multipart).
NUL_MESSAGE = "Text in the request contains a NUL character (\\u0000), which is not allowed"
NO_NUL_PATTERN = "^[^\\u0000]*$"


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.message, self.details = status, message, details
        self.code = code or _CODES.get(status, "error")


def error_response(status: int, message: str, code: str | None = None, details: Any = None) -> tuple[Response, int]:
    body = {"error": {"code": code or _CODES.get(status, "error"), "message": message, "details": details}}
    return jsonify(body), status


def _allowed_methods(exc: MethodNotAllowed) -> list[str]:
    """The methods this URL really answers. Werkzeug checks a rule's methods before its
    converters, so `DELETE /jobs/0` is a 405 listing GET though no method matches `0`."""
    adapter = current_app.url_map.bind_to_environ(request.environ)
    allowed = []
    for method in exc.valid_methods or []:
        try:
            adapter.match(method=method)
        except HTTPException:
            continue
        allowed.append(method)
    return allowed


def http_exception_response(exc: HTTPException) -> tuple[Response, int]:
    if isinstance(exc, MethodNotAllowed):
        allowed = _allowed_methods(exc)
        if not allowed:
            return http_exception_response(NotFound())
        response, status = error_response(405, "The method is not allowed for the requested URL.")
        response.headers["Allow"] = ", ".join(sorted(allowed))
        return response, status
    status = exc.code or 500
    details = None
    data = getattr(exc, "data", None)  # webargs/flask-smorest attach validation messages here
    if isinstance(data, dict):
        details = data.get("messages") or data.get("errors")
    message = exc.description or _CODES.get(status, "error")
    if status == 422:
        message = "Request validation failed"
    if status == 400 and isinstance(details, dict) and "json" in details:
        message = "Malformed JSON body"
    if status == 413:
        message = "Request body too large"
    return error_response(status, message, details=details)


def domain_errors() -> tuple[type[Exception], ...]:
    """The exception types `as_api_error` maps (imported late: app.kinds imports this module)."""
    from app.artifacts import UploadTooLarge
    from app.ingest.errors import IngestError
    from app.kinds import SpecError
    from app.stores.errors import StoreError

    return (StoreError, SpecError, UploadTooLarge, IngestError)


def as_api_error(exc: Exception) -> ApiError:
    """The status, code, message and details a domain error answers with."""
    from app.artifacts import UploadTooLarge
    from app.ingest.errors import IngestError
    from app.kinds import SpecError
    from app.stores.errors import Conflict, Invalid, NotFound, StoreError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, StoreError):
        status = next((s for t, s in ((NotFound, 404), (Conflict, 409), (Invalid, 422)) if isinstance(exc, t)), 400)
        return ApiError(status, exc.message, exc.code, exc.details)
    if isinstance(exc, SpecError):
        return ApiError(422, exc.message, exc.code, exc.details)
    if isinstance(exc, UploadTooLarge):
        return ApiError(413, str(exc), "payload_too_large")
    if isinstance(exc, IngestError):
        return ApiError(exc.http_status, exc.message, exc.code, exc.details)
    raise TypeError(f"not a domain error: {exc!r}")


def _domain_error(exc: Exception) -> ResponseReturnValue:
    # Re-dispatched as an ApiError so a blueprint's own ApiError handler (the pages') applies.
    return current_app.handle_user_exception(as_api_error(exc))


def out_of_range(exc: Exception) -> bool:
    """A number the database column cannot hold: PostgreSQL's numeric_value_out_of_range
    (SQLSTATE 22003), or SQLite's driver refusing an int past 64 bits."""
    from sqlalchemy.exc import DataError

    if isinstance(exc, DataError):
        orig = exc.orig
        return getattr(orig, "sqlstate", None) == "22003" or getattr(orig, "pgcode", None) == "22003"
    return isinstance(exc, OverflowError) and "SQLite INTEGER" in str(exc)


def unstorable_text(exc: Exception) -> bool:
    """Text PostgreSQL cannot hold: a NUL character (psycopg refuses it before sending) or a
    \\u0000 escape in JSON (SQLSTATE 22P05, untranslatable_character)."""
    from sqlalchemy.exc import DataError

    if not isinstance(exc, DataError):
        return False
    orig = exc.orig
    return "NUL (0x00)" in str(orig) or "22P05" in (getattr(orig, "sqlstate", None), getattr(orig, "pgcode", None))


def _hostile_input(exc: Exception) -> ResponseReturnValue:
    # Safety nets behind the checks at the edge (id converters, bounded schema fields, the
    # JSON depth check in app.factory): hostile input is a 4xx, never a 500.
    if isinstance(exc, RecursionError):
        log.warning("input nested too deeply", exc_info=exc)
        return current_app.handle_user_exception(ApiError(400, "JSON nested too deeply", "bad_request"))
    if out_of_range(exc):
        log.warning("number out of range for the database", exc_info=exc)
        return current_app.handle_user_exception(
            ApiError(422, "A number in the request is out of range", "validation_error")
        )
    if unstorable_text(exc):
        log.warning("text the database cannot store", exc_info=exc)
        return current_app.handle_user_exception(ApiError(400, NUL_MESSAGE, "bad_request"))
    return _unhandled(exc)


def _unhandled(exc: Exception) -> ResponseReturnValue:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "Internal server error")


def register_error_handlers(app: Flask) -> None:
    from sqlalchemy.exc import DataError

    app.register_error_handler(ApiError, lambda e: error_response(e.status, e.message, e.code, e.details))
    for exc_type in domain_errors():
        app.register_error_handler(exc_type, _domain_error)
    app.register_error_handler(HTTPException, http_exception_response)
    for exc_type in (RecursionError, OverflowError, DataError):
        app.register_error_handler(exc_type, _hostile_input)
    app.register_error_handler(Exception, _unhandled)
