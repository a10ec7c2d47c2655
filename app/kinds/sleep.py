"""`sleep`: a diagnostic job that exercises the engine (progress, cancel, heartbeats)."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from app.config import Settings
from app.kinds import KindSpec, Spec, queue_or_default, register


class SleepSpec(Schema):
    seconds = fields.Float(load_default=1.0, validate=validate.Range(min=0, max=7 * 24 * 3600))
    steps = fields.Integer(load_default=10, validate=validate.Range(min=1, max=100_000))
    fail = fields.Boolean(load_default=False, metadata={"description": "raise an error at the end"})
    metrics = fields.Boolean(
        load_default=False,
        metadata={
            "description": "also emit a deterministic `metric` event per step (epoch=step, losses 1/step) to "
            "exercise metric curves without training a model"
        },
    )
    queue = fields.String(load_default=None, allow_none=True)


def route(spec: Spec, settings: Settings) -> str:
    return queue_or_default(spec, settings.default_queue)


register(KindSpec("sleep", SleepSpec, route, "diagnostic: sleeps with progress events, honours cancel"))
