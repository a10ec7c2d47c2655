"""/api/v1/models: the registry (versions, aliases, weights) and online predict."""

from __future__ import annotations

import time
from typing import Any

from flask import current_app, jsonify, request
from flask.typing import ResponseReturnValue
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from app import inference
from app.api import MAX_ID, auditing, celery, database, db_session, requires, settings, tenant_id
from app.api.jobs import JobSchema
from app.artifacts import send_artifact
from app.errors import ApiError
from app.fields import StrictFloat, StrictInteger
from app.kinds import SpecError
from app.kinds.predict import INPUT_DOC, PredictOptions
from app.models import JobState, KeyRole, ModelVersion
from app.stores import jobs as jobs_store
from app.stores import models as models_store
from app.stores.models import ALIAS_PATTERN, BUNDLE_FILES

blp = Blueprint("models", __name__, url_prefix="/api/v1/models", description="Model registry and predictions")

ALIAS = validate.Regexp(models_store.ALIAS_PATTERN, error=models_store.ALIAS_RULE)


class ModelVersionSchema(Schema):
    name = fields.String()
    version = fields.Integer()
    arch = fields.String()
    task = fields.String()
    input_kind = fields.String()
    spec = fields.Dict()
    dataset_id = fields.Integer(allow_none=True)
    dataset_sha256 = fields.String()
    metrics = fields.Dict()
    job_id = fields.Integer(allow_none=True)
    created_at = fields.DateTime()
    artifacts = fields.Function(
        lambda mv: {
            **{k: f"/api/v1/models/{mv.name}/versions/{mv.version}/files/{k}" for k in BUNDLE_FILES},
            "onnx": f"/api/v1/models/{mv.name}/versions/{mv.version}/onnx",  # app/api/onnx.py
        }
    )
    tags = fields.List(fields.String())  # app/api/lifecycle.py sets them
    card = fields.Function(
        lambda mv: {
            "json": f"/api/v1/models/{mv.name}/versions/{mv.version}/card",
            "markdown": f"/api/v1/models/{mv.name}/versions/{mv.version}/card.md",
        },
        metadata={"description": "the model card (app/api/cards.py)"},
    )


class ModelSummarySchema(Schema):
    name = fields.String()
    latest_version = fields.Integer()
    versions = fields.Integer()
    aliases = fields.Dict(keys=fields.String(), values=fields.Integer())


class ModelListSchema(Schema):
    items = fields.List(fields.Nested(ModelSummarySchema))


class ModelDetailSchema(Schema):
    name = fields.String()
    aliases = fields.Dict(keys=fields.String(), values=fields.Integer())
    versions = fields.List(fields.Nested(ModelVersionSchema))


class AliasSchema(Schema):
    version = StrictInteger(required=True, validate=validate.Range(min=1, max=MAX_ID))


class PredictRequest(PredictOptions):
    inputs = fields.List(fields.Raw(metadata=INPUT_DOC), required=True, validate=validate.Length(min=1, max=10_000))
    version = StrictInteger(validate=validate.Range(min=1, max=MAX_ID))
    alias = fields.String(validate=ALIAS)
    timeout = StrictFloat(validate=validate.Range(min=0, max=300))


class PredictResponse(Schema):
    model = fields.String()
    version = fields.Integer()
    outputs = fields.List(fields.String())
    predictions = fields.List(fields.Dict())
    job_id = fields.Integer()


@blp.route("", methods=["GET"])
@blp.response(200, ModelListSchema)
@requires(KeyRole.viewer)
def list_models() -> dict[str, Any]:
    return {"items": models_store.summaries(db_session(), tenant_id())}


@blp.route("/<string:name>", methods=["GET"])
@blp.response(200, ModelDetailSchema)
@requires(KeyRole.viewer)
def model_detail(name: str) -> dict[str, Any]:
    return models_store.detail(db_session(), tenant_id(), name)


@blp.route("/<string:name>/versions/<id:version>", methods=["GET"])
@blp.response(200, ModelVersionSchema)
@requires(KeyRole.viewer)
def version_detail(name: str, version: int) -> ModelVersion:
    return models_store.version(db_session(), tenant_id(), name, version)


@blp.route("/<string:name>/versions/<id:version>/files/<string:which>", methods=["GET"])
@blp.doc(responses={200: {"description": "model.safetensors (which=weights) or config.json (which=config)"}})
@requires(KeyRole.viewer)
def version_file(name: str, version: int, which: str) -> ResponseReturnValue:
    """Download the weights (safetensors) or the config (JSON) of a version."""
    bundle = models_store.bundle_file(db_session(), settings(), tenant_id(), name, version, which)
    return send_artifact(bundle.path, settings(), as_attachment=True, download_name=bundle.download_name)


@blp.route(
    "/<string:name>/aliases/<string:alias>",
    methods=["PUT"],
    parameters=[{"in": "path", "name": "alias", "schema": {"type": "string", "pattern": ALIAS_PATTERN}}],
)
@blp.arguments(AliasSchema)
@blp.response(200, ModelDetailSchema)
@requires(KeyRole.admin)
def set_alias(body: dict[str, Any], name: str, alias: str) -> dict[str, Any]:
    """Point `alias` at a version; `name@alias` then resolves to it."""
    return models_store.set_alias(db_session(), tenant_id(), name, alias, body["version"])


@blp.route("/<string:name>/predict", methods=["POST"])
@blp.arguments(PredictRequest())  # an instance: webargs would build one per request from the class
@blp.response(200, PredictResponse)
@blp.alt_response(
    202,
    schema=JobSchema,
    description="Not done within `timeout`: the predict job (its Location header is /api/v1/jobs/{id}); "
    "GET /api/v1/jobs/{id}/result has the predictions once it has succeeded",
)
@requires(KeyRole.member)
def predict(body: dict[str, Any], name: str) -> ResponseReturnValue:
    """Predict with a registered model. Answers 200 with predictions when the inference
    worker finishes within `timeout` seconds, else 202 with the job to follow (body: the
    job, header `Location: /api/v1/jobs/{id}`); its result then holds the predictions.

    A call of at most MEDMAAS_INFERENCE_MAX_INPUTS inputs (MEDMAAS_INFERENCE_MAX_EXPLAINED_INPUTS
    with `explain`) is handed to an inference worker directly and batched with concurrent
    calls to the same model version: no job, and the answer has no `job_id`. Larger calls,
    `timeout` 0, and calls no inference worker takes (or answers) in time run as a predict
    job as before: the 200 answer then carries its `job_id`, or the answer is the 202.

    Unknown models: the model named in this path (`name`, with `version` or `alias`) that
    does not exist is a 404; a model referenced inside a submitted job spec (POST /jobs,
    e.g. `score`'s `model`) is a 422 naming the field. Both messages name the model and say
    how to list models (GET /api/v1/models).

    Text inputs longer than 4 x the model's `max_len` (tokens) characters are refused with
    422 naming the input index; an input the worker tokenises to more than `max_len` tokens
    gets its own `error` item instead of being truncated.

    Each prediction carries, where the model has them, `uncertainty` (method, samples, std
    per output; entropy for classification), `interval` (calibrated regression: coverage and
    [lo, hi] per target), `prediction_set` (classification, with `prediction_sets`) and
    `domain` (nearest-neighbour similarity to the training set, in_domain, threshold).
    With `explain`, each item that could be predicted also has `explanation`: method
    (integrated_gradients or grad_cam), steps, the explained `output`, `atom_weights` (atom
    index -> signed weight, max |w| = 1) and the molecule drawn as inline `svg` (or
    `png_base64`), or for images `heatmap_shape` and the heat map over the image as
    `png_base64`; a multi-output model adds `outputs` with the same per output. An input
    that cannot be read keeps its `error` and the rest of the batch is explained. 422 naming
    `explain` for a model that cannot be explained (token sequences, language models)."""
    mv = models_store.serving_version(db_session(), tenant_id(), name, body.get("version"), body.get("alias"))
    auditing.note(object_id=f"{mv.name}@{mv.version}")  # the inputs are recorded hashed (app.api.auditing)
    spec = {"model": f"{mv.name}@{mv.version}", "inputs": body["inputs"], **predict_options(body)}
    timeout = body.get("timeout", settings().predict_default_timeout_s)
    started = time.monotonic()
    # Behind the ASGI front (app/asgi.py) the online call is handed over and awaited there
    # without a thread; a call it gave up on comes back here to run as a job.
    given_up_after = request.environ.get(inference.GIVEN_UP)
    handoff = request.environ.get(inference.HANDOFF)
    try:
        # The online path first (app/inference.py): answered by an inference worker, no job.
        reply = None
        if given_up_after is None:
            reply = inference.predict_online(
                db_session(), settings(), inference.client_of(current_app), tenant_id(), mv, spec, timeout, handoff
            )
        else:
            started -= given_up_after
        if reply is inference.HANDED_OFF:
            return {}  # the front answers with the worker's reply
        if reply is None:  # too big, no worker, or not answered in time: a predict job, as before
            job, _ = jobs_store.submit(db_session(), celery(), database(), settings(), tenant_id(), "predict", spec)
    except SpecError as exc:  # the spec is built here: its problems are this request body's
        details = exc.details
        if isinstance(details, dict) and isinstance(details.get("spec"), dict):
            details = {**{k: v for k, v in details.items() if k != "spec"}, "json": details["spec"]}
        raise ApiError(422, exc.message, exc.code, details) from exc
    if reply is not None:
        if reply.error is not None:
            raise ApiError(422, f"Prediction failed: {reply.error}", "prediction_failed")
        return reply.result
    timeout = max(0.0, timeout - (time.monotonic() - started))
    state, result, error = jobs_store.wait_finished(database(), current_app.extensions["medmaas.hub"], job.id, timeout)
    if state == JobState.succeeded:
        return {**result, "job_id": job.id}
    if state == JobState.failed:
        raise ApiError(
            422, f"Prediction failed: {(error or '').splitlines()[0]}", "prediction_failed", {"job_id": job.id}
        )
    # Still queued or running (or cancelled meanwhile): the job, as JobSchema. Returned as a
    # Response so that the 200 schema (PredictResponse) does not filter it down to `{}`.
    db_session().refresh(job)
    response = jsonify(JobSchema().dump(job))
    response.status_code = 202
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    return response


PREDICT_OPTIONS = tuple(PredictOptions().fields)  # built once: a schema instance costs ~1 ms


def predict_options(body: dict[str, Any]) -> dict[str, Any]:
    """The PredictOptions fields of a predict body, for the predict job's spec."""
    return {name: body[name] for name in PREDICT_OPTIONS if name in body}


@blp.route("/<string:name>", methods=["DELETE"])
@blp.response(204)
@blp.alt_response(409, description="A queued or running job uses one of its versions; `details.job_ids` names them")
@requires(KeyRole.member)
def delete_model(name: str) -> None:
    """Delete a whole model (erasure).

    Every version (rows and weight files) and every alias go. 409 while a queued or running
    job predicts or scores with one of its versions, or trains a new one."""
    models_store.delete_model(db_session(), settings(), tenant_id(), name)


@blp.route("/<string:name>/versions/<id:version>", methods=["DELETE"])
@blp.response(204)
@blp.alt_response(409, description="A queued or running job uses the version; `details.job_ids` names them")
@requires(KeyRole.member)
def delete_model_version(name: str, version: int) -> None:
    """Delete one model version (erasure).

    Its row, its files and the aliases pointing at it go; predictions with it answer 404
    from then on. 409 while a queued or running predict or score job uses it."""
    models_store.delete_version(db_session(), settings(), tenant_id(), name, version)
