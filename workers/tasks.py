"""Celery entry points (claim a job, run its kind under a lease, record the outcome; score
one shard), plus the maintenance tick that `medmaas beat` runs: reap stale leases of every
kind, clean up ended jobs' scratch, republish what the broker lost."""

from __future__ import annotations

import gc
import logging
import os
import socket
import sys
import traceback
from typing import Any

from celery import Celery
from sqlalchemy import select

from app import dispatch, jobs, leases
from app.broker import RUN_JOB, SCORE_SHARD, create_celery
from app.config import Settings
from app.db import Database
from app.models import TERMINAL_STATES, Job
from app.notify import EventHub, Notifier
from workers.kinds import kind_for
from workers.runtime import JobCancelled, JobContext, JobLost, remove_scratch

log = logging.getLogger(__name__)

_db: Database | None = None
_hub: EventHub | None = None
_hub_url: str | None = None


def get_db(settings: Settings) -> Database:
    """One engine per process, created after any fork."""
    global _db
    if _db is None or _db.url != settings.sqlalchemy_url:
        _db = Database(settings.sqlalchemy_url, notifier=Notifier(settings.broker_url))
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
    ctx = JobContext(
        db, settings, job_id, attempt, job.tenant_id, job.spec, celery=celery, worker=worker, hub=get_hub(settings)
    )
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
    except Exception as exc:
        log.exception("job %s failed", job_id)
        message = f"{type(exc).__name__}: {exc}"
        cancelled = ctx.should_stop(poll_s=0) and not ctx.lost  # cancelled while failing: cancel wins
        with db.session() as s:
            if cancelled:
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
        from workers.scoring.runner import run_shard_task

        return run_shard_task(get_db(settings), settings, celery, int(job_id), int(index), worker_name())


def worker_celery(settings: Settings) -> Celery:
    """The Celery app a worker process runs: the client configuration plus the tasks."""
    celery = create_celery(settings)
    register_tasks(celery, settings)
    return celery


def run_maintenance_forever(settings: Settings, stop: Any = None) -> None:
    """The `beat` loop, every reaper_interval_s: reap stale leases, then republish.
    Runs as its own process (or a thread in standalone); both steps are idempotent, so
    running two by mistake is harmless."""
    import threading

    stop = stop or threading.Event()
    db = get_db(settings)
    celery = create_celery(settings)
    while not stop.is_set():
        try:
            reap(db, settings)
            reconcile(db, settings, celery)
        except Exception:
            log.warning("maintenance tick failed", exc_info=True)
        stop.wait(settings.reaper_interval_s)
