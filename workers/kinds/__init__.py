"""Job kinds, the worker half: the code that runs each kind.

A kind's spec (schema, submit-time check, route, result rendering) is core and lives in
app/kinds; this registry pairs each kind name with its runner. A runner gets the job's
context (progress, metrics, cancel checks, its artifact directory) and the validated spec,
and returns the job's result: a JSON object stored on the job row. Runners import their
ML code inside the call, so a worker starts quickly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from app.kinds import KindSpec, Spec, get_kind

if TYPE_CHECKING:
    from workers.runtime import JobContext

JobResult = dict[str, Any]  # stored as the job's `result` (JSON)


class Runner(Protocol):
    def __call__(self, ctx: JobContext, spec: Spec) -> JobResult: ...


@dataclass(frozen=True)
class Kind:
    """A kind as a worker sees it: its spec half (app.kinds) and its runner."""

    spec: KindSpec
    run: Runner

    @property
    def name(self) -> str:
        return self.spec.name


def _runners() -> dict[str, Runner]:
    from workers.kinds import ingest, predict, pretrain, score, search, sleep, train

    return {
        "sleep": sleep.run,
        "train": train.run,
        "pretrain": pretrain.run,
        "predict": predict.run,
        "score": score.run,
        "ingest": ingest.run,
        "search": search.run,
    }


_KINDS: dict[str, Kind] = {}


def kind_for(name: str) -> Kind | None:
    """The runnable kind for a job, or None when this worker has no runner for it."""
    if not _KINDS:
        for kind_name, run in _runners().items():
            spec = get_kind(kind_name)
            if spec is not None:
                _KINDS[kind_name] = Kind(spec, run)
    return _KINDS.get(name)
