"""/api/v1/datasets: streamed, validated uploads of images, sequences and libraries."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from flask_smorest import Blueprint
from marshmallow import INCLUDE, Schema, fields, validate
from sqlalchemy import select

from app.api import cursor_page, db_session, settings, tenant_id
from app.artifacts import ArtifactStore, UploadTooLarge, save_stream
from app.errors import ApiError
from app.ingest import KINDS, IngestError, IngestLimits, ingest
from app.models import Dataset

blp = Blueprint("datasets", __name__, url_prefix="/api/v1/datasets", description="Upload and inspect datasets")

RESERVED_FIELDS = {"kind", "name", "file", "options"}


class DatasetUploadForm(Schema):
    class Meta:
        unknown = INCLUDE  # each extra form field is an ingest option (text_column=..., ...)

    kind = fields.String(required=True, validate=validate.OneOf(KINDS))
    name = fields.String(validate=validate.Length(min=1, max=255))
    options = fields.String(metadata={"description": "JSON object of options; or pass each option as its own form field"})


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


class DatasetListArgs(Schema):
    kind = fields.String(validate=validate.OneOf(KINDS))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    cursor = fields.Integer()


class DatasetListSchema(Schema):
    items = fields.List(fields.Nested(DatasetSchema))
    next_cursor = fields.Integer(allow_none=True)


def get_dataset_or_404(dataset_id: int) -> Dataset:
    ds = db_session().scalar(select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant_id()))
    if ds is None:
        raise ApiError(404, f"Dataset {dataset_id} not found")
    return ds


def _options_from_form(form: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if form.get("options"):
        try:
            options = json.loads(form["options"])
        except ValueError:
            raise ApiError(422, "options must be a JSON object", "validation_error")
        if not isinstance(options, dict):
            raise ApiError(422, "options must be a JSON object", "validation_error")
    options.update({k: v for k, v in form.items() if k not in RESERVED_FIELDS})
    return options


def _safe_filename(name: str) -> str:
    base = Path(name.replace("\\", "/")).name
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)[:200] or "upload"


@blp.route("", methods=["POST"])
@blp.arguments(DatasetUploadForm, location="form")
@blp.arguments(DatasetUploadFile, location="files")
@blp.response(201, DatasetSchema)
def upload(form: dict[str, Any], files: dict[str, Any]):  # noqa: ANN201
    """Upload a dataset (multipart). Validated before it is stored: a bad file gets a 4xx
    and leaves nothing behind; invalid rows inside a good file are counted and sampled."""
    upload_file = files["file"]
    filename = _safe_filename(upload_file.filename or "upload")
    options = _options_from_form(form)
    cfg = settings()
    store = ArtifactStore(cfg.artifacts)
    work = store.new_dir(tenant_id(), "datasets")
    try:
        original = work / f"upload-{filename}"
        try:
            size, sha256 = save_stream(upload_file.stream, original, cfg.max_upload_bytes)
        except UploadTooLarge as exc:
            raise ApiError(413, str(exc), "payload_too_large")
        if size == 0:
            raise ApiError(422, "The uploaded file is empty", "empty_file")
        limits = IngestLimits(max_members=cfg.archive_max_members, max_bytes=cfg.archive_max_bytes)
        try:
            report = ingest(form["kind"], str(original), filename, str(work), options, limits)
        except IngestError as exc:
            raise ApiError(exc.http_status, exc.message, exc.code, exc.details)
        ds = Dataset(
            tenant_id=tenant_id(), name=form.get("name") or filename, kind=form["kind"], filename=filename,
            bytes=size, sha256=sha256, rows=report.rows, invalid_rows=report.invalid_rows,
            invalid_samples=report.invalid_samples, schema=report.schema,
            stats={**report.stats, "warnings": report.warnings}, options=options,
            uri=store.url(original), data_uri=store.url(Path(report.data_path)) if report.data_path else store.url(original),
        )
        session = db_session()
        session.add(ds)
        session.commit()
    except BaseException:
        ArtifactStore.remove(work)  # nothing stored for a rejected upload
        raise
    return ds


@blp.route("", methods=["GET"])
@blp.arguments(DatasetListArgs, location="query")
@blp.response(200, DatasetListSchema)
def list_datasets(args: dict[str, Any]):  # noqa: ANN201
    q = select(Dataset).where(Dataset.tenant_id == tenant_id())
    if "kind" in args:
        q = q.where(Dataset.kind == args["kind"])
    return cursor_page(q, Dataset.id, args)


@blp.route("/<int:dataset_id>", methods=["GET"])
@blp.response(200, DatasetSchema)
def detail(dataset_id: int):  # noqa: ANN201
    return get_dataset_or_404(dataset_id)
