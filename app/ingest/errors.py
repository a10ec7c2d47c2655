"""The one exception type ingestion raises for a bad upload."""

from __future__ import annotations

from typing import Any


class IngestError(Exception):
    """An upload that cannot be accepted.

    ``code`` is a stable machine-readable string, ``message`` is written for the
    person who uploaded the file, ``details`` is JSON-serialisable extra context.
    The API answers ``http_status`` (422, or 413 when a size cap was hit).
    """

    def __init__(self, code: str, message: str, details: Any = None, http_status: int = 422) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.http_status = http_status

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}

    def __repr__(self) -> str:
        return f"IngestError({self.code!r}, {self.message!r})"


def too_large(code: str, message: str, details: Any = None) -> IngestError:
    return IngestError(code, message, details, http_status=413)
