"""/api/v1/jobs: submit, list, detail, events, SSE stream, cancel, result."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from apispec import APISpec
from flask import Response, current_app, jsonify, request, stream_with_context
from flask.typing import ResponseReturnValue
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate
from sqlalchemy import select

from app import artifacts
from app.api import MAX_ID, celery, database, db_session, requires, settings, tenant_id
from app.api.openapi import answers, body_doc, camel_case, component_ref, schema_converter
from app.artifacts import job_dir, send_artifact
from app.errors import ApiError
from app.fields import StrictInteger
from app.kinds import all_kinds, get_kind, submittable_kinds
from app.kinds.score import explanation_file
from app.models import TERMINAL_STATES, Job, JobEvent, JobState, KeyRole
from app.stores import jobs as jobs_store
from app.stores.lifecycle import MAX_SEARCH, MODEL_PATTERN
from app.stores.tags import TAG_PATTERN, TAG_RULE

blp = Blueprint("jobs", __name__, url_prefix="/api/v1/jobs", description="Submit and follow jobs")


class JobSubmitSchema(Schema):
    kind = fields.String(required=True, metadata={"description": "train, score, predict, sleep"})
    spec = fields.Dict(load_default=dict)
    priority = StrictInteger(load_default=0, validate=validate.Range(min=-100, max=100))
    max_attempts = StrictInteger(load_default=None, allow_none=True, validate=validate.Range(min=1, max=20))


class JobSchema(Schema):
    id = fields.Integer()
    kind = fields.String()
    state = fields.Function(lambda j: j.state.value, metadata={"type": "string", "enum": [s.value for s in JobState]})
    spec = fields.Dict()
    queue = fields.String()
    priority = fields.Integer()
    attempts = fields.Integer()
    max_attempts = fields.Integer()
    progress = fields.Float()
    message = fields.String()
    error = fields.String(allow_none=True)
    result = fields.Dict(allow_none=True)
    created_at = fields.DateTime()
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
    heartbeat_at = fields.DateTime(allow_none=True)
    worker = fields.String(allow_none=True)
    cancel_requested = fields.Boolean()
    idempotency_key = fields.String(allow_none=True)
    duration_s = fields.Float(allow_none=True)
    tags = fields.List(fields.String())  # app/api/lifecycle.py sets them
    cloned_from = fields.Integer(allow_none=True, metadata={"description": "the job this one was cloned from"})


# GET /jobs/{id} serialises the row itself (app.stores.jobs.read: one Core SELECT of these
# columns) with the conversions JobSchema's fields apply, skipping ORM loading and
# marshmallow; tests/unit/test_api_jobs.py checks it answers exactly JobSchema().dump(job).
JOB_FIELDS = tuple(JobSchema().fields)


def _plain(field: fields.Field) -> Callable[[Any], Any]:
    """The conversion `field` applies to a non-null column value when JobSchema dumps it."""
    if isinstance(field, fields.Function):  # state: the enum's value
        return lambda value: value.value
    if isinstance(field, fields.List):
        item = _plain(field.inner)
        return lambda value: [item(v) for v in value]
    for kind, convert in ((fields.DateTime, datetime.isoformat), (fields.Integer, int), (fields.Float, float),
                          (fields.String, str), (fields.Boolean, bool), (fields.Dict, dict)):  # fmt: skip
        if isinstance(field, kind):
            return convert
    raise TypeError(f"no plain conversion for {type(field).__name__}")


_JOB_CONVERSIONS = tuple((name, _plain(field)) for name, field in JobSchema().fields.items())


def job_json(row: Any) -> dict[str, Any]:
    """JobSchema().dump of a row of JOB_FIELDS (a Core row, in that order)."""
    return {
        name: None if value is None else convert(value)
        for (name, convert), value in zip(_JOB_CONVERSIONS, row, strict=True)
    }


class JobListArgs(Schema):
    state = fields.String(validate=validate.OneOf([s.value for s in JobState]))
    kind = fields.String(metadata={"description": "only jobs of this kind; kind=predict lists the online predict jobs"})
    all = fields.Boolean(
        load_default=False,
        metadata={
            "description": "without `kind`, online predict jobs (one per POST /models/{name}/predict) are "
            "left out of the list; all=true lists every kind. Predict jobs stay readable by id."
        },
    )
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    cursor = fields.Integer(
        validate=validate.Range(min=0, max=MAX_ID),
        metadata={"description": "return jobs with id below this (next_cursor)"},
    )
    # filters of app.stores.lifecycle
    tag = fields.String(
        validate=validate.Regexp(TAG_PATTERN, error=TAG_RULE), metadata={"description": "only jobs with this tag"}
    )
    model = fields.String(
        validate=validate.Regexp(MODEL_PATTERN, error="a model name: letters, digits, '.', '_', '-'"),
        metadata={"description": "only jobs that train or use this model (registry name)"},
    )
    search = fields.String(
        validate=validate.Length(min=1, max=MAX_SEARCH),
        metadata={"description": "only jobs whose spec contains this text (case-insensitive)"},
    )


class JobListSchema(Schema):
    items = fields.List(fields.Nested(JobSchema))
    next_cursor = fields.Integer(allow_none=True)


class EventSchema(Schema):
    seq = fields.Integer()
    ts = fields.DateTime()
    type = fields.String()
    data = fields.Dict()


class EventsArgs(Schema):
    after = fields.Integer(load_default=0, validate=validate.Range(min=0, max=MAX_ID))
    limit = fields.Integer(load_default=1000, validate=validate.Range(min=1, max=10_000))


class EventListSchema(Schema):
    items = fields.List(fields.Nested(EventSchema))
    last_seq = fields.Integer()
    state = fields.String()


def submit_body_doc(spec: APISpec) -> dict[str, Any]:
    """The submit body in OpenAPI: one variant per submittable kind (a component named
    `<Kind>JobSubmit`, e.g. TrainJobSubmit) with that kind's spec schema (e.g. TrainSpec),
    told apart by `kind`. Every registered kind's spec schema is published, submittable or not
    (a job's `spec` is one of them), so a kind registered later appears without edits here."""
    converter = schema_converter(spec)
    for kind in all_kinds().values():
        converter.resolve_nested_schema(kind.schema)
    common = {name: converter.field2property(field) for name, field in JobSubmitSchema().fields.items()}
    mapping = {}
    for name, kind in submittable_kinds().items():
        properties = {
            **common,
            "kind": {"type": "string", "enum": [name]},
            "spec": converter.resolve_nested_schema(kind.schema),
        }
        variant = {
            "type": "object",
            "description": kind.description,
            "properties": properties,
            # a spec may be left out only where every field of it has a default
            "required": ["kind", "spec"] if any(f.required for f in kind.schema().fields.values()) else ["kind"],
            "additionalProperties": False,
        }
        mapping[name] = component_ref(spec, f"{camel_case(name)}JobSubmit", variant)
    return {
        "oneOf": [{"$ref": ref} for ref in mapping.values()],
        "discriminator": {"propertyName": "kind", "mapping": mapping},
    }


@blp.route("", methods=["POST"])
@body_doc(submit_body_doc)
@blp.arguments(JobSubmitSchema)
@blp.response(202, JobSchema)
@blp.alt_response(200, schema=JobSchema, description="Same Idempotency-Key and request seen before: the existing job")
@requires(KeyRole.member)
def submit(body: dict[str, Any]) -> tuple[Job, int]:
    """Submit a job; answers 202 once the job row is committed.

    With an `Idempotency-Key` header the tenant's first job for that key is returned (200)
    when the request (kind, spec, priority, max_attempts) is the same; the same key with a
    different request is refused with 422 `idempotency_key_reused` and stores nothing."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= 255):
        raise ApiError(400, "Idempotency-Key must be 1..255 characters")
    job, created = jobs_store.submit(
        db_session(),
        celery(),
        database(),
        settings(),
        tenant_id(),
        body["kind"],
        body["spec"],
        priority=body["priority"],
        max_attempts=body["max_attempts"],
        idempotency_key=key,
    )
    return job, (202 if created else 200)


@blp.route("", methods=["GET"])
@blp.arguments(JobListArgs, location="query")
@blp.response(200, JobListSchema)
@requires(KeyRole.viewer)
def list_jobs(args: dict[str, Any]) -> dict[str, Any]:
    """List the tenant's jobs, newest first; page with next_cursor. Online predict jobs are
    left out unless `kind=predict` or `all=true`."""
    return jobs_store.list_page(
        db_session(),
        tenant_id(),
        state=args.get("state"),
        kind=args.get("kind"),
        limit=args["limit"],
        cursor=args.get("cursor"),
        include_hidden=args["all"],
        tag=args.get("tag"),
        model=args.get("model"),
        search=args.get("search"),
    )


@blp.route("/<id:job_id>", methods=["GET"])
@blp.response(200, JobSchema)
@requires(KeyRole.viewer)
def detail(job_id: int) -> Response:
    session = db_session()
    if not session.in_transaction():
        # This request writes nothing but its audit row (app.api.auditing.finish): the read
        # and that INSERT each commit on their own, without BEGIN and COMMIT round trips.
        session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    # A Response passes flask-smorest's dump untouched; the body is JobSchema's (job_json).
    return jsonify(job_json(jobs_store.read(session, tenant_id(), job_id, JOB_FIELDS)))


@blp.route("/<id:job_id>/events", methods=["GET"])
@blp.arguments(EventsArgs, location="query")
@blp.response(200, EventListSchema)
@requires(KeyRole.viewer)
def events(args: dict[str, Any], job_id: int) -> dict[str, Any]:
    """Events with seq > after, in order."""
    return jobs_store.events_after(db_session(), tenant_id(), job_id, args["after"], args["limit"])


@blp.route("/<id:job_id>/cancel", methods=["POST"])
@answers(409)  # already finished
@blp.response(202, JobSchema)
@requires(KeyRole.member)
def cancel(job_id: int) -> Job:
    """Cancel: queued jobs at once, running jobs between batches."""
    job, _state = jobs_store.request_cancel(db_session(), tenant_id(), job_id)
    return job


# -- server-sent events -------------------------------------------------------------------
# One framing, one event query and one feed (the per-viewer cursor) serve both loops: the
# WSGI generator below (Flask test client, plain WSGI servers) and the async route in
# app.asgi, which `medmaas web` serves so an idle stream holds no thread. Between reads a
# stream sleeps on the process's EventHub; a commit that appends an event wakes it at once,
# and a missed notification only delays the next read until the safety-net timeout.

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_MIMETYPE = "text/event-stream"
STREAM_SAFETY_NET_S = 15.0  # re-read the database at least this often, notified or not
STREAM_KEEPALIVE_S = 15.0  # an SSE comment when nothing was sent for this long (proxies, dead peers)
STREAM_MAX_S = 600.0  # then the stream ends without `end`; EventSource reconnects with Last-Event-ID
STREAM_BATCH = 500
# WSGI environ key set by app.asgi: the view authenticates as usual, then hands the stream
# (job id and position) back instead of generating it on a worker thread.
STREAM_HANDOFF = "medmaas.stream_handoff"


def sse_frame(seq: int, type_: str, data: Any) -> str:
    return f"id: {seq}\nevent: {type_}\ndata: {json.dumps(data, default=str)}\n\n"


def read_stream_batch(
    db: Any, job_id: int, after: int, limit: int = STREAM_BATCH
) -> tuple[JobState | None, list[JobEvent]]:
    """The job's state, then its events with seq > after. State first: when it reads terminal,
    every event committed up to the terminal transition is visible to the second query."""
    with db.sessionmaker() as s:
        state = s.scalar(select(Job.state).where(Job.id == job_id))
        rows = s.scalars(
            select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after).order_by(JobEvent.seq).limit(limit)
        ).all()
    return state, list(rows)


def stream_position() -> int:
    """Where a stream resumes: the Last-Event-ID header (EventSource reconnects) or ?after=N."""
    raw = request.headers.get("Last-Event-ID") or request.args.get("after", "0")
    try:
        after = int(raw)
    except ValueError:
        raise ApiError(400, "after / Last-Event-ID must be an integer") from None
    if not 0 <= after <= MAX_ID:
        raise ApiError(400, f"after / Last-Event-ID must be 0..{MAX_ID}")
    return after


class EventFeed:
    """One viewer's position in one job's events. `step()` does one database read and says
    what to send and how long to wait for a notification before the next step."""

    def __init__(
        self,
        db: Any,
        job_id: int,
        after: int,
        *,
        max_s: float = STREAM_MAX_S,
        safety_net_s: float | None = None,
        keepalive_s: float | None = None,
    ) -> None:
        self.db, self.job_id, self.after = db, job_id, after
        self.safety_net_s = STREAM_SAFETY_NET_S if safety_net_s is None else safety_net_s
        self.keepalive_s = STREAM_KEEPALIVE_S if keepalive_s is None else keepalive_s
        self.started = self.last_send = time.monotonic()
        self.deadline = self.started + max_s
        self.opened = False

    def step(self) -> tuple[str, float | None]:
        """(text to send, seconds to wait before the next step); the wait is None once the
        stream is over and 0 when more events are already waiting."""
        state, rows = read_stream_batch(self.db, self.job_id, self.after)
        parts = [] if self.opened else ["retry: 2000\n\n"]
        self.opened = True
        for ev in rows:
            self.after = ev.seq
            parts.append(
                sse_frame(ev.seq, ev.type, {"seq": ev.seq, "ts": ev.ts.isoformat(), "type": ev.type, "data": ev.data})
            )
        now = time.monotonic()
        if state is None:  # erased while watched
            return "".join(parts) + sse_frame(self.after, "end", {"state": None}), None
        if not rows and state in TERMINAL_STATES:
            return "".join(parts) + sse_frame(self.after, "end", {"state": state.value}), None
        if not parts and now - self.last_send >= self.keepalive_s:
            parts.append(": keep-alive\n\n")
        if parts:
            self.last_send = now
        if now >= self.deadline:
            return "".join(parts), None
        if len(rows) >= STREAM_BATCH or state in TERMINAL_STATES:  # more to read, or the `end` to send
            return "".join(parts), 0.0
        wait = min(self.safety_net_s, self.deadline - now, max(0.0, self.last_send + self.keepalive_s - now))
        return "".join(parts), wait


@blp.route("/<id:job_id>/stream", methods=["GET"])
@answers(400)  # a bad Last-Event-ID / after
@blp.doc(responses={200: {"description": "text/event-stream of job events"}})
@requires(KeyRole.viewer)
def stream(job_id: int) -> ResponseReturnValue:
    """Server-sent events; resumes after ?after=N or the Last-Event-ID header."""
    job = jobs_store.get(db_session(), tenant_id(), job_id)
    return event_stream_response(job.id)


def event_stream_response(job_id: int, max_s: float = STREAM_MAX_S) -> Response:
    """A text/event-stream of one job's events after ?after=N or Last-Event-ID, ending with an
    `end` event once the job is terminal. The caller has already checked the job is the
    tenant's. Shared by the Bearer API and the web pages' session-authenticated twin."""
    after = stream_position()
    handoff = request.environ.get(STREAM_HANDOFF)
    if handoff is not None:  # app.asgi streams it on its event loop, with this response's headers
        handoff.update(job_id=job_id, after=after, max_s=max_s)
        return Response(b"", mimetype=SSE_MIMETYPE, headers=SSE_HEADERS)
    feed = EventFeed(database(), job_id, after, max_s=max_s)
    hub = current_app.extensions["medmaas.hub"]

    def generate() -> Iterator[str]:
        # Registered before the first read: a commit between a read and the wait still wakes it.
        with hub.watch(job_id) as watch:
            while True:
                text, wait = feed.step()
                if text:
                    yield text
                if wait is None:
                    return
                if wait > 0:
                    watch.wait(wait)

    return Response(stream_with_context(generate()), mimetype=SSE_MIMETYPE, headers=SSE_HEADERS)


@blp.route("/<id:job_id>/result", methods=["GET"])
@answers(400, 409, 410)  # unknown format; not succeeded (yet); score file gone
@blp.doc(responses={200: {"description": "the job's result: JSON, or a file (?format=csv|parquet) for scoring jobs"}})
@requires(KeyRole.viewer)
def result(job_id: int) -> ResponseReturnValue:
    """The job's output once it has succeeded."""
    from flask import jsonify

    job = jobs_store.succeeded(db_session(), tenant_id(), job_id)
    kind = get_kind(job.kind)
    if kind is not None and kind.render_result is not None:
        return kind.render_result(job, request.args, settings())
    return jsonify(job.result or {})


@blp.route("/<id:job_id>/files/explain/<id:rank>.svg", methods=["GET"])
@answers(409)  # not succeeded (yet)
@blp.doc(
    responses={
        200: {
            "description": "the molecule of the score job's top-K row of this rank, its atoms coloured "
            "by their attribution (image/svg+xml; listed in the result's `explanations`)",
            "content": {"image/svg+xml": {"schema": {"type": "string"}}},
        }
    }
)
@requires(KeyRole.viewer)
def explanation_drawing(job_id: int, rank: int) -> ResponseReturnValue:
    """A drawing a score job made with `explain_top_k`; 404 for a rank it did not draw."""
    job = jobs_store.succeeded(db_session(), tenant_id(), job_id)
    listed = {e.get("rank") for e in (job.result or {}).get("explanations") or [] if e.get("file")}
    path = explanation_file(job_dir(settings(), job.tenant_id, job.id), rank)
    if job.kind != "score" or rank not in listed or not artifacts.exists(path):
        raise ApiError(404, f"Job {job_id} has no drawing of rank {rank}", "not_found")
    return send_artifact(path, settings(), mimetype="image/svg+xml", max_age=0)


@blp.route("/<id:job_id>", methods=["DELETE"])
@blp.response(204)
@blp.alt_response(409, description="The job is queued or running: cancel it first")
@requires(KeyRole.member)
def delete_job(job_id: int) -> None:
    """Delete a finished job (erasure).

    Its row, events, score shards and files (checkpoints, score files, scratch) go. A model
    version it trained stays. 409 while it is queued or running: cancel it first."""
    jobs_store.delete(db_session(), settings(), tenant_id(), job_id)
