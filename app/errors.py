"""One error body for every failure: {"error": {"code", "message", "details"}}."""
from __future__ import annotations

import logging
from typing import Any, Optional

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "validation_error",
    429: "too_many_requests", 500: "internal_error", 503: "unavailable",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, details: Any = None):
        super().__init__(message)
        self.status, self.message, self.details = status, message, details
        self.code = code or _CODES.get(status, "error")


def error_response(status: int, message: str, code: Optional[str] = None, details: Any = None):
    body = {"error": {"code": code or _CODES.get(status, "error"), "message": message, "details": details}}
    return jsonify(body), status


def http_exception_response(exc: HTTPException):
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


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ApiError, lambda e: error_response(e.status, e.message, e.code, e.details))
    app.register_error_handler(HTTPException, http_exception_response)

    @app.errorhandler(Exception)
    def _unhandled(exc: Exception):  # noqa: ANN202
        log.exception("unhandled error")
        return error_response(500, "Internal server error")
