"""Jinja filters for the pages (the scripts format the same way in static/js/common.js)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from flask import Flask

from medmaas.formatting import human_duration


def _parse(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def age(value: Any) -> str:
    dt = _parse(value)
    if dt is None:
        return "—"
    return human_duration((datetime.now(UTC) - dt).total_seconds()) + " ago"


def iso(value: Any) -> str:
    dt = _parse(value)
    return dt.isoformat() if dt else ""


def clock(value: Any) -> str:
    dt = _parse(value)
    return dt.strftime("%Y-%m-%d %H:%M:%S UTC") if dt else "—"


def job_duration(job: dict[str, Any]) -> str:
    if job.get("duration_s") is not None:
        return human_duration(job["duration_s"])
    started = _parse(job.get("started_at"))
    if started is None:
        return "—"
    end = _parse(job.get("finished_at")) or datetime.now(UTC)
    return human_duration((end - started).total_seconds())


def human_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


def percent(value: float | None) -> str:
    return f"{100 * float(value or 0):.0f}%"


def metric_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def error_text(value: Any) -> str:
    """Marshmallow-style messages (str, list, nested dict) as one readable line."""
    if isinstance(value, dict):
        return "; ".join(f"{k}: {error_text(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return " ".join(error_text(v) for v in value)
    return str(value)


def flat_metrics(metrics: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """{"val": {"rmse": 0.5}, "best_epoch": 3} -> [("val_rmse", 0.5), ("best_epoch", 3)]; scalars only."""
    out: list[tuple[str, Any]] = []
    if isinstance(metrics, dict):
        for k, v in metrics.items():
            out.extend(flat_metrics(v, f"{prefix}{k}_" if isinstance(v, dict) else f"{prefix}{k}"))
    elif isinstance(metrics, (int, float, str)) and not isinstance(metrics, bool):
        out.append((prefix.rstrip("_"), metrics))
    return out


def register(app: Flask) -> None:
    app.jinja_env.filters.update(
        duration=human_duration,
        age=age,
        iso=iso,
        clock=clock,
        job_duration=job_duration,
        bytes=human_bytes,
        pretty_json=pretty_json,
        percent=percent,
        metric=metric_value,
        errtext=error_text,
        flat_metrics=flat_metrics,
    )
