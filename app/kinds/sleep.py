"""`sleep`: a diagnostic job that exercises the engine (progress, cancel, heartbeats).

A test helper, not a way to hold a worker: it runs at most `sleep_max_s` seconds, on the
default queue only (`sleep_queues` lets an operator smoke-test other queues with it)."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from app.config import Settings
from app.fields import StrictBoolean, StrictFloat, StrictInteger
from app.kinds import KindSpec, Spec, SpecError, SubmitContext, allowed_queue, queue_or_default, register


class SleepSpec(Schema):
    seconds = StrictFloat(
        load_default=1.0,
        validate=validate.Range(min=0, max=7 * 24 * 3600),
        metadata={"description": "at most the server's MEDMAAS_SLEEP_MAX_S (default 60)"},
    )
    steps = StrictInteger(load_default=10, validate=validate.Range(min=1, max=100_000))
    fail = StrictBoolean(load_default=False, metadata={"description": "raise an error at the end"})
    metrics = StrictBoolean(
        load_default=False,
        metadata={
            "description": "also emit a deterministic `metric` event per step (epoch=step, losses 1/step) to "
            "exercise metric curves without training a model"
        },
    )
    queue = fields.String(load_default=None, allow_none=True)


def queues(settings: Settings) -> tuple[str, ...]:
    extra = [q.strip() for q in settings.sleep_queues.split(",") if q.strip()]
    return tuple(extra) or (settings.default_queue,)


def check(spec: Spec, ctx: SubmitContext) -> Spec:
    limit = ctx.settings.sleep_max_s
    if spec["seconds"] > limit:
        message = f"sleep is a test helper and runs at most {limit:g} seconds, not {spec['seconds']:g}"
        raise SpecError(message, "invalid_spec", {"spec": {"seconds": [message]}})
    return spec


def route(spec: Spec, settings: Settings) -> str:
    return allowed_queue("sleep", queue_or_default(spec, settings.default_queue), settings)


register(
    KindSpec(
        "sleep",
        SleepSpec,
        route,
        "diagnostic: sleeps with progress events, honours cancel",
        check=check,
        queues=queues,
    )
)
