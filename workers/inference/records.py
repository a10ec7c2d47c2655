"""What answered online calls leave behind, written in batches off the request path: per
flush, one transaction with the usage of every call (predict_calls 1 and predict_inputs n
per call, plus the CPU / GPU seconds of its batch shared by inputs) and the request's audit
row (appended unsealed, one INSERT each; app.audit's sealer chains it like any read's), and one Redis round trip adding each call's latency to its model's histogram
(app/inference.py LatencyCollector reads it for /metrics).

A flush that fails keeps its records for the next one (up to MAX_PENDING; beyond that the
oldest are dropped with a logged error). Records still pending when the process is killed
are lost: the calls were answered, their usage and audit rows not written. A graceful stop
flushes them (app.batching)."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from app import audit
from app import inference as online
from app.batching import BatchWriter
from app.db import Database
from app.models import UsageMetric
from app.stores import usage as usage_store
from app.stores.usage import Quantity

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.25
FLUSH_SIZE = 500  # records that trigger a flush before the interval ends
MAX_PENDING = 100_000


@dataclass(frozen=True)
class Answered:
    """One answered call."""

    tenant_id: int
    model: str
    version: int
    model_version_id: int
    inputs: int
    latency_s: float
    status: int = 200
    cpu_s: float = 0.0
    gpu_s: float = 0.0
    audit: dict[str, Any] | None = None

    def quantities(self) -> list[Quantity]:
        m, v = self.model, self.version
        out = [Quantity(UsageMetric.cpu_seconds, self.cpu_s, m, v), Quantity(UsageMetric.gpu_seconds, self.gpu_s, m, v)]
        if self.status < 400:
            out += [
                Quantity(UsageMetric.predict_calls, 1, m, v),
                Quantity(UsageMetric.predict_inputs, self.inputs, m, v),
            ]
        return out


class Recorder(BatchWriter[Answered]):
    """Collects Answered records and flushes them from its own thread (app.batching)."""

    name = "medmaas-inference-records"
    what = "online-call records"

    def __init__(self, db: Database, redis: Any, interval_s: float = FLUSH_INTERVAL_S) -> None:
        super().__init__(interval_s, FLUSH_SIZE, MAX_PENDING)
        self.db, self.redis = db, redis

    def write(self, batch: list[Answered]) -> None:
        per_tenant: dict[int, list[Quantity]] = defaultdict(list)
        for r in batch:
            per_tenant[r.tenant_id] += r.quantities()
        with self.db.session() as s:
            for tenant_id in sorted(per_tenant):  # key order: concurrent flushes lock alike
                usage_store.add(s, tenant_id, per_tenant[tenant_id])
            # chained by the sealer
            audit.append_unsealed(s, *(online.audit_entry(r.audit, r.status) for r in batch if r.audit is not None))

    def after_write(self, batch: list[Answered]) -> None:
        """Each call's latency into its model's /metrics histogram."""
        pipe = self.redis.pipeline(transaction=False)
        labelled: set[int] = set()
        for r in batch:
            key = online.latency_key(r.model_version_id)
            if r.model_version_id not in labelled:
                labelled.add(r.model_version_id)
                pipe.hset(key, mapping={"model": f"{r.model}@{r.version}", "tenant_id": r.tenant_id})
            pipe.hincrby(key, f"b{online.bucket_index(r.latency_s)}", 1)
            pipe.hincrbyfloat(key, "sum", r.latency_s)
        pipe.execute()
