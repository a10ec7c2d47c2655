"""Job kinds: name -> handler module with a spec schema.

Kind modules keep their top-level imports light (marshmallow only) because the web
process imports this registry to validate specs; ML code is imported inside run().
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from marshmallow import Schema

from app.config import Settings


class SpecError(Exception):
    """A spec that is well-formed but refers to something that does not fit (a missing
    dataset, a label column of the wrong type). The API answers 422 and stores nothing."""

    def __init__(self, message: str, code: str = "invalid_spec", details: Any = None):
        super().__init__(message)
        self.message, self.code, self.details = message, code, details


@dataclass(frozen=True)
class JobKind:
    name: str
    spec_schema: type[Schema]
    run: Callable[..., dict[str, Any]]  # run(ctx: JobContext, spec: dict) -> result dict
    route: Callable[[dict[str, Any], Settings], str]  # spec -> queue name
    description: str = ""
    submittable: bool = True  # False for kinds only the platform itself enqueues
    # check(spec, session, tenant_id) -> spec: DB-aware validation at submit; raises SpecError
    check: Optional[Callable[..., dict[str, Any]]] = None
    # serve_result(job, query_args) -> Flask response for GET /jobs/{id}/result (files)
    serve_result: Optional[Callable[..., Any]] = None


KINDS: dict[str, JobKind] = {}


def register(kind: JobKind) -> JobKind:
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> JobKind | None:
    _load_builtin_kinds()
    return KINDS.get(name)


def all_kinds() -> dict[str, JobKind]:
    _load_builtin_kinds()
    return KINDS


_loaded = False


def _load_builtin_kinds() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from workers.kinds import sleep  # noqa: F401
    for optional in ("train", "predict", "score"):
        try:
            __import__(f"workers.kinds.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name != f"workers.kinds.{optional}":
                raise
