"""Job kinds: name -> handler module with a spec schema.

Kind modules keep their top-level imports light (marshmallow only) because the web
process imports this registry to validate specs; ML code is imported inside run().
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from marshmallow import Schema

from app.config import Settings


@dataclass(frozen=True)
class JobKind:
    name: str
    spec_schema: type[Schema]
    run: Callable[..., dict[str, Any]]  # run(ctx: JobContext, spec: dict) -> result dict
    route: Callable[[dict[str, Any], Settings], str]  # spec -> queue name
    description: str = ""
    submittable: bool = True  # False for kinds only the platform itself enqueues


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
