"""/healthz, /readyz (no API key: for load balancers) and /metrics (Prometheus).

/metrics answers a request that presents `Authorization: Bearer <MEDMAAS_METRICS_TOKEN>`
(compared in constant time), and, unless MEDMAAS_METRICS_LOOPBACK is off, a request from
a loopback address that no proxy forwarded (a reverse proxy on the same host makes every
request look local, so forwarding headers disqualify it). Anything else gets 401/403. Only
the token's holder sees per-tenant series (tenant names as labels)."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import TYPE_CHECKING

import redis
from flask import Blueprint, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import case, func, select, text

from app.broker import queue_names
from app.config import is_loopback
from app.errors import error_response
from app.inference import LatencyCollector
from app.jobs import count_by_state
from app.models import Job, JobState, Tenant

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from app.config import Settings
    from app.db import Database

bp = Blueprint("health", __name__)

DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


def _settings() -> Settings:
    return current_app.extensions["medmaas.settings"]


def _db() -> Database:
    return current_app.extensions["medmaas.db"]


def _redis() -> redis.Redis:
    client = current_app.extensions.get("medmaas.redis")
    if client is None:
        client = redis.Redis.from_url(_settings().broker_url, socket_timeout=2, socket_connect_timeout=2)
        current_app.extensions["medmaas.redis"] = client
    return client


@bp.get("/healthz")
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> tuple[Response, int]:
    checks: dict[str, str] = {}
    try:
        with _db().engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        _redis().ping()
        checks["broker"] = "ok"
    except Exception as exc:
        checks["broker"] = f"error: {type(exc).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ok" if ok else "unavailable", "checks": checks}), (200 if ok else 503)


class _JobCollector:
    """Reads the database and broker at scrape time, so every web process reports the truth."""

    def __init__(self, db: Database, settings: Settings, per_tenant: bool = False) -> None:
        self.db, self.settings, self.per_tenant = db, settings, per_tenant

    def collect(self) -> Iterator[Metric]:
        with self.db.sessionmaker() as s:
            counts = count_by_state(s)
            dur = Job.duration_s
            bucket_cols = [func.sum(case((dur <= b, 1), else_=0)) for b in DURATION_BUCKETS]
            row = s.execute(
                select(func.count(dur), func.coalesce(func.sum(dur), 0.0), *bucket_cols).where(
                    Job.state == JobState.succeeded, dur.is_not(None)
                )
            ).one()
            by_tenant = (
                s.execute(
                    select(Tenant.name, Job.state, func.count())
                    .join(Tenant, Tenant.id == Job.tenant_id)
                    .group_by(Tenant.name, Job.state)
                ).all()
                if self.per_tenant
                else []
            )
        g = GaugeMetricFamily("medmaas_jobs", "Jobs by state", labels=["state"])
        for state, n in counts.items():
            g.add_metric([state], n)
        yield g
        if self.per_tenant:
            t = GaugeMetricFamily("medmaas_tenant_jobs", "Jobs by tenant and state", labels=["tenant", "state"])
            for tenant, state, n in by_tenant:
                t.add_metric([tenant, JobState(state).value], n)
            yield t
        q = GaugeMetricFamily("medmaas_queue_depth", "Messages waiting in each broker queue", labels=["queue"])
        try:
            client = redis.Redis.from_url(self.settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
            for name in queue_names(self.settings):
                q.add_metric([name], client.llen(name))
        except redis.RedisError:
            pass
        yield q
        total, total_sum = row[0] or 0, float(row[1] or 0.0)
        buckets = [(str(b), int(c or 0)) for b, c in zip(DURATION_BUCKETS, row[2:], strict=False)] + [("+Inf", total)]
        yield HistogramMetricFamily(
            "medmaas_job_duration_seconds", "Run time of succeeded jobs", buckets=buckets, sum_value=total_sum
        )


FORWARDING_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")


def _has_metrics_token(settings: Settings) -> bool:
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    expected = settings.metrics_token
    return (
        bool(expected)
        and scheme.lower() == "bearer"
        and hmac.compare_digest(presented.strip().encode(), expected.encode())
    )


def _local_unproxied() -> bool:
    return is_loopback(request.remote_addr or "") and not any(h in request.headers for h in FORWARDING_HEADERS)


@bp.get("/metrics")
def metrics() -> Response | tuple[Response, int]:
    settings = _settings()
    with_token = _has_metrics_token(settings)
    if not with_token and not (settings.metrics_loopback and _local_unproxied()):
        if settings.metrics_token:
            response, status = error_response(401, "/metrics needs 'Authorization: Bearer <metrics token>'")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response, status
        return error_response(
            403, "/metrics is served to loopback only (set MEDMAAS_METRICS_TOKEN to scrape it remotely)"
        )
    registry = CollectorRegistry()
    registry.register(_JobCollector(_db(), settings, per_tenant=with_token))
    registry.register(LatencyCollector(_redis(), _db(), per_tenant=with_token))  # online predict calls
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
