"""Online predictions: the web side of the request/reply path to the inference workers.

A predict call small enough for the online path (Settings.inference_max_inputs inputs, or
inference_max_explained_inputs with `explain`) is validated exactly as a predict job's spec
(app/kinds/predict.py), then pushed as one JSON message onto the Redis list of its inference
queue; the caller waits on its own reply key. An inference worker (workers/inference/) pops
the messages, runs the calls for the same model version together as one forward pass and
pushes each reply. No job row, no Celery message, no database poll.

Who answers is settled on one Redis key per call, `state:<id>`, so that a call is either
answered by a worker or turned into a job by the web process, never both:
- the worker takes a call with SET NX ("held:<consumer>") and answers it with SET XX GET
  ("answered") followed by the reply in the same round trip; the call counts as answered
  (usage and audit recorded) only when the previous value was its own hold;
- the web process gives a call up with SET GET ("abandoned"): when the previous value was
  not "answered", the worker's answer (if any comes) is not counted and its reply is never
  read (it expires), so the call becomes a job; when it was "answered", the reply is read.
The web process gives up when no worker took the call within inference_wait_s, when the
worker holding it stops announcing itself (killed: its liveness key expires within
CONSUMER_TTL_S), or at the caller's deadline. A fallen-back call is answered by the job path
as before (200 when the job ends within the caller's timeout, else 202 with the job).

Usage (predict_calls, predict_inputs, CPU seconds) and the request's audit entry are
written by the worker in batches after it answers, off the request path; the latency of
every answered call goes into a per-model histogram in Redis that /metrics reads
(LatencyCollector)."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import redis

from app.audit import Actor, Entry, Outcome

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from app.config import Settings
    from app.db import Database
    from app.models import ModelVersion

log = logging.getLogger(__name__)

PREFIX = "medmaas:inference:"
CONSUMER_TTL_S = 3.0  # a consumer's liveness key; refreshed every CONSUMER_BEAT_S
CONSUMER_BEAT_S = 0.5
WAIT_SLICE_S = 0.25  # between two liveness checks while waiting for a reply
ANSWERED_GRACE_S = 2.0  # a reply the worker has claimed is pushed right after; wait this long for it
STATE_TTL_S = 60.0  # state and reply keys outlive the caller's deadline by this much
HELD, ANSWERED, ABANDONED = "held:", "answered", "abandoned"
# WSGI environ keys of the ASGI front's predict route (app/asgi.py): the route's Flask request
# hands its validated call over instead of waiting on a thread (HANDOFF: a dict the view fills
# with queue, msg and wait_s), and a call the front gave up on runs again as a job (GIVEN_UP:
# the seconds already spent, taken off the caller's timeout).
HANDOFF = "medmaas.inference.handoff"
GIVEN_UP = "medmaas.inference.given_up_after_s"
# Latency histogram buckets (seconds) of answered online calls, per model version.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def requests_key(queue: str) -> str:
    return f"{PREFIX}requests:{queue}"


def state_key(call_id: str) -> str:
    return f"{PREFIX}state:{call_id}"


def reply_key(call_id: str) -> str:
    return f"{PREFIX}reply:{call_id}"


def queue_live_key(queue: str) -> str:
    """Set (with CONSUMER_TTL_S) by every consumer of the queue: some worker is taking calls."""
    return f"{PREFIX}live:{queue}"


def consumer_live_key(consumer: str) -> str:
    return f"{PREFIX}consumer:{consumer}"


def latency_key(model_version_id: int) -> str:
    return f"{PREFIX}latency:{model_version_id}"


def bucket_index(seconds: float) -> int:
    """The first bucket whose upper bound holds `seconds` (len(LATENCY_BUCKETS): +Inf)."""
    for i, bound in enumerate(LATENCY_BUCKETS):
        if seconds <= bound:
            return i
    return len(LATENCY_BUCKETS)


def online_eligible(spec: dict[str, Any], settings: Settings, timeout: float) -> bool:
    """Whether a predict call may take the online path: it is on, the caller waits at all,
    and the call is small enough (explained calls have their own, lower, limit)."""
    if not settings.inference_online or timeout <= 0:
        return False
    limit = settings.inference_max_explained_inputs if spec.get("explain") else settings.inference_max_inputs
    return len(spec.get("inputs") or []) <= limit


# -- the message ------------------------------------------------------------------------------


def audit_payload(entry: Entry | None) -> dict[str, Any] | None:
    """The request's audit entry as the worker writes it (status and outcome set there)."""
    if entry is None or entry.tenant_id is None or entry.actor is None:
        return None
    return {
        "tenant_id": entry.tenant_id,
        "actor": asdict(entry.actor),
        "action": entry.action,
        "object_type": entry.object_type,
        "object_id": entry.object_id,
        "details": entry.details,
        "client_addr": entry.client_addr,
        "request_id": entry.request_id,
    }


def audit_entry(payload: dict[str, Any], status: int) -> Entry:
    """The Entry a worker records for an answered call (`audit_payload`'s inverse)."""
    return Entry(
        tenant_id=int(payload["tenant_id"]),
        actor=Actor(**payload["actor"]),
        action=payload["action"],
        object_type=payload.get("object_type"),
        object_id=payload.get("object_id"),
        details=dict(payload.get("details") or {}),
        client_addr=payload.get("client_addr"),
        request_id=payload.get("request_id"),
        outcome=Outcome.ok if status < 400 else Outcome.failed,
        status=status,
    )


def message(
    spec: dict[str, Any], tenant_id: int, bundle_uri: str, deadline: float, audit: dict[str, Any] | None
) -> dict[str, Any]:
    """One online call: the validated predict spec (app/kinds/predict.py check: resolved
    model, de-identified images, options) plus where the weights are and when the caller
    stops waiting (epoch seconds)."""
    return {
        "id": uuid.uuid4().hex,
        "tenant_id": tenant_id,
        "spec": spec,
        "bundle": bundle_uri,
        "enqueued": time.time(),
        "deadline": deadline,
        "audit": audit,
    }


@dataclass(frozen=True)
class Reply:
    """A worker's answer: the predict result ({model, version, outputs, predictions}) or the
    one-sentence reason the prediction failed (the job path's `prediction_failed`)."""

    result: dict[str, Any]
    error: str | None = None


HANDED_OFF = Reply({})  # predict_online's answer when the ASGI front pushes and awaits the call


# -- the client -------------------------------------------------------------------------------


class InferenceClient:
    """Hands online calls to the inference workers; one per web process (thread-safe: the
    redis client pools its connections)."""

    def __init__(self, settings: Settings, client: Any = None) -> None:
        self.settings = settings
        # Replies are awaited in WAIT_SLICE_S slices, so a read never blocks longer than one
        # slice plus this margin, even if Redis stops answering.
        self.redis = client or redis.Redis.from_url(
            settings.broker_url, socket_connect_timeout=2, socket_timeout=WAIT_SLICE_S + 3
        )
        self._live: dict[str, tuple[float, bool]] = {}
        self._live_lock = threading.Lock()

    def available(self, queue: str, max_age_s: float = 0.5) -> bool:
        """Whether some consumer takes calls on `queue` (read at most every max_age_s)."""
        now = time.monotonic()
        with self._live_lock:
            seen = self._live.get(queue)
        if seen is not None and now - seen[0] < max_age_s:
            return seen[1]
        try:
            live = bool(self.redis.exists(queue_live_key(queue)))
        except redis.RedisError:
            live = False
        with self._live_lock:
            self._live[queue] = (now, live)
        return live

    def call(self, queue: str, msg: dict[str, Any], wait_s: float) -> Reply | None:
        """Push `msg` and wait for its reply: the Reply, or None when the call is given up
        (no worker took it within wait_s, its worker died, the deadline passed, Redis
        failed); a None call was not answered and will not be, so the caller runs it as a job."""
        call_id = msg["id"]
        deadline_mono = time.monotonic() + max(0.0, msg["deadline"] - time.time())
        take_by = time.monotonic() + wait_s
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.rpush(requests_key(queue), json.dumps(msg, separators=(",", ":")))
            pipe.blpop([reply_key(call_id)], timeout=self._slice(deadline_mono))
            popped = pipe.execute()[1]
            while popped is None:
                if self._give_up(call_id, take_by, deadline_mono):
                    return self._abandon(call_id, msg["deadline"])
                popped = self.redis.blpop([reply_key(call_id)], timeout=self._slice(deadline_mono))
        except redis.RedisError:
            log.warning("online predict call %s: Redis failed; running it as a job", call_id, exc_info=True)
            return self._abandon(call_id, msg["deadline"])
        return parse_reply(popped[1])

    @staticmethod
    def _slice(deadline_mono: float) -> float:
        return max(0.01, min(WAIT_SLICE_S, deadline_mono - time.monotonic()))

    def _give_up(self, call_id: str, take_by: float, deadline_mono: float) -> bool:
        now = time.monotonic()
        if now >= deadline_mono:
            return True
        state = _text(self.redis.get(state_key(call_id)))
        if state is None:  # still waiting in the list
            return now >= take_by
        if state.startswith(HELD):  # a worker has it: give up only if that worker is gone
            return not self.redis.exists(consumer_live_key(state[len(HELD) :]))
        return False  # answered: the reply is on its way

    def _abandon(self, call_id: str, deadline: float) -> Reply | None:
        """Settle the call as given up, unless a worker answered it first (then wait for the reply)."""
        ttl_ms = int((max(0.0, deadline - time.time()) + STATE_TTL_S) * 1000)
        try:
            previous = _text(self.redis.set(state_key(call_id), ABANDONED, px=ttl_ms, get=True))
            if previous != ANSWERED:
                return None
            popped = self.redis.blpop([reply_key(call_id)], timeout=ANSWERED_GRACE_S)
        except redis.RedisError:
            return None
        return None if popped is None else parse_reply(popped[1])


class AsyncInferenceClient:
    """InferenceClient.call for the ASGI front (app/asgi.py): the same protocol on redis.asyncio,
    so a waiting call holds no thread. One per web process and event loop."""

    def __init__(self, settings: Settings) -> None:
        import redis.asyncio

        self.redis = redis.asyncio.Redis.from_url(
            settings.broker_url, socket_connect_timeout=2, socket_timeout=WAIT_SLICE_S + 3
        )

    async def call(self, queue: str, msg: dict[str, Any], wait_s: float) -> Reply | None:
        call_id = msg["id"]
        deadline_mono = time.monotonic() + max(0.0, msg["deadline"] - time.time())
        take_by = time.monotonic() + wait_s
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.rpush(requests_key(queue), json.dumps(msg, separators=(",", ":")))
            pipe.blpop([reply_key(call_id)], timeout=InferenceClient._slice(deadline_mono))
            popped = (await pipe.execute())[1]
            while popped is None:
                if await self._give_up(call_id, take_by, deadline_mono):
                    return await self._abandon(call_id, msg["deadline"])
                popped = await self.redis.blpop([reply_key(call_id)], timeout=InferenceClient._slice(deadline_mono))
        except redis.RedisError:
            log.warning("online predict call %s: Redis failed; running it as a job", call_id, exc_info=True)
            return await self._abandon(call_id, msg["deadline"])
        return parse_reply(popped[1])

    async def _give_up(self, call_id: str, take_by: float, deadline_mono: float) -> bool:
        now = time.monotonic()
        if now >= deadline_mono:
            return True
        state = _text(await self.redis.get(state_key(call_id)))
        if state is None:
            return now >= take_by
        if state.startswith(HELD):
            return not await self.redis.exists(consumer_live_key(state[len(HELD) :]))
        return False

    async def _abandon(self, call_id: str, deadline: float) -> Reply | None:
        ttl_ms = int((max(0.0, deadline - time.time()) + STATE_TTL_S) * 1000)
        try:
            previous = _text(await self.redis.set(state_key(call_id), ABANDONED, px=ttl_ms, get=True))
            if previous != ANSWERED:
                return None
            popped = await self.redis.blpop([reply_key(call_id)], timeout=ANSWERED_GRACE_S)
        except redis.RedisError:
            return None
        return None if popped is None else parse_reply(popped[1])

    async def close(self) -> None:
        await self.redis.aclose()  # type: ignore[attr-defined]  # (types-redis predates aclose)


def parse_reply(raw: bytes | str) -> Reply:
    body = json.loads(raw)
    if body.get("ok"):
        return Reply(body["result"])
    return Reply({}, str(body.get("error") or "the inference worker failed"))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


# -- /metrics ---------------------------------------------------------------------------------


class LatencyCollector:
    """medmaas_predict_latency_seconds{model="name@version"} from the histograms the inference
    workers keep in Redis (every web process reports the same numbers); with per_tenant
    (the metrics token) also labelled by tenant name. Without it, same-named models of
    different tenants add up."""

    def __init__(self, client: Any, db: Database, per_tenant: bool = False) -> None:
        self.client, self.db, self.per_tenant = client, db, per_tenant

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import HistogramMetricFamily

        series: dict[tuple[str, ...], list[float]] = {}
        try:
            keys = list(self.client.scan_iter(match=f"{PREFIX}latency:*", count=1000))
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hgetall(key)
            hashes = pipe.execute() if keys else []
        except redis.RedisError:
            hashes = []
        names = self._tenant_names() if self.per_tenant else {}
        n = len(LATENCY_BUCKETS)
        for raw in hashes:
            h = {_text(k): float(v) for k, v in raw.items() if _text(k) not in ("model", "tenant_id")}
            model = _text(raw.get(b"model") or raw.get("model")) or "?"
            labels: tuple[str, ...] = (model,)
            if self.per_tenant:
                tenant_id = int(_text(raw.get(b"tenant_id") or raw.get("tenant_id")) or 0)
                labels = (names.get(tenant_id, str(tenant_id)), model)
            acc = series.setdefault(labels, [0.0] * (n + 2))
            for i in range(n + 1):
                acc[i] += h.get(f"b{i}", 0.0)
            acc[n + 1] += h.get("sum", 0.0)
        family = HistogramMetricFamily(
            "medmaas_predict_latency_seconds",
            "Online predict calls answered by an inference worker: time from the request's "
            "hand-off to its reply, per model version",
            labels=["tenant", "model"] if self.per_tenant else ["model"],
        )
        for labels, acc in sorted(series.items()):
            cumulative, buckets = 0.0, []
            for i, bound in enumerate(LATENCY_BUCKETS):
                cumulative += acc[i]
                buckets.append((str(bound), cumulative))
            buckets.append(("+Inf", cumulative + acc[n]))
            family.add_metric(list(labels), buckets, acc[n + 1])
        yield family

    def _tenant_names(self) -> dict[int, str]:
        from sqlalchemy import select

        from app.models import Tenant

        with self.db.sessionmaker() as s:
            return {int(i): str(name) for i, name in s.execute(select(Tenant.id, Tenant.name))}


# -- the route's side -------------------------------------------------------------------------


def predict_online(
    session: Any,
    settings: Settings,
    client: InferenceClient,
    tenant_id: int,
    mv: ModelVersion,
    spec: dict[str, Any],
    timeout: float,
    handoff: dict[str, Any] | None = None,
) -> Reply | None:
    """Validate a predict spec for the version `mv` (resolved from the URL by the caller) as
    a predict job's spec is validated (the kind's schema and check: SpecError, a 422), hand
    it to an inference worker and wait up to `timeout`. None: not taken on the online path
    (too big, no live consumer, not answered in time); the caller then submits the job,
    which validates the spec again. With `handoff` (the ASGI front's route), the call is not
    pushed here: queue, msg and wait_s go into it for the front to push and await without a
    thread, and the Reply is HANDED_OFF."""
    from marshmallow import ValidationError

    from app.api import auditing
    from app.kinds import SpecError, SubmitContext
    from app.kinds import predict as predict_kind

    if not online_eligible(spec, settings, timeout):
        return None
    try:
        loaded = _predict_spec_schema().load(spec)
    except ValidationError as exc:  # as app.stores.jobs.validate words it
        raise SpecError("Invalid spec for kind 'predict'", "invalid_spec", {"spec": exc.messages}) from exc
    normalised = predict_kind.check_version(loaded, SubmitContext(session, tenant_id, settings), mv)
    queue = predict_kind.route(normalised, settings)
    if not client.available(queue):
        return None
    entry = auditing.current()
    msg = message(normalised, tenant_id, mv.artifact_uri, time.time() + timeout, audit_payload(entry))
    wait_s = min(timeout, settings.inference_wait_s)
    if handoff is not None:
        handoff.update(queue=queue, msg=msg, wait_s=wait_s)
        reply: Reply | None = HANDED_OFF
    else:
        reply = client.call(queue, msg, wait_s)
    if reply is not None and entry is not None and msg["audit"] is not None:
        # The worker writes this request's audit row with its usage (records.py), batched. (A
        # handed-off call the worker never answers runs again as a job: that request's row.)
        entry.written = True
    return reply


@functools.cache
def _predict_spec_schema() -> Any:
    """One PredictSpec instance for every call (building a marshmallow schema deep-copies its
    fields: about a millisecond a request); loading with it is thread-safe."""
    from app.kinds.predict import PredictSpec

    return PredictSpec()


def client_of(app: Any) -> InferenceClient:
    """The web process's InferenceClient (made on first use)."""
    client = app.extensions.get("medmaas.inference")
    if client is None:
        client = app.extensions.setdefault("medmaas.inference", InferenceClient(app.extensions["medmaas.settings"]))
    return client
