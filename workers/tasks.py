"""Celery entry points (claim a job, run its kind under a lease, record the outcome; score
one shard), plus the maintenance tick that `medmaas beat` runs: reap stale leases of every
kind, clean up ended jobs' scratch, republish what the broker lost, seal the audit rows of
reads (app.audit.seal)."""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from celery import Celery, signals
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import artifacts, audit, dispatch, jobs, leases, workers_registry
from app.artifacts import open_read, open_write
from app.broker import RUN_JOB, SCORE_SHARD, create_celery
from app.config import Settings
from app.db import Database
from app.models import TERMINAL_STATES, Job
from app.notify import EventHub, Notifier
from workers import metering
from workers.inference import attach as attach_inference
from workers.kinds import kind_for
from workers.runtime import JobCancelled, JobContext, JobLost, lost_database_connection, remove_scratch

log = logging.getLogger(__name__)

# A worker's connections are pinged only after sitting idle this long: a busy worker saves a
# round trip per transaction; a restart or fail-over takes longer than this, so the
# connections it left dead are pinged and replaced (app.db.ping_after_idle, Database.run).
PING_AFTER_IDLE_S = 1.0

_db: Database | None = None
_hub: EventHub | None = None
_hub_url: str | None = None


def get_db(settings: Settings) -> Database:
    """One engine per process, created after any fork."""
    global _db
    if _db is None or _db.url != settings.sqlalchemy_url:
        # A worker's transactions are short; one left open past a heartbeat timeout belongs to
        # a worker cut off mid-transaction: the server ends it (app.db.make_engine).
        _db = Database(
            settings.sqlalchemy_url,
            notifier=Notifier(settings.broker_url),
            idle_in_transaction_s=settings.heartbeat_timeout_s,
            ping_after_idle_s=PING_AFTER_IDLE_S,
        )
    return _db


def get_hub(settings: Settings) -> EventHub:
    """One notification subscriber per process (its listener thread starts with the first
    watch, so after any fork)."""
    global _hub, _hub_url
    if _hub is None or _hub_url != settings.broker_url:
        if _hub is not None:
            _hub.close()
        _hub, _hub_url = EventHub(settings.broker_url), settings.broker_url
    return _hub


def worker_name() -> str:
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{socket.gethostname()}:{os.getpid()}" + (f":gpu{gpu}" if gpu else "")


def free_accelerator_memory() -> None:
    """Return a finished job's GPU memory to the device. A full gc costs ~0.3 s, so it only
    runs where CUDA is in use; on CPU, reference counting frees the job's tensors."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


KIND_VERBS = {"train": "Training", "score": "Scoring", "predict": "Prediction", "ingest": "Reading the dataset"}
MAX_ERROR_CHARS = 500
OPERATOR_TRACEBACK = "worker-error.log"  # in the job's directory; never served by the API


def failure_message(kind: str, exc: BaseException) -> str:
    """One sentence for job.error: what failed and why, without a traceback."""
    what = f"{KIND_VERBS.get(kind, f'Job ({kind})')} failed"
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"{what}: the GPU ran out of memory; use a smaller batch_size or model, a shorter max_len, or device cpu"
    text = " ".join(str(exc).split())  # one line
    if isinstance(exc, MemoryError):
        text = "the worker ran out of memory"
    elif not text:
        text = f"{type(exc).__name__} (see the worker log)"
    elif not isinstance(exc, (ValueError, FileNotFoundError)):
        # Unexpected errors keep their type: it is what an operator searches the log for.
        text = f"{type(exc).__name__}: {text}"
    if len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS - 3].rstrip() + "..."
    return f"{what}: {text}" if text.endswith((".", "...")) else f"{what}: {text}."


def save_operator_traceback(ctx: JobContext, attempt: int) -> None:
    """Append the current exception's traceback to the job directory's operator-only log."""
    entry = f"--- attempt {attempt} on {ctx.worker}\n{traceback.format_exc()}\n".encode()
    try:
        path = ctx.job_dir() / OPERATOR_TRACEBACK
        earlier = b""
        if artifacts.exists(path):  # appended by rewriting: the file may be encrypted (app.artifacts)
            with open_read(path) as old:
                earlier = old.read()
        with open_write(path) as fh:
            fh.write(earlier + entry)
    except (OSError, ValueError):
        log.warning("could not write the traceback of job %s to its directory", ctx.job_id, exc_info=True)


def execute_job(db: Database, settings: Settings, celery: Celery, job_id: int) -> str:
    """Run one delivery of a job. Returns what happened (for logs and tests)."""
    worker = worker_name()
    limit = settings.tenant_max_running_per_queue
    claimed = db.run(lambda s: jobs.claim_job(s, job_id, worker, limit), one_statement=True)
    if isinstance(claimed, jobs.Waiting):
        log.info("job %s: %s; left queued until a slot frees", job_id, claimed.message)
        return "waiting"
    if claimed is None:
        log.info("job %s: not claimable (duplicate delivery or cancelled); skipping", job_id)
        return "skipped"
    attempt, job = claimed.attempt, claimed.job  # the claim returned what the job needs: no re-select
    kind = kind_for(job.kind)
    ctx = JobContext(
        db, settings, job_id, attempt, job.tenant_id, job.spec, celery=celery, worker=worker, hub=get_hub(settings)
    )
    if kind is None:
        with db.session() as s:
            jobs.fail(
                s, job_id, attempt, f"no handler for job kind {job.kind!r} on this worker", started_at=job.started_at
            )
        return "failed"
    meter = metering.Meter().start()  # usage (CPU, GPU seconds) is recorded with the job's end
    ctx.start_heartbeat()
    try:
        result = kind.run(ctx, job.spec)
    except JobCancelled:
        end_attempt(db, ctx, job, meter, jobs.mark_cancelled)
        return "cancelled"
    except JobLost:
        log.warning("job %s attempt %s was taken over; dropping this attempt", job_id, attempt)
        return "lost"
    except Exception as exc:
        if lost_database_connection(exc):
            # A database restart or fail-over is not the job's fault: give the attempt back (the
            # next one resumes from the last checkpoint) instead of failing the job.
            log.warning("job %s attempt %s: the database connection was lost; giving the attempt back", job_id, attempt)
            db.run(lambda s: leases.release(s, jobs.LEASE, job_id, attempt, error="the database connection was lost"))
            return "released"
        # The traceback is for the operator (this log, and a file in the job's directory the
        # API never serves); the tenant reads one sentence in job.error.
        log.exception("job %s (%s) attempt %s failed", job_id, job.kind, attempt)
        save_operator_traceback(ctx, attempt)
        message = failure_message(job.kind, exc)
        if ctx.should_stop(poll_s=0) and not ctx.lost:  # cancelled while failing: cancel wins
            end_attempt(db, ctx, job, meter, jobs.mark_cancelled)
            return "cancelled"
        end_attempt(db, ctx, job, meter, jobs.fail, message)
        return "failed"
    finally:
        ctx.stop_heartbeat()
        free_accelerator_memory()
        meter.stop()
    succeeded = end_attempt(db, ctx, job, meter, jobs.succeed, result, result=result)
    if not succeeded:
        return "lost"
    # Only now that the success is committed: a kill before it leaves the scratch (a score
    # job's shard parts) for the next attempt to merge.
    remove_scratch(settings, job.tenant_id, job_id)
    return "succeeded"


def end_attempt(
    db: Database,
    ctx: JobContext,
    job: Job,
    meter: metering.Meter,
    outcome: Callable[..., bool],
    *args: Any,
    result: dict[str, Any] | None = None,
) -> bool:
    """Write an attempt's end: `outcome(session, job id, attempt, *args)` (jobs.succeed, fail or
    mark_cancelled) with the kind's held-back last progress report (`ctx.final_report`) and
    the attempt's usage rows, one statement on PostgreSQL. Should it fail, the outcome is
    written again without the usage, so metering never undoes the work it meters. Returns
    whether the outcome applied (False: the attempt was no longer the job's)."""

    def write(session: Session, usage: list[dict[str, Any]] | None) -> bool:
        ending = {"started_at": job.started_at, "last_report": ctx.final_report, "usage": usage}
        return outcome(session, job.id, ctx.attempt, *args, **ending)

    try:
        usage = metering.job_usage(job, meter.stop(), result)
        return db.run(lambda s: write(s, usage), one_statement=True)
    except Exception as exc:
        if lost_database_connection(exc):
            raise
        log.exception(
            "job %s: recording the end of attempt %s with its usage failed; without usage", job.id, ctx.attempt
        )
    return db.run(lambda s: write(s, None), one_statement=True)


def reap(db: Database, settings: Settings) -> list[leases.Reaped]:
    """Stale leases of every kind back to claimable (the next `reconcile` publishes them), or
    failed / cancelled; units of jobs that have ended are cancelled; ended jobs' scratch
    directories are deleted."""
    reaped: list[leases.Reaped] = []
    with db.session() as s:
        for kind in leases.kinds():  # jobs first: a shard of a job ended just now is cancelled below
            reaped += leases.reap(s, kind, settings.heartbeat_timeout_s)
        ended: set[int] = set()
        for kind in leases.kinds():
            if not kind.is_job:
                ended.update(leases.cancel_units(s, kind))
        ended |= {r.job_id for r in reaped if r.kind.is_job and r.state in TERMINAL_STATES}
        owners = s.execute(select(Job.id, Job.tenant_id).where(Job.id.in_(ended))).all() if ended else []
    for r in reaped:
        log.warning("%s %s of job %s: worker lost; now %s", r.kind.name, r.key, r.job_id, r.state.value)
    for job_id, tenant_id in owners:
        remove_scratch(settings, tenant_id, job_id)
    return reaped


def reconcile(db: Database, settings: Settings, celery: Celery) -> int:
    """Publish every unit that went back to claimable, and those the broker lost (Redis flushed
    or restarted): dispatch.republish, for all kinds at once."""
    return dispatch.republish(celery, db, settings)


def register_tasks(celery: Celery, settings: Settings) -> None:
    @celery.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def run_job(job_id: int, *extra: Any) -> str:
        return execute_job(get_db(settings), settings, celery, int(job_id))

    @celery.task(name=SCORE_SHARD, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def score_shard(job_id: int, index: int, *extra: Any) -> str:
        return run_unit(get_db(settings), settings, celery, int(job_id), int(index), worker_name())


def run_unit(db: Database, settings: Settings, celery: Celery, job_id: int, index: int, worker: str) -> str:
    """One shard message: a `train` job's unit is an ensemble member (workers/kinds/train.py),
    any other job's a block of library rows to score (workers/scoring/runner.py)."""
    with db.session() as s:
        kind = s.scalar(select(Job.kind).where(Job.id == job_id))
    if kind == "train":
        from workers.kinds.train import run_member_task

        return run_member_task(db, settings, job_id, index, worker)
    if kind == "search":  # a trial slot of a hyper-parameter search (workers/kinds/search.py)
        from workers.kinds.search import run_trial_task

        return run_trial_task(db, settings, job_id, index, worker)
    from workers.scoring.runner import run_shard_task

    return run_shard_task(db, settings, celery, job_id, index, worker)


def worker_celery(settings: Settings) -> Celery:
    """The Celery app a worker process runs: the client configuration plus the tasks. Once
    the worker is ready it announces itself on its queues (Presence) until it shuts down."""
    celery = create_celery(settings)
    register_tasks(celery, settings)
    celery.medmaas_settings = settings  # read by the presence signals
    signals.worker_ready.connect(_start_presence, weak=False, dispatch_uid="medmaas-presence-start")
    signals.worker_shutdown.connect(_stop_presence, weak=False, dispatch_uid="medmaas-presence-stop")
    attach_inference(celery)  # online predict calls, on workers that consume the inference queue
    return celery


class Presence:
    """Keeps this worker process's presence keys alive (app/workers_registry.py): one refresh
    now, then one every interval_s from a daemon thread; `stop` deletes them. A broker outage
    is logged and retried on the next beat."""

    def __init__(
        self, broker_url: str, queues: list[str], worker: str, interval_s: float = workers_registry.ANNOUNCE_INTERVAL_S
    ) -> None:
        self.broker_url, self.queues, self.worker, self.interval_s = broker_url, queues, worker, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._failing = False

    def start(self) -> None:
        import redis

        self._client = redis.Redis.from_url(self.broker_url, socket_timeout=2, socket_connect_timeout=2)
        self.beat()
        self._thread = threading.Thread(target=self._run, name="medmaas-presence", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        try:
            workers_registry.announce(self._client, self.queues, self.worker, ttl_s=3 * self.interval_s)
        except Exception:
            if not self._failing:
                log.warning("announcing worker %s on %s failed; retrying", self.worker, self.queues, exc_info=True)
            self._failing = True
        else:
            self._failing = False

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._client is not None:
            try:
                workers_registry.withdraw(self._client, self.queues, self.worker)
            except Exception:
                log.debug("withdrawing worker %s failed; its keys expire", self.worker, exc_info=True)
            self._client.close()


_presence: Presence | None = None


def _start_presence(sender: Any = None, **_kw: Any) -> None:
    """worker_ready: announce this process on the queues it consumes."""
    global _presence
    app = getattr(sender, "app", None)
    settings = getattr(app, "medmaas_settings", None)
    if app is None or settings is None or _presence is not None:
        return
    consume_from = app.amqp.queues.consume_from or {}
    queues = sorted(consume_from) or [settings.default_queue]
    _presence = Presence(settings.broker_url, queues, worker_name())
    _presence.start()
    log.info("worker %s announced on queues %s", _presence.worker, ", ".join(queues))


def _stop_presence(**_kw: Any) -> None:
    global _presence
    if _presence is not None:
        _presence.stop()
        _presence = None


def run_maintenance_forever(settings: Settings, stop: Any = None) -> None:
    """The `beat` loop, every reaper_interval_s: reap stale leases, then republish, then chain
    the audit rows appended unsealed since the last tick (and, hourly, measure each tenant's
    bytes stored). Runs as its own process (or a thread in standalone); both steps are idempotent, so
    running two by mistake is harmless."""
    import threading

    stop = stop or threading.Event()
    db = get_db(settings)
    celery = create_celery(settings)
    storage_snapshots = metering.StorageSnapshots()  # bytes stored per tenant, hourly
    while not stop.is_set():
        try:
            reap(db, settings)
            reconcile(db, settings, celery)
            audit.seal(db.engine)
            storage_snapshots.maybe_run(db, settings)
        except Exception:
            log.warning("maintenance tick failed", exc_info=True)
        stop.wait(settings.reaper_interval_s)
