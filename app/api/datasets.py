"""/api/v1/datasets: streamed, validated uploads of images, sequences and libraries."""

from __future__ import annotations

from typing import Any

from flask_smorest import Blueprint
from marshmallow import INCLUDE, Schema, fields, validate

from app import dispatch
from app.api import MAX_ID, celery, database, db_session, requires, settings, tenant_id
from app.ingest import KINDS
from app.models import Dataset, DatasetStatus, KeyRole
from app.stores import datasets as datasets_store

blp = Blueprint("datasets", __name__, url_prefix="/api/v1/datasets", description="Upload and inspect datasets")


class DatasetUploadForm(Schema):
    class Meta:
        unknown = INCLUDE  # each extra form field is an ingest option (text_column=..., ...)

    kind = fields.String(required=True, validate=validate.OneOf(KINDS))
    name = fields.String(validate=validate.Length(min=1, max=255))
    options = fields.String(
        metadata={"description": "JSON object of options; or pass each option as its own form field"}
    )


class DatasetUploadFile(Schema):
    file = fields.Raw(metadata={"type": "string", "format": "binary"}, required=True)


class DatasetSchema(Schema):
    id = fields.Integer()
    name = fields.String()
    kind = fields.String()
    filename = fields.String()
    bytes = fields.Integer()
    sha256 = fields.String()
    rows = fields.Integer()
    invalid_rows = fields.Integer()
    invalid_samples = fields.List(fields.Dict())
    schema = fields.Dict()
    stats = fields.Dict()
    options = fields.Dict()
    created_at = fields.DateTime()
    status = fields.String(
        metadata={
            "enum": [s.value for s in DatasetStatus],
            "description": "ready; processing while an ingest job (job_id) parses a large upload (rows, schema and "
            "stats are filled in then); failed, with error in one sentence",
        }
    )
    error = fields.String(allow_none=True, metadata={"description": "why parsing failed (status failed)"})
    job_id = fields.Integer(allow_none=True, metadata={"description": "the ingest job that parses the upload"})
    warnings = fields.Method(
        "_warnings",
        dump_only=True,
        metadata={"type": "array", "items": {"type": "string"}, "description": "what to check (stats.warnings)"},
    )
    inferred = fields.Method(
        "_inferred",
        dump_only=True,
        metadata={
            "type": "object",
            "description": "what was read from the file rather than given as options (stats.inferred): "
            "text column, delimiter, label columns and types, tokenizer; `summary` is one line to print",
        },
    )

    def _warnings(self, ds: Dataset) -> list[str]:
        return list((ds.stats or {}).get("warnings") or [])

    def _inferred(self, ds: Dataset) -> dict[str, Any]:
        return dict((ds.stats or {}).get("inferred") or {})


class DatasetListArgs(Schema):
    kind = fields.String(validate=validate.OneOf(KINDS))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    cursor = fields.Integer(validate=validate.Range(min=0, max=MAX_ID))


class DatasetListSchema(Schema):
    items = fields.List(fields.Nested(DatasetSchema))
    next_cursor = fields.Integer(allow_none=True)


@blp.route("", methods=["POST"])
# one multipart/form-data body in the document (app.api.openapi folds the form fields into it)
@blp.arguments(DatasetUploadForm, location="form")
@blp.arguments(DatasetUploadFile, location="files")
@blp.response(201, DatasetSchema)
@blp.alt_response(
    202,
    schema=DatasetSchema,
    description="A large text upload: stored and its start checked, status `processing`; an ingest job "
    "(`job_id`) parses it. Poll the Location header (/api/v1/datasets/{id}) until status is ready or failed",
    headers={"Location": {"description": "the dataset: /api/v1/datasets/{id}", "schema": {"type": "string"}}},
    success=True,
)
@requires(KeyRole.member)
def upload(form: dict[str, Any], files: dict[str, Any]) -> tuple[Dataset, int, dict[str, str]] | Dataset:
    """Upload a dataset (multipart). Validated before it is stored: a bad file gets a 4xx
    and leaves nothing behind; invalid rows inside a good file are counted and sampled.

    Images, and sequences or libraries up to MEDMAAS_INGEST_INLINE_MAX_BYTES (4 MiB; gzip:
    expanding to no more), are parsed in the request: 201 with the validation report. A
    larger text upload gets the checks its first rows allow (a bad header or option is
    still a 4xx) and 202 with the dataset `processing`; a worker parses the rest."""
    upload_file = files["file"]
    options = datasets_store.upload_options(form)
    ds = datasets_store.create_from_upload(
        db_session(),
        settings(),
        tenant_id(),
        kind=form["kind"],
        name=form.get("name"),
        stream=upload_file.stream,
        filename=upload_file.filename,
        options=options,
        publish=lambda items: dispatch.publish_jobs(celery(), database(), items, stamp=False),
    )
    if ds.status == DatasetStatus.processing:
        return ds, 202, {"Location": f"/api/v1/datasets/{ds.id}"}
    return ds


@blp.route("", methods=["GET"])
@blp.arguments(DatasetListArgs, location="query")
@blp.response(200, DatasetListSchema)
@requires(KeyRole.viewer)
def list_datasets(args: dict[str, Any]) -> dict[str, Any]:
    return datasets_store.list_page(
        db_session(), tenant_id(), kind=args.get("kind"), limit=args["limit"], cursor=args.get("cursor")
    )


@blp.route("/<id:dataset_id>", methods=["GET"])
@blp.response(200, DatasetSchema)
@requires(KeyRole.viewer)
def detail(dataset_id: int) -> Dataset:
    return datasets_store.get(db_session(), tenant_id(), dataset_id)


@blp.route("/<id:dataset_id>", methods=["DELETE"])
@blp.response(204)
@blp.alt_response(409, description="A queued or running job uses the dataset; `details.job_ids` names them")
@requires(KeyRole.member)
def delete_dataset(dataset_id: int) -> None:
    """Delete a dataset (erasure).

    Its row and its files (upload and normalised data) go. Model versions trained on it keep
    working (their `dataset_id` becomes null). 409 while a queued or running job's spec
    names it."""
    datasets_store.delete(db_session(), settings(), tenant_id(), dataset_id)
