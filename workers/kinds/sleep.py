"""`sleep`: a diagnostic job that exercises the engine (progress, cancel, heartbeats)."""
from __future__ import annotations

import time
from typing import Any

from marshmallow import Schema, fields, validate

from app.config import Settings
from workers.kinds import JobKind, register


class SleepSpec(Schema):
    seconds = fields.Float(load_default=1.0, validate=validate.Range(min=0, max=7 * 24 * 3600))
    steps = fields.Integer(load_default=10, validate=validate.Range(min=1, max=100_000))
    fail = fields.Boolean(load_default=False, metadata={"description": "raise an error at the end"})
    metrics = fields.Boolean(load_default=False, metadata={
        "description": "also emit a deterministic `metric` event per step (epoch=step, losses 1/step) to "
                       "exercise metric curves without training a model"})
    queue = fields.String(load_default=None, allow_none=True)


def run(ctx, spec: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    step_s = spec["seconds"] / spec["steps"]
    started = time.monotonic()
    for step in range(spec["steps"]):
        deadline = time.monotonic() + step_s
        while True:
            ctx.check_cancel()
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.1))
        if spec.get("metrics"):
            n = step + 1
            ctx.metric(epoch=n, train_loss=round(1.0 / n, 6), val_loss=round(1.2 / n, 6),
                       val_rmse=round(1.0 / n ** 0.5, 6))
        eta_s = round(step_s * (spec["steps"] - step - 1), 3)
        ctx.progress((step + 1) / spec["steps"], f"step {step + 1}/{spec['steps']}", step=step + 1, eta_s=eta_s,
                     force=True)
    if spec["fail"]:
        raise RuntimeError("sleep job asked to fail")
    return {"slept_s": round(time.monotonic() - started, 3), "steps": spec["steps"], "attempt": ctx.attempt}


def route(spec: dict[str, Any], settings: Settings) -> str:
    return spec.get("queue") or settings.default_queue


register(JobKind("sleep", SleepSpec, run, route, "diagnostic: sleeps with progress events, honours cancel"))
