"""/api/v1 lifecycle routes: tags on jobs and model versions, comparing runs, cloning a run
with changes. The queries are app.stores.lifecycle's and app.stores.tags'."""

from __future__ import annotations

from typing import Any

from flask import request
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from app.api import auditing, celery, database, db_session, requires, settings, tenant_id
from app.api.jobs import JobSchema
from app.api.models import ModelVersionSchema
from app.api.openapi import answers
from app.errors import ApiError
from app.fields import StrictInteger
from app.models import Job, KeyRole, ModelVersion
from app.stores import lifecycle
from app.stores import tags as tags_store

blp = Blueprint(
    "lifecycle", __name__, url_prefix="/api/v1", description="Tags, run comparison and cloning a run with changes"
)

TAG = fields.String(validate=validate.Regexp(tags_store.TAG_PATTERN, error=tags_store.TAG_RULE))


class TagsReplaceSchema(Schema):
    tags = fields.List(TAG, required=True, validate=validate.Length(max=tags_store.MAX_TAGS))


class TagsChangeSchema(Schema):
    add = fields.List(TAG, load_default=list, validate=validate.Length(max=tags_store.MAX_TAGS))
    remove = fields.List(TAG, load_default=list, validate=validate.Length(max=tags_store.MAX_TAGS))


class CompareArgs(Schema):
    ids = fields.String(
        required=True,
        validate=validate.Regexp(lifecycle.IDS_PATTERN, error=f"1 to {lifecycle.MAX_COMPARE} comma-separated job ids"),
        metadata={"description": f"up to {lifecycle.MAX_COMPARE} job ids, comma-separated: ids=12,15,19"},
    )


class CompareRowSchema(Schema):
    key = fields.String()
    values = fields.List(fields.Raw(allow_none=True), metadata={"description": "one per job, in `jobs` order"})
    differs = fields.Boolean()


class CompareJobSchema(Schema):
    id = fields.Integer(metadata={"description": "the job's id (a search trial's slot)"})
    label = fields.String(metadata={"description": "#id for a job, `trial N` for a search trial"})
    kind = fields.String()
    state = fields.String()
    model = fields.String(allow_none=True)
    tags = fields.List(fields.String())
    cloned_from = fields.Integer(allow_none=True)
    created_at = fields.String()
    curves = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.List(fields.Float())),
        metadata={"description": "metric name -> [[epoch, value], ...] from the job's metric events"},
    )


class CompareSchema(Schema):
    jobs = fields.List(fields.Nested(CompareJobSchema))
    curve_keys = fields.List(fields.String())
    metrics = fields.List(fields.Nested(CompareRowSchema), metadata={"description": "final metrics, side by side"})
    spec = fields.List(
        fields.Nested(CompareRowSchema),
        metadata={"description": "the specs, flattened; `differs` marks the keys that differ"},
    )


class TrialsCompareArgs(Schema):
    slots = fields.String(
        validate=validate.Regexp(lifecycle.SLOTS_PATTERN, error="comma-separated trial slots"),
        metadata={"description": "the trial slots to compare (default: every trial): slots=0,3,5"},
    )


class TrialsCompareSchema(CompareSchema):
    search_id = fields.Integer()


class CloneSchema(Schema):
    set = fields.Dict(
        keys=fields.String(),  # dotted spec paths, checked by app.stores.lifecycle.apply_sets
        values=fields.Raw(allow_none=True),
        load_default=dict,
        metadata={"description": 'spec changes by dotted path: {"epochs": 30, "model.hidden_size": 128}'},
    )
    spec = fields.Dict(
        load_default=None,
        allow_none=True,
        metadata={"description": "a whole edited spec to start from instead of the job's own"},
    )
    priority = StrictInteger(load_default=None, allow_none=True, validate=validate.Range(min=-100, max=100))


# -- tags ------------------------------------------------------------------------------------


@blp.route("/jobs/<id:job_id>/tags", methods=["PUT"])
@blp.arguments(TagsReplaceSchema)
@blp.response(200, JobSchema)
@requires(KeyRole.member)
def replace_job_tags(body: dict[str, Any], job_id: int) -> Job:
    """Replace a job's tags (`{"tags": []}` removes them all)."""
    return tags_store.tag_job(db_session(), tenant_id(), job_id, replace=body["tags"])


@blp.route("/jobs/<id:job_id>/tags", methods=["PATCH"])
@blp.arguments(TagsChangeSchema, required=False)  # no body: nothing to change
@answers(409)  # the job would carry more than MAX_TAGS
@blp.response(200, JobSchema)
@requires(KeyRole.member)
def change_job_tags(body: dict[str, Any], job_id: int) -> Job:
    """Add and/or remove tags of a job; the others stay. 409 `too_many_tags` beyond 32."""
    return tags_store.tag_job(db_session(), tenant_id(), job_id, add=body["add"], remove=body["remove"])


@blp.route("/models/<string:name>/versions/<id:version>/tags", methods=["PUT"])
@blp.arguments(TagsReplaceSchema)
@blp.response(200, ModelVersionSchema)
@requires(KeyRole.member)
def replace_version_tags(body: dict[str, Any], name: str, version: int) -> ModelVersion:
    """Replace a model version's tags."""
    return tags_store.tag_version(db_session(), tenant_id(), name, version, replace=body["tags"])


@blp.route("/models/<string:name>/versions/<id:version>/tags", methods=["PATCH"])
@blp.arguments(TagsChangeSchema, required=False)  # no body: nothing to change
@answers(409)  # the version would carry more than MAX_TAGS
@blp.response(200, ModelVersionSchema)
@requires(KeyRole.member)
def change_version_tags(body: dict[str, Any], name: str, version: int) -> ModelVersion:
    """Add and/or remove tags of a model version; the others stay."""
    return tags_store.tag_version(db_session(), tenant_id(), name, version, add=body["add"], remove=body["remove"])


# -- compare ---------------------------------------------------------------------------------


@blp.route("/jobs/compare", methods=["GET"])
@blp.arguments(CompareArgs, location="query")
@answers(404)  # one of the ids is not the tenant's job
@blp.response(200, CompareSchema)
@requires(KeyRole.viewer)
def compare(args: dict[str, Any]) -> dict[str, Any]:
    """Several runs side by side: each job's metric curves (from its metric events), the final
    metrics (the result's `metrics`, else each curve's last value) and the specs flattened to
    dotted keys, `differs` marking the rows whose values are not all equal."""
    ids = lifecycle.parse_ids(args["ids"])
    auditing.note(job_ids=ids)  # which jobs were read
    return lifecycle.compare(db_session(), tenant_id(), ids)


@blp.route("/jobs/<id:job_id>/trials/compare", methods=["GET"])
@blp.arguments(TrialsCompareArgs, location="query")
@blp.response(200, TrialsCompareSchema)
@requires(KeyRole.viewer)
def compare_trials(args: dict[str, Any], job_id: int) -> dict[str, Any]:
    """A hyper-parameter search's trials side by side, as GET /jobs/compare answers for jobs:
    each trial's curve of the search metric per epoch, its final value, and its parameters as
    the spec rows (`differs` marks the parameters that differ). 404 for a job that is not a
    search or a slot it does not have."""
    return lifecycle.compare_trials(db_session(), tenant_id(), job_id, lifecycle.parse_slots(args.get("slots")))


# -- clone -----------------------------------------------------------------------------------


@blp.route("/jobs/<id:job_id>/clone", methods=["POST"])
@blp.arguments(CloneSchema, required=False)  # no body: the same spec again
@blp.response(202, JobSchema)
@blp.alt_response(200, schema=JobSchema, description="Same Idempotency-Key and request seen before: the existing job")
@requires(KeyRole.member)
def clone_job(body: dict[str, Any], job_id: int) -> tuple[Job, int]:
    """Run a job again with changes: a new job of the same kind whose spec is this job's (or
    `spec`) with `set` applied, validated like any submission (422 naming the field). The new
    job's `cloned_from` is this job's id. Honours `Idempotency-Key` like POST /jobs."""
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (1 <= len(key) <= 255):
        raise ApiError(400, "Idempotency-Key must be 1..255 characters")
    job, created = lifecycle.clone(
        db_session(),
        celery(),
        database(),
        settings(),
        tenant_id(),
        job_id,
        sets=body["set"],
        spec=body["spec"],
        priority=body["priority"],
        idempotency_key=key,
    )
    return job, (202 if created else 200)
