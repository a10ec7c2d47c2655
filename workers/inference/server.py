"""The inference worker's online path: consumer threads beside Celery's pool that take
predict calls off Redis (app/inference.py), run them in dynamic batches and reply.

Each loop: pop the calls that arrived together (workers/inference/source.py), group them per
model version and options (workers/inference/batcher.py), run each batch as one Predictor
call on the model cache's predictor, reply to every call, and hand the answered calls to the
Recorder (usage, audit, latency; workers/inference/records.py). A failing batch answers each
of its calls with the error (the job path's `prediction_failed`). A liveness thread keeps the
queue's and this consumer's keys alive; when the process dies they expire within
app.inference.CONSUMER_TTL_S and the callers it held run their calls as jobs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import redis

from app import artifacts
from app import inference as online
from app.artifacts import ArtifactStore
from app.config import Settings
from app.db import Database
from workers import metering
from workers.inference.batcher import Call, plan_batches, run_batch
from workers.inference.records import Answered, Recorder
from workers.inference.source import CallSource

log = logging.getLogger(__name__)

BLOCK_S = 0.5  # a loop's blocking pop; also how soon it notices stop()


class InferenceServer:
    def __init__(self, settings: Settings, db: Database, consumer: str, queue: str | None = None) -> None:
        self.settings, self.db, self.consumer = settings, db, consumer
        self.queue = queue or settings.inference_queue
        self.redis = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=BLOCK_S + 5)
        self.store = ArtifactStore.from_settings(settings)
        self.recorder = Recorder(db, self.redis)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.batches = 0  # batches run (for logs and tests)

    def start(self, warm: bool = True) -> None:
        """Announce, start the loops and the recorder; warm-up runs in the background (calls
        arriving meanwhile load their model themselves)."""
        self.beat()
        self.recorder.start()
        targets = [self._beat_forever] + [self._loop] * max(1, self.settings.inference_threads)
        if warm:
            targets.append(self._warm_up)
        for i, target in enumerate(targets):
            t = threading.Thread(target=target, name=f"medmaas-inference-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("inference consumer %s taking online calls on %s", self.consumer, self.queue)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=BLOCK_S + 30)
        self.recorder.stop()
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(online.consumer_live_key(self.consumer))

    def beat(self) -> None:
        ttl_ms = int(online.CONSUMER_TTL_S * 1000)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(online.consumer_live_key(self.consumer), "1", px=ttl_ms)
            pipe.set(online.queue_live_key(self.queue), self.consumer, px=ttl_ms)
            pipe.execute()
        except redis.RedisError:
            log.warning("inference consumer %s: announcing failed", self.consumer, exc_info=True)

    def _beat_forever(self) -> None:
        while not self._stop.wait(online.CONSUMER_BEAT_S):
            self.beat()

    def _warm_up(self) -> None:
        from workers.inference.warmup import warm_up

        try:
            n = warm_up(self.settings, self.db)
            log.info("inference consumer %s: %d aliased model versions warmed up", self.consumer, n)
        except Exception:
            log.warning("inference warm-up failed", exc_info=True)

    def _loop(self) -> None:
        source = CallSource(
            self.redis,
            self.queue,
            self.consumer,
            self.settings.inference_batch_window_ms / 1000.0,
            self.settings.inference_max_batch,
        )
        while not self._stop.is_set():
            try:
                calls = source.next_calls(BLOCK_S)
                for batch in plan_batches(calls, self.settings.inference_max_batch):
                    self.run(source, batch)
            except redis.RedisError:
                log.warning("inference consumer %s: Redis failed; retrying", self.consumer, exc_info=True)
                self._stop.wait(1.0)
            except Exception:
                log.exception("inference consumer %s: unexpected error", self.consumer)

    def run(self, source: CallSource, batch: list[Call]) -> None:
        """One batch: predict, reply, record."""
        meter = metering.Meter().start()
        status = 200
        try:
            results = run_batch(self._predictor(batch[0]), batch)
            replies: list[dict[str, Any]] = [{"ok": True, "result": r} for r in results]
        except Exception as exc:
            log.exception("online batch of %d calls to %s failed", len(batch), batch[0].label)
            from workers.tasks import failure_message

            error = failure_message("predict", exc).partition(": ")[2]
            replies = [{"ok": False, "error": error} for _ in batch]
            status = 422
        reading = meter.stop()
        answered = source.answer(batch, replies)
        self.batches += 1
        now = time.time()
        total = sum(len(c.spec["inputs"]) for c in batch) or 1
        self.recorder.add(
            [
                Answered(
                    tenant_id=c.tenant_id,
                    model=str(c.spec["model_name"]),
                    version=int(c.spec["version"]),
                    model_version_id=c.model_version_id,
                    inputs=len(c.spec["inputs"]),
                    latency_s=max(0.0, now - c.enqueued),
                    status=status,
                    cpu_s=reading.cpu_s * len(c.spec["inputs"]) / total,
                    gpu_s=reading.gpu_s * len(c.spec["inputs"]) / total,
                    audit=c.audit,
                )
                for c in answered
            ]
        )

    def _predictor(self, call: Call) -> Any:
        from workers.model_cache import get_predictor

        path = self.store.path(call.bundle)
        if not artifacts.still_exists(path):
            raise ValueError(f"model {call.label} no longer exists")
        return get_predictor(path, self.settings.model_cache_size, backend=self.settings.scoring_backend)
