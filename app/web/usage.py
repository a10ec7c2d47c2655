"""The usage page: what the signed-in tenant used per day and per model version over a date
range (app.stores.usage, as GET /api/v1/usage), with CSV downloads of both tables."""

from __future__ import annotations

from datetime import date
from typing import Any

from flask import render_template, request
from flask.typing import ResponseReturnValue

from app.api import db_session, tenant_id
from app.api.usage import csv_response, usage_report
from app.models import UsageMetric
from app.stores import Invalid
from app.stores import usage as usage_store
from app.web.blueprint import bp
from app.web.session_auth import error_page

METRICS = [m.value for m in UsageMetric]


def _dates() -> tuple[date | None, date | None, str | None]:
    """?from= and ?to= (YYYY-MM-DD, empty: the default range); an error message if unreadable."""
    out: list[date | None] = []
    for name in ("from", "to"):
        raw = (request.args.get(name) or "").strip()
        try:
            out.append(date.fromisoformat(raw) if raw else None)
        except ValueError:
            return None, None, f"'{name}' must be a date (YYYY-MM-DD), not {raw[:40]!r}"
    return out[0], out[1], None


def _pivot(rows: list[dict[str, Any]], key: Any) -> list[tuple[Any, dict[str, Any]]]:
    """Rows of (group, metric, quantity) as one row per group with a column per metric."""
    table: dict[Any, dict[str, Any]] = {}
    for row in rows:
        table.setdefault(key(row), {})[row["metric"]] = row["quantity"]
    return list(table.items())


@bp.route("/usage")
def usage() -> ResponseReturnValue:
    start, end, error = _dates()
    context: dict[str, Any] = {"metrics": METRICS, "start": start, "end": end, "error": error}
    if error is None:
        try:
            by_day = usage_report(start, end, "day")  # measures today's bytes stored when in range
            by_model = usage_store.report(db_session(), tenant_id(), by_day.start, by_day.end, "model")
        except Invalid as exc:
            context["error"] = exc.message
        else:
            context.update(
                start=by_day.start,
                end=by_day.end,
                days=_pivot(by_day.rows, lambda r: r["day"]),
                models=_pivot(by_model.rows, lambda r: (r["model"], r["version"])),
                totals=by_day.totals,
            )
    return render_template("usage.html", **context), 400 if context["error"] else 200


@bp.route("/usage.csv")
def usage_csv() -> ResponseReturnValue:
    start, end, error = _dates()
    group_by = request.args.get("group_by", "day")
    if error is None and group_by not in usage_store.GROUP_BY:
        error = f"group_by must be one of {', '.join(usage_store.GROUP_BY)}"
    if error is None:
        try:
            return csv_response(usage_report(start, end, group_by))
        except Invalid as exc:
            error = exc.message
    return error_page(400, error)
