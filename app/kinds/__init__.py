"""Job kinds, the core half: what a kind accepts, where it runs, how its result is served.

Every kind declares a spec schema (marshmallow; the OpenAPI document and the API's
validation both come from it), an optional `check` against the database at submit time,
a `route` to a queue, and optionally a `render_result` for GET /jobs/{id}/result. The
code that *runs* a kind lives in workers/kinds (a runner per kind name); the web process
imports only this package, so spec modules stay light (marshmallow and SQLAlchemy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from marshmallow import Schema
from sqlalchemy.orm import Session

from app.config import Settings
from app.models import Job

Spec = dict[str, Any]


class SpecError(Exception):
    """A spec that is well-formed but refers to something that does not fit (a missing
    dataset, a label column of the wrong type). The API answers 422 and stores nothing."""

    def __init__(self, message: str, code: str = "invalid_spec", details: Any = None) -> None:
        super().__init__(message)
        self.message, self.code, self.details = message, code, details


@dataclass(frozen=True)
class SubmitContext:
    """What a kind's submit-time check may consult: the tenant's database session, the
    settings, and which queues have a live worker (`live_queues()` raises when the broker
    cannot be asked; None where nobody can tell, e.g. a script without a broker)."""

    session: Session
    tenant_id: int
    settings: Settings
    live_queues: Callable[[], set[str]] | None = None


class Check(Protocol):
    """DB-aware validation at submit: returns the spec to store (resolved ids added) or
    raises SpecError."""

    def __call__(self, spec: Spec, ctx: SubmitContext) -> Spec: ...


class Route(Protocol):
    def __call__(self, spec: Spec, settings: Settings) -> str: ...


class RenderResult(Protocol):
    """The response for GET /jobs/{id}/result of a succeeded job (files, formats)."""

    def __call__(self, job: Job, args: Mapping[str, str], settings: Settings) -> Any: ...


class Queues(Protocol):
    """The queues a kind's jobs may use (names come from the settings)."""

    def __call__(self, settings: Settings) -> tuple[str, ...]: ...


def any_queue(settings: Settings) -> tuple[str, ...]:
    return (settings.default_queue, settings.gpu_queue, settings.inference_queue)


@dataclass(frozen=True)
class KindSpec:
    name: str
    schema: type[Schema]
    route: Route
    description: str = ""
    check: Check | None = None
    render_result: RenderResult | None = None
    submittable: bool = True  # False for kinds only the platform itself enqueues
    queues: Queues = any_queue  # a `queue` in the spec outside these is refused (422)


KINDS: dict[str, KindSpec] = {}


def register(kind: KindSpec) -> KindSpec:
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> KindSpec | None:
    return KINDS.get(name)


def all_kinds() -> dict[str, KindSpec]:
    return KINDS


def submittable_kinds() -> dict[str, KindSpec]:
    return {name: k for name, k in sorted(KINDS.items()) if k.submittable}


def queue_or_default(spec: Spec, default: str) -> str:
    """An explicit `queue` in the spec wins over the kind's default."""
    return spec.get("queue") or default


def allowed_queue(kind: str, queue: str, settings: Settings) -> str:
    """`queue` if the kind may use it, else a SpecError (422) naming the spec's `queue` field.
    Keeps, say, a long job off the inference queue that online predictions wait on."""
    allowed = KINDS[kind].queues(settings)
    if queue not in allowed:
        message = f"kind {kind} runs on queue {' or '.join(allowed)}, not {queue!r}"
        raise SpecError(message, "invalid_spec", {"spec": {"queue": [message]}})
    return queue


# The built-in kinds register themselves on import.
from app.kinds import ingest, predict, pretrain, score, search, sleep, train  # noqa: E402,F401
