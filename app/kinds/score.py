"""`score`: batch-score a drug library with a registered SMILES model (spec, check, route,
and the score file download). The run is workers/scoring/runner.py: the library is cut
into shards that any worker on the job's queue scores; the parent merges them in input
order into one CSV or Parquet file with one row per library row.

Besides one column per model output, the table has the trust columns the model supports
(workers/ml/predict.py Predictor.score_columns): `{output}_std` (ensembles), `{target}_lo` /
`{target}_hi` (calibrated regression, at the spec's `coverage`), `nn_similarity` and
`in_domain` (a domain reference). With `explain_top_k`, the best rows are drawn with their
atom attributions as SVG files in the job's directory (`explain/{rank}.svg`), listed in the
result's `explanations` and served by GET /api/v1/jobs/{id}/files/explain/{rank}.svg."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flask import Response, jsonify
from marshmallow import Schema, fields, validate
from sqlalchemy import select

from app import artifacts
from app.artifacts import job_dir, open_stream, send_artifact
from app.config import Settings
from app.errors import ApiError
from app.fields import StrictBoolean, StrictFloat, StrictInteger
from app.ingest.library import SchemaError, library_schema
from app.kinds import KindSpec, Spec, SpecError, SubmitContext, allowed_queue, queue_or_default, register
from app.kinds.ingest import require_ready
from app.kinds.predict import MAX_EXPLAINED_INPUTS, refuse_language_model, unknown_model
from app.models import MAX_ID, Dataset, Job
from app.registry import ModelNotFound, resolve_ref
from app.workers_registry import gpu_worker_check

FORMATS = ("csv", "parquet")
MEDIA_TYPES = {"csv": "text/csv", "parquet": "application/vnd.apache.parquet"}


EXPLAIN_DIR = "explain"  # the top-K drawings, inside the job's directory


def score_files(directory: Path) -> dict[str, Path]:
    """Where a score job's merged outputs live inside its job directory."""
    return {"parquet": directory / "scores.parquet", "csv": directory / "scores.csv"}


def explanation_file(directory: Path, rank: int) -> Path:
    """The drawing of the top-K row of this rank (from 1) inside a job's directory."""
    return directory / EXPLAIN_DIR / f"{rank}.svg"


def explanation_url(job_id: int, rank: int) -> str:
    return f"/api/v1/jobs/{job_id}/files/{EXPLAIN_DIR}/{rank}.svg"


class ScoreSpec(Schema):
    model = fields.String(
        required=True,
        validate=validate.Length(min=1, max=200),
        metadata={"description": "name (latest version), name@version or name@alias"},
    )
    library_id = StrictInteger(
        required=True,
        validate=validate.Range(min=1, max=MAX_ID),
        metadata={"description": "a dataset of kind library"},
    )
    top_k = StrictInteger(
        load_default=100,
        validate=validate.Range(min=0, max=10_000),
        metadata={"description": "rows with the highest scores kept in the job result"},
    )
    explain_top_k = StrictInteger(
        load_default=0,
        validate=validate.Range(min=0, max=MAX_EXPLAINED_INPUTS),
        metadata={
            "description": "draw this many of the top-K rows with their atom attributions (SVG files "
            "listed in the result's `explanations`); at most top_k"
        },
    )
    coverage = StrictFloat(
        load_default=0.9,
        validate=validate.Range(min=0.5, max=0.99),
        metadata={"description": "coverage of the {target}_lo / {target}_hi columns of a calibrated model"},
    )
    output = fields.String(load_default="csv", validate=validate.OneOf(FORMATS))
    text_column = fields.String(
        load_default=None,
        allow_none=True,
        metadata={"description": "CSV/TSV column holding the SMILES (default: the one found at upload)"},
    )
    id_column = fields.String(
        load_default=None, allow_none=True, metadata={"description": "CSV/TSV column holding the molecule id"}
    )
    validate_ = fields.String(
        data_key="validate",
        attribute="validate",
        load_default="rdkit",
        validate=validate.OneOf(["rdkit", "none"]),
        metadata={
            "description": "rdkit: parse and canonicalise each SMILES (invalid rows "
            "get RDKit's reason); none: score the text as is"
        },
    )
    dedupe = StrictBoolean(
        load_default=False,
        metadata={"description": "score identical canonical SMILES once per shard (every row is still reported)"},
    )
    max_length = StrictInteger(
        load_default=2000,
        validate=validate.Range(min=1, max=1_000_000),
        metadata={"description": "longer SMILES are reported as errors, not parsed"},
    )
    rank_by = fields.String(
        load_default=None,
        allow_none=True,
        metadata={"description": "output column for top-K (default: the model's first output)"},
    )
    device = fields.String(load_default="auto", validate=validate.Regexp(r"^(auto|cpu|cuda(:\d+)?)$"))
    queue = fields.String(load_default=None, allow_none=True)


def check(spec: Spec, ctx: SubmitContext) -> Spec:
    session, tenant_id = ctx.session, ctx.tenant_id
    """The model must resolve for this tenant and take SMILES; the library must be the
    tenant's own dataset of kind library, with the named columns."""
    try:
        mv = resolve_ref(session, tenant_id, spec["model"])
    except ModelNotFound as exc:
        raise unknown_model(exc, spec["model"]) from exc
    if mv.input_kind != "smiles":
        raise SpecError(
            f"model {mv.name} v{mv.version} takes {mv.input_kind} input; scoring needs a SMILES model",
            "invalid_model",
            {"spec": {"model": spec["model"]}},
        )
    refuse_language_model(mv)
    explain_top_k = spec.get("explain_top_k", 0)
    top_k = spec.get("top_k", 100)
    if explain_top_k > top_k:
        message = f"explain_top_k ({explain_top_k}) draws rows of the top-K: it may not exceed top_k ({top_k})"
        raise SpecError(message, "invalid_spec", {"spec": {"explain_top_k": [message]}})
    ds = session.scalar(select(Dataset).where(Dataset.id == spec["library_id"], Dataset.tenant_id == tenant_id))
    if ds is None:
        raise SpecError(
            f"Dataset {spec['library_id']} not found", "unknown_dataset", {"spec": {"library_id": spec["library_id"]}}
        )
    require_ready(ds, "library_id")
    if ds.kind != "library":
        raise SpecError(
            f"dataset {ds.id} is a {ds.kind} dataset; scoring reads a dataset of kind library",
            "invalid_dataset",
            {"spec": {"library_id": spec["library_id"]}},
        )
    try:
        library_schema(ds.schema, spec.get("text_column"), spec.get("id_column"))
    except SchemaError as exc:
        raise SpecError(str(exc), "invalid_spec", {"spec": {"text_column": ds.schema.get("header")}}) from exc
    note = gpu_worker_check(spec, ctx)  # 422 naming `device` when no GPU worker is connected
    return {
        **spec,
        **({"notes": [note]} if note else {}),
        "model_version_id": mv.id,
        "model_name": mv.name,
        "version": mv.version,
        "library_rows": ds.rows,
        "library_sha256": ds.sha256,
    }


def route(spec: Spec, settings: Settings) -> str:
    default = settings.gpu_queue if str(spec.get("device", "auto")).startswith("cuda") else settings.default_queue
    return allowed_queue("score", queue_or_default(spec, default), settings)


def queues(settings: Settings) -> tuple[str, ...]:
    return (settings.default_queue, settings.gpu_queue)


CSV_FORMULA_PREFIX = r"^[=+\-@\t\r]"  # what a spreadsheet reads as a formula (OWASP CSV injection)


def csv_safe(data: Any) -> Any:
    """A pyarrow RecordBatch or Table for CSV output: each text cell a spreadsheet would run
    as a formula (starting with =, +, -, @, tab or carriage return) gets a leading single
    quote. Numeric and boolean columns, and the Parquet files, keep their raw values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for column in data.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            risky = pc.fill_null(pc.match_substring_regex(column, CSV_FORMULA_PREFIX), False)
            column = pc.if_else(risky, pc.binary_join_element_wise("'", column, ""), column)
        columns.append(column)
    return type(data).from_arrays(columns, schema=data.schema)


def csv_from_parquet(path: Path, chunk_rows: int = 65_536) -> Iterator[bytes]:
    """The Parquet score table as CSV bytes, one record batch at a time (for downloads);
    text cells that would run as spreadsheet formulas are escaped (csv_safe)."""
    import pyarrow.parquet as pq

    with open_stream(path) as fh:  # from an object store: read from it, not fetched whole first
        yield from _csv_batches(pq.ParquetFile(fh), chunk_rows)


def _csv_batches(pf: Any, chunk_rows: int) -> Iterator[bytes]:
    import pyarrow.csv as pacsv

    first = True
    for batch in pf.iter_batches(batch_size=chunk_rows):
        buf = io.BytesIO()
        pacsv.write_csv(csv_safe(batch), buf, pacsv.WriteOptions(include_header=first))
        first = False
        yield buf.getvalue()
    if first:  # an empty table still gets its header
        buf = io.BytesIO()
        pacsv.write_csv(pf.schema_arrow.empty_table(), buf)
        yield buf.getvalue()


def render_result(job: Job, args: Mapping[str, str], settings: Settings) -> Any:
    """The score table as a file download: ?format=csv|parquet (default: the spec's output)."""
    fmt = (args.get("format") or (job.spec or {}).get("output") or "csv").lower()
    if fmt == "json":
        return jsonify(job.result or {})
    if fmt not in FORMATS:
        raise ApiError(400, f"format must be one of {', '.join(FORMATS)} or json", "bad_request")
    paths = score_files(job_dir(settings, job.tenant_id, job.id))
    name = f"job-{job.id}-scores.{fmt}"
    if artifacts.exists(paths[fmt]):
        return send_artifact(
            paths[fmt],
            settings,
            mimetype=MEDIA_TYPES[fmt],
            as_attachment=True,
            download_name=name,
            max_age=0,
            conditional=True,
        )
    if fmt == "csv" and artifacts.exists(paths["parquet"]):  # output=parquet, CSV asked for: convert while streaming
        return Response(
            csv_from_parquet(paths["parquet"]),
            mimetype=MEDIA_TYPES["csv"],
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    raise ApiError(410, f"the score file of job {job.id} is no longer available", "gone")


register(
    KindSpec(
        "score",
        ScoreSpec,
        route,
        "score a drug library with a SMILES model (sharded, resumable)",
        check=check,
        render_result=render_result,
        queues=queues,
    )
)
