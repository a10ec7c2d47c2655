"""Runs `score` (spec: app/kinds/score.py): the parent of a sharded scoring job."""

from __future__ import annotations

from app.kinds import Spec
from workers.kinds import JobResult
from workers.runtime import JobContext


def run(ctx: JobContext, spec: Spec) -> JobResult:
    from workers.scoring.runner import run_parent

    return run_parent(ctx, spec)
