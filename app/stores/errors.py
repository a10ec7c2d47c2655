"""Domain errors the stores raise; app.errors maps each to its HTTP status and error body."""

from __future__ import annotations

from typing import Any


class StoreError(Exception):
    """A request a store refuses. `code` is the error body's stable code (None: the
    status's default), `details` JSON-serialisable context."""

    default_code: str | None = None

    def __init__(self, message: str, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message, self.details = message, details
        self.code = code or self.default_code


class NotFound(StoreError, LookupError):
    """Missing, or another tenant's (indistinguishable on purpose). HTTP 404."""

    default_code = "not_found"


class Conflict(StoreError):
    """The row is in a state that does not allow the request. HTTP 409."""

    default_code = "conflict"


class Invalid(StoreError):
    """Well-formed input the store cannot accept. HTTP 422."""

    default_code = "validation_error"
