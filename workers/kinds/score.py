"""`score`: batch-score a drug library with a registered SMILES model.

The library is cut into shards of `score_shard_rows` rows; every shard is a Celery message
that any worker on the job's queue may take, and the parent job works through pending
shards itself, so one worker completes the job and more workers share it. Finished shards
are recorded in SQL (score_shards), so a lost worker costs only its unfinished shard. The
parent then merges the shards in input order into one CSV or Parquet file with one row
per library row (invalid molecules included, with RDKit's reason), and stores counts and
the top-K rows in the job result. GET /jobs/{id}/result serves the file.
"""
from __future__ import annotations

from typing import Any, Mapping

from marshmallow import Schema, fields, validate
from sqlalchemy import select

from app.config import Settings
from workers.kinds import JobKind, SpecError, register

FORMATS = ("csv", "parquet")
MEDIA_TYPES = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}


class ScoreSpec(Schema):
    model = fields.String(required=True, validate=validate.Length(min=1, max=200),
                          metadata={"description": "name (latest version), name@version or name@alias"})
    library_id = fields.Integer(required=True, strict=True, metadata={"description": "a dataset of kind library"})
    top_k = fields.Integer(load_default=100, validate=validate.Range(min=0, max=10_000),
                           metadata={"description": "rows with the highest scores kept in the job result"})
    output = fields.String(load_default="csv", validate=validate.OneOf(FORMATS))
    text_column = fields.String(load_default=None, allow_none=True,
                                metadata={"description": "CSV/TSV column holding the SMILES "
                                                         "(default: the one found at upload)"})
    id_column = fields.String(load_default=None, allow_none=True,
                              metadata={"description": "CSV/TSV column holding the molecule id"})
    validate_ = fields.String(data_key="validate", attribute="validate", load_default="rdkit",
                              validate=validate.OneOf(["rdkit", "none"]),
                              metadata={"description": "rdkit: parse and canonicalise each SMILES (invalid rows "
                                                       "get RDKit's reason); none: score the text as is"})
    dedupe = fields.Boolean(load_default=False, metadata={
        "description": "score identical canonical SMILES once per shard (every row is still reported)"})
    max_length = fields.Integer(load_default=2000, validate=validate.Range(min=1, max=1_000_000),
                                metadata={"description": "longer SMILES are reported as errors, not parsed"})
    rank_by = fields.String(load_default=None, allow_none=True,
                            metadata={"description": "output column for top-K (default: the model's first output)"})
    device = fields.String(load_default="auto", validate=validate.Regexp(r"^(auto|cpu|cuda(:\d+)?)$"))
    queue = fields.String(load_default=None, allow_none=True)


def check(spec: dict[str, Any], session, tenant_id: int) -> dict[str, Any]:  # noqa: ANN001
    """The model must resolve for this tenant and take SMILES; the library must be the
    tenant's own dataset of kind library, with the named columns."""
    from app.models import Dataset
    from app.registry import ModelNotFound, resolve_ref
    from workers.scoring.source import SchemaError, library_schema

    try:
        mv = resolve_ref(session, tenant_id, spec["model"])
    except ModelNotFound as exc:
        raise SpecError(str(exc), "unknown_model", {"spec": {"model": spec["model"]}})
    if mv.input_kind != "smiles":
        raise SpecError(f"model {mv.name} v{mv.version} takes {mv.input_kind} input; scoring needs a SMILES model",
                        "invalid_model", {"spec": {"model": spec["model"]}})
    ds = session.scalar(select(Dataset).where(Dataset.id == spec["library_id"], Dataset.tenant_id == tenant_id))
    if ds is None:
        raise SpecError(f"Dataset {spec['library_id']} not found", "unknown_dataset",
                        {"spec": {"library_id": spec["library_id"]}})
    if ds.kind != "library":
        raise SpecError(f"dataset {ds.id} is a {ds.kind} dataset; scoring reads a dataset of kind library",
                        "invalid_dataset", {"spec": {"library_id": spec["library_id"]}})
    try:
        library_schema(ds.schema, spec.get("text_column"), spec.get("id_column"))
    except SchemaError as exc:
        raise SpecError(str(exc), "invalid_spec", {"spec": {"text_column": ds.schema.get("header")}})
    return {**spec, "model_version_id": mv.id, "model_name": mv.name, "version": mv.version,
            "library_rows": ds.rows, "library_sha256": ds.sha256}


def route(spec: dict[str, Any], settings: Settings) -> str:
    if spec.get("queue"):
        return spec["queue"]
    return settings.gpu_queue if str(spec.get("device", "auto")).startswith("cuda") else settings.default_queue


def run(ctx, spec: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN001
    from workers.scoring.runner import run_parent

    return run_parent(ctx, spec)


def serve_result(job, args: Mapping[str, str]):  # noqa: ANN001, ANN201
    """The score table as a file download: ?format=csv|parquet (default: the spec's output)."""
    from flask import Response, send_file

    from app.api import settings
    from app.errors import ApiError
    from workers.scoring.runner import output_paths
    from workers.scoring.shards import job_dir

    fmt = (args.get("format") or (job.spec or {}).get("output") or "csv").lower()
    if fmt == "json":
        from flask import jsonify

        return jsonify(job.result or {})
    if fmt not in FORMATS:
        raise ApiError(400, f"format must be one of {', '.join(FORMATS)} or json", "bad_request")
    paths = output_paths(job_dir(settings(), job.tenant_id, job.id))
    name = f"job-{job.id}-scores.{fmt}"
    if paths[fmt].exists():
        return send_file(paths[fmt], mimetype=MEDIA_TYPES[fmt], as_attachment=True, download_name=name,
                         max_age=0, conditional=True)
    if fmt == "csv" and paths["parquet"].exists():  # output=parquet, CSV asked for: convert while streaming
        from workers.scoring.table import iter_csv_from_parquet

        return Response(iter_csv_from_parquet(paths["parquet"]), mimetype=MEDIA_TYPES["csv"],
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})
    raise ApiError(410, f"the score file of job {job.id} is no longer available", "gone")


register(JobKind("score", ScoreSpec, run, route, "score a drug library with a SMILES model (sharded, resumable)",
                 check=check, serve_result=serve_result))
