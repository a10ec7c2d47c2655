"""Celery entry point (claim a job, run its kind with heartbeats, record the outcome),
plus the reaper and reconciler that `medmaas beat` runs."""
from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import traceback
from typing import Any, Optional

import redis
from celery import Celery
from sqlalchemy import select

from app import dispatch, jobs
from app.broker import RUN_JOB, SCORE_SHARD, create_celery, queue_names
from app.config import Settings
from app.db import Database
from app.notify import Notifier
from app.models import Job, JobState
from workers.kinds import kind_for
from workers.runtime import JobCancelled, JobContext, JobLost
from workers.scoring.shards import reap_shards, reconcile_shards

log = logging.getLogger(__name__)

_db: Optional[Database] = None


def get_db(settings: Settings) -> Database:
    """One engine per process, created after any fork."""
    global _db
    if _db is None or _db.url != settings.sqlalchemy_url:
        _db = Database(settings.sqlalchemy_url, notifier=Notifier(settings.broker_url))
    return _db


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


def execute_job(db: Database, settings: Settings, celery: Celery, job_id: int) -> str:
    """Run one delivery of a job. Returns what happened (for logs and tests)."""
    worker = worker_name()
    with db.session() as s:
        attempt = jobs.claim(s, job_id, worker)
        job = s.get(Job, job_id) if attempt is not None else None
    if attempt is None or job is None:
        log.info("job %s: not claimable (duplicate delivery or cancelled); skipping", job_id)
        return "skipped"
    kind = kind_for(job.kind)
    ctx = JobContext(db, settings, job_id, attempt, job.tenant_id, job.spec, celery=celery, worker=worker)
    if kind is None:
        with db.session() as s:
            jobs.fail(s, job_id, attempt, f"no handler for job kind {job.kind!r} on this worker")
        return "failed"
    ctx.start_heartbeat()
    try:
        result = kind.run(ctx, job.spec)
    except JobCancelled:
        with db.session() as s:
            jobs.mark_cancelled(s, job_id, attempt)
        return "cancelled"
    except JobLost:
        log.warning("job %s attempt %s was taken over; dropping this attempt", job_id, attempt)
        return "lost"
    except Exception as exc:  # noqa: BLE001
        log.exception("job %s failed", job_id)
        message = f"{type(exc).__name__}: {exc}"
        with db.session() as s:
            if ctx.should_stop() and not ctx._lost.is_set():  # cancelled while failing: cancel wins
                jobs.mark_cancelled(s, job_id, attempt)
                return "cancelled"
            jobs.fail(s, job_id, attempt, message + "\n" + traceback.format_exc(limit=5))
        return "failed"
    finally:
        ctx.stop_heartbeat()
        free_accelerator_memory()
    with db.session() as s:
        if jobs.succeed(s, job_id, attempt, result):
            return "succeeded"
    return "lost"


def reap(db: Database, settings: Settings, celery: Celery) -> list[jobs.Reaped]:
    with db.session() as s:
        reaped = jobs.reap_stale(s, settings.heartbeat_timeout_s)
    for r in reaped:
        log.warning("job %s: worker lost; now %s", r.job_id, r.state.value)
    dispatch.publish_jobs(celery, db, [(r.job_id, r.queue) for r in reaped if r.state == JobState.queued])
    reap_shards(db, settings, celery)  # score shards: stale ones back to pending, ended jobs' ones cancelled
    return reaped


def reconcile(db: Database, settings: Settings, celery: Celery) -> int:
    """Republish queued jobs whose broker message is gone (Redis flushed or restarted)."""
    try:  # and pending score shards of running jobs
        reconcile_shards(db, settings, celery, queue_names(settings))
    except Exception:  # noqa: BLE001
        log.warning("reconciling score shards failed", exc_info=True)
    with db.session() as s:
        candidates = jobs.unpublished_queued(s, settings.requeue_grace_s)
    if not candidates:
        return 0
    client = redis.Redis.from_url(settings.broker_url)
    try:
        present = dispatch.job_ids_in_broker(client, queue_names(settings))
    finally:
        client.close()
    missing = [(jid, q) for jid, q in candidates if jid not in present]
    with db.session() as s:  # still in the broker: just restart the grace clock
        jobs.mark_published(s, [jid for jid, _ in candidates if jid in present])
    if missing:
        log.warning("republishing %d queued jobs missing from the broker", len(missing))
    return dispatch.publish_jobs(celery, db, missing)


def register_tasks(celery: Celery, settings: Settings) -> None:
    @celery.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def run_job(job_id: int, *extra: Any) -> str:
        return execute_job(get_db(settings), settings, celery, int(job_id))

    @celery.task(name=SCORE_SHARD, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def score_shard(job_id: int, index: int, *extra: Any) -> str:
        from workers.scoring.runner import run_shard_task

        return run_shard_task(get_db(settings), settings, celery, int(job_id), int(index), worker_name())



def worker_celery(settings: Settings) -> Celery:
    """The Celery app a worker process runs: the client configuration plus the tasks."""
    celery = create_celery(settings)
    register_tasks(celery, settings)
    return celery



def run_maintenance_forever(settings: Settings, stop: Any = None) -> None:
    """The `beat` loop: reap stale jobs and republish lost ones every reaper_interval_s.
    Runs as its own process (or a thread in standalone); both steps are idempotent, so
    running two by mistake is harmless."""
    import threading

    stop = stop or threading.Event()
    db = get_db(settings)
    celery = create_celery(settings)
    while not stop.is_set():
        try:
            reap(db, settings, celery)
            reconcile(db, settings, celery)
        except Exception:  # noqa: BLE001  (DB or broker down: try again next tick)
            log.warning("maintenance tick failed", exc_info=True)
        stop.wait(settings.reaper_interval_s)
