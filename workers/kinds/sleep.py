"""Runs `sleep` (spec: app/kinds/sleep.py): progress events, cancel, heartbeats."""

from __future__ import annotations

import time

from app.kinds import Spec
from workers.kinds import JobResult
from workers.runtime import JobContext


def run(ctx: JobContext, spec: Spec) -> JobResult:
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
            ctx.metric(
                epoch=n, train_loss=round(1.0 / n, 6), val_loss=round(1.2 / n, 6), val_rmse=round(1.0 / n**0.5, 6)
            )
        eta_s = round(step_s * (spec["steps"] - step - 1), 3)
        ctx.progress(
            (step + 1) / spec["steps"], f"step {step + 1}/{spec['steps']}", step=step + 1, eta_s=eta_s, force=True
        )
    if spec["fail"]:
        raise RuntimeError("sleep job asked to fail")
    return {"slept_s": round(time.monotonic() - started, 3), "steps": spec["steps"], "attempt": ctx.attempt}
