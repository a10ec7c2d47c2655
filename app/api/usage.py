"""/api/v1/usage: what the tenant used (CPU and GPU seconds, predictions, rows scored, bytes
stored) per day, per model version or per metric, as JSON or CSV (app.stores.usage)."""

from __future__ import annotations

from datetime import date
from typing import Any

from flask import Response
from flask.typing import ResponseReturnValue
from flask_smorest import Blueprint
from marshmallow import Schema, fields, validate

from app.api import db_session, requires, settings, tenant_id
from app.models import KeyRole, UsageMetric
from app.stores import usage as usage_store

blp = Blueprint("usage", __name__, url_prefix="/api/v1/usage", description="Metered usage of the tenant")

METRICS = [m.value for m in UsageMetric]


class UsageArgs(Schema):
    start = fields.Date(
        data_key="from", metadata={"description": "first UTC day (YYYY-MM-DD); default: 29 days before `to`"}
    )
    end = fields.Date(data_key="to", metadata={"description": "last UTC day, inclusive; default: today"})
    group_by = fields.String(
        load_default="day",
        validate=validate.OneOf(usage_store.GROUP_BY),
        metadata={
            "description": "day: each day's total per metric; model: per model version and metric; metric: per metric"
        },
    )
    format = fields.String(
        load_default="json",
        validate=validate.OneOf(["json", "csv"]),
        metadata={"description": "csv: text/csv with a header row (columns follow group_by)"},
    )


class UsageRowSchema(Schema):
    day = fields.Date(metadata={"description": "present when group_by=day"})
    model = fields.String(
        allow_none=True, metadata={"description": "present when group_by=model; null: usage of no model"}
    )
    version = fields.Integer(allow_none=True, metadata={"description": "present when group_by=model"})
    metric = fields.String(required=True, validate=validate.OneOf(METRICS))
    quantity = fields.Float(required=True, metadata={"description": "seconds, or a count, or bytes"})


TotalsSchema = Schema.from_dict({m: fields.Float(required=True) for m in METRICS}, name="UsageTotalsSchema")


class UsageReportSchema(Schema):
    start = fields.Date(data_key="from", required=True)
    end = fields.Date(data_key="to", required=True)
    group_by = fields.String(required=True, validate=validate.OneOf(usage_store.GROUP_BY))
    rows = fields.List(fields.Nested(UsageRowSchema), required=True)
    totals = fields.Nested(TotalsSchema, required=True)


def usage_report(start: date | None, end: date | None, group_by: str) -> usage_store.Report:
    """The request tenant's report; a range that includes today measures its bytes stored first."""
    start, end = usage_store.date_range(start, end)
    session = db_session()
    if end >= usage_store.today() >= start:
        usage_store.snapshot_storage(session, settings(), tenant_id())
        session.commit()
    return usage_store.report(session, tenant_id(), start, end, group_by)


def csv_response(rep: usage_store.Report) -> Response:
    name = f"usage-{rep.start}-{rep.end}-by-{rep.group_by}.csv"
    return Response(
        usage_store.to_csv(rep),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@blp.route("", methods=["GET"])
@blp.arguments(UsageArgs, location="query")
@blp.response(200, UsageReportSchema)
@blp.doc(
    responses={
        "200": {
            "description": "the report (JSON), or with format=csv its rows as text/csv",
            "content": {
                "application/json": {"schema": UsageReportSchema},
                "text/csv": {
                    "schema": {"type": "string"},
                    "example": "day,metric,quantity\n2026-12-01,cpu_seconds,12.5\n",
                },
            },
        }
    }
)
@requires(KeyRole.viewer)
def usage(args: dict[str, Any]) -> ResponseReturnValue:
    """The tenant's metered usage between two UTC days (inclusive), as JSON or CSV.

    cpu_seconds: process CPU time of the tenant's jobs and scoring shards (with their RDKit
    child processes); gpu_seconds: wall time of jobs that ran on a CUDA device; predict_calls
    and predict_inputs: online predictions per model version; rows_scored: library rows scored
    per model version; bytes_stored: datasets, model bundles (per version) and job results
    (a gauge, measured daily and when a range includes today: over a range it is the last
    measurement in it). Quantities count on the UTC day a job ends or a shard finishes."""
    rep = usage_report(args.get("start"), args.get("end"), args["group_by"])
    if args["format"] == "csv":
        return csv_response(rep)
    return {"start": rep.start, "end": rep.end, "group_by": rep.group_by, "rows": rep.rows, "totals": rep.totals}
