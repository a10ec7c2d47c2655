r"""Score shards in SQL: created once per job, claimed with compare-and-set UPDATEs fenced by
the shard's attempt number, heartbeated while they run, and reaped when their worker dies.

    pending --claim--> running --finish--> done
       ^                  |  \--release (error, stop; attempts left)--> pending
       |                  |   \-release (error, attempts spent)-------> failed
       +--stale heartbeat-+
    pending | running --cancel_shards (job cancelled / failed)--> cancelled

Each pending shard is also a Celery message (SCORE_SHARD, args [job_id, index]) on the
job's queue; a duplicate or late message loses the claim and does nothing.
"""
from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable, Optional

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.broker import SCORE_SHARD
from app.config import Settings
from app.models import Job, JobState, ScoreShard, ShardState, utcnow

log = logging.getLogger(__name__)

P, R = ShardState.pending, ShardState.running


@dataclass(frozen=True)
class Claim:
    id: int
    job_id: int
    index: int
    start_row: int
    stop_row: int
    offset: Optional[int]
    attempt: int


def job_dir(settings: Settings, tenant_id: int, job_id: int) -> Path:
    """The job's artifact directory (the same path JobContext.job_dir() creates)."""
    return settings.artifacts / f"tenant-{tenant_id}" / "jobs" / str(job_id)


def scratch_dir(settings: Settings, tenant_id: int, job_id: int) -> Path:
    """Shard part files and the decompressed library: deleted when the job ends."""
    return job_dir(settings, tenant_id, job_id) / "score-work"


# -- creation and claims -------------------------------------------------------------------

def create_shards(session: Session, job_id: int, blocks: Iterable[tuple[int, int, Optional[int]]]) -> bool:
    """Insert one pending shard per (start_row, stop_row, byte offset) unless the job already
    has shards (a re-run parent keeps them). Returns True if this call created them."""
    if session.scalar(select(func.count()).select_from(ScoreShard).where(ScoreShard.job_id == job_id)):
        return False
    try:
        with session.begin_nested():
            session.add_all(ScoreShard(job_id=job_id, index=i, start_row=start, stop_row=stop, offset=offset,
                                       state=P, attempts=0, rows_done=0, stats={})
                            for i, (start, stop, offset) in enumerate(blocks))
            session.flush()
    except IntegrityError:  # a concurrent attempt created them first
        return False
    return True


def _claim_where(session: Session, where: list, worker: str) -> Optional[Claim]:
    now = utcnow()
    row = session.execute(
        update(ScoreShard).where(*where, ScoreShard.state == P)
        .values(state=R, attempts=ScoreShard.attempts + 1, worker=worker[:255], heartbeat_at=now, started_at=now,
                finished_at=None, rows_done=0, error=None)
        .returning(ScoreShard.id, ScoreShard.job_id, ScoreShard.index, ScoreShard.start_row, ScoreShard.stop_row,
                   ScoreShard.offset, ScoreShard.attempts)
    ).first()
    return Claim(*row) if row is not None else None


def claim(session: Session, job_id: int, index: int, worker: str) -> Optional[Claim]:
    """pending -> running for one shard, atomically; None if another worker got it first."""
    return _claim_where(session, [ScoreShard.job_id == job_id, ScoreShard.index == index], worker)


def claim_next(session: Session, job_id: int, worker: str) -> Optional[Claim]:
    """The lowest-numbered pending shard of the job, or None when none is left."""
    while True:
        row = session.execute(
            select(ScoreShard.id).where(ScoreShard.job_id == job_id, ScoreShard.state == P)
            .order_by(ScoreShard.index).limit(1)
        ).first()
        if row is None:
            return None
        got = _claim_where(session, [ScoreShard.id == row[0]], worker)
        if got is not None:
            return got
        # lost the race for that one; try the next


def _owned(shard_id: int, attempt: int) -> tuple:
    return (ScoreShard.id == shard_id, ScoreShard.state == R, ScoreShard.attempts == attempt)


def heartbeat(session: Session, shard_id: int, attempt: int, rows_done: int) -> bool:
    """False once this attempt no longer owns the shard (reaped, cancelled)."""
    res = session.execute(update(ScoreShard).where(*_owned(shard_id, attempt))
                          .values(heartbeat_at=utcnow(), rows_done=rows_done))
    return res.rowcount == 1


def finish(session: Session, shard_id: int, attempt: int, *, rows: int, valid: int, output_uri: str,
           stats: dict[str, Any]) -> bool:
    res = session.execute(update(ScoreShard).where(*_owned(shard_id, attempt)).values(
        state=ShardState.done, finished_at=utcnow(), heartbeat_at=utcnow(), rows=rows, valid=valid,
        rows_done=rows, output_uri=output_uri, stats=stats, error=None))
    return res.rowcount == 1


def release(session: Session, shard_id: int, attempt: int, *, error: Optional[str] = None,
            max_attempts: Optional[int] = None) -> Optional[ShardState]:
    """running -> pending (or failed when an error used up max_attempts). None if not owned."""
    to = P
    if error is not None and max_attempts is not None and attempt >= max_attempts:
        to = ShardState.failed
    res = session.execute(update(ScoreShard).where(*_owned(shard_id, attempt)).values(
        state=to, worker=None, rows_done=0, error=error[:10000] if error else None,
        finished_at=utcnow() if to == ShardState.failed else None, published_at=None))
    return to if res.rowcount == 1 else None


def release_stale(session: Session, timeout_s: float, job_id: Optional[int] = None
                  ) -> list[tuple[int, int, str, JobState, ShardState]]:
    """Running shards of unfinished jobs whose heartbeat is older than timeout_s go back to
    pending (or to failed, 'worker lost', once the job's max_attempts are spent).
    Returns (job_id, index, queue, job state, new shard state) for each."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    q = (select(ScoreShard.id, ScoreShard.job_id, ScoreShard.index, ScoreShard.attempts, Job.max_attempts,
                Job.queue, Job.state)
         .join(Job, Job.id == ScoreShard.job_id)
         .where(ScoreShard.state == R, ScoreShard.heartbeat_at < cutoff,
                Job.state.in_([JobState.queued, JobState.running])))
    if job_id is not None:
        q = q.where(ScoreShard.job_id == job_id)
    out = []
    for sid, jid, index, attempts, max_attempts, queue, jstate in session.execute(q).all():
        to = ShardState.failed if attempts >= max_attempts else P
        res = session.execute(update(ScoreShard).where(*_owned(sid, attempts), ScoreShard.heartbeat_at < cutoff)
                              .values(state=to, worker=None, rows_done=0, published_at=None,
                                      error="worker lost" if to == ShardState.failed else None,
                                      finished_at=utcnow() if to == ShardState.failed else None))
        if res.rowcount == 1:
            log.warning("score job %s shard %s: worker lost; now %s", jid, index, to.value)
            out.append((jid, index, queue, jstate, to))
    return out


def cancel_shards(session: Session, job_id: int) -> int:
    """Every pending or running shard of the job -> cancelled (running ones stop at their next
    heartbeat or batch)."""
    res = session.execute(update(ScoreShard).where(ScoreShard.job_id == job_id, ScoreShard.state.in_([P, R]))
                          .values(state=ShardState.cancelled, finished_at=utcnow()))
    return res.rowcount


def shards_of(session: Session, job_id: int) -> list[ScoreShard]:
    return list(session.scalars(select(ScoreShard).where(ScoreShard.job_id == job_id).order_by(ScoreShard.index)))


def summary(session: Session, job_id: int) -> dict[str, Any]:
    """Counts by state, molecules done (finished rows plus running shards' progress), and
    the first failed shard's error."""
    rows = session.execute(
        select(ScoreShard.state, func.count(), func.coalesce(func.sum(ScoreShard.rows_done), 0),
               func.coalesce(func.sum(ScoreShard.stop_row - ScoreShard.start_row), 0))
        .where(ScoreShard.job_id == job_id).group_by(ScoreShard.state)
    ).all()
    out: dict[str, Any] = {s.value: 0 for s in ShardState}
    done_rows = total_rows = 0
    for state, n, rows_done, size in rows:
        out[state.value] = int(n)
        done_rows += int(size) if state == ShardState.done else int(rows_done)
        total_rows += int(size)
    out["shards"] = sum(out[s.value] for s in ShardState)
    out["rows_done"], out["rows_total"] = done_rows, total_rows
    out["error"] = None
    if out["failed"]:
        out["error"] = session.execute(
            select(ScoreShard.index, ScoreShard.error)
            .where(ScoreShard.job_id == job_id, ScoreShard.state == ShardState.failed)
            .order_by(ScoreShard.index).limit(1)).first()
    return out


# -- the broker ------------------------------------------------------------------------------

def shard_task_id(job_id: int, index: int) -> str:
    # Not "job-<id>-...": the job reconciler must not mistake a shard message for the job's own.
    return f"shard-{job_id}-{index}-{uuid.uuid4().hex[:8]}"


def parse_shard_task_id(task_id: str) -> Optional[tuple[int, int]]:
    parts = task_id.split("-")
    if len(parts) == 4 and parts[0] == "shard" and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]), int(parts[2])
    return None


def publish_shards(celery: Any, db: Any, items: Iterable[tuple[int, int, str]]) -> int:
    """Send (job_id, index, queue) shard messages; stamp published_at. A broker failure is
    logged and left to the reconciler (the parent job also works through pending shards)."""
    from kombu import Exchange, Queue

    sent: list[tuple[int, int]] = []
    for job_id, index, queue in items:
        try:
            celery.send_task(SCORE_SHARD, args=[job_id, index], queue=queue, task_id=shard_task_id(job_id, index),
                             declare=[Queue(queue, Exchange(queue, type="direct"), routing_key=queue)])
        except Exception:  # noqa: BLE001
            log.warning("publishing score shard %s/%s failed; the reconciler retries", job_id, index, exc_info=True)
            break
        sent.append((job_id, index))
    if sent:
        with db.session() as s:
            stamp_published(s, sent)
    return len(sent)


def stamp_published(session: Session, keys: Iterable[tuple[int, int]]) -> None:
    """published_at = now for pending shards given as (job_id, index), one UPDATE per job."""
    by_job: dict[int, list[int]] = {}
    for job_id, index in keys:
        by_job.setdefault(job_id, []).append(index)
    now = utcnow()
    for job_id, indices in by_job.items():
        for i in range(0, len(indices), 1000):
            session.execute(update(ScoreShard).where(
                ScoreShard.job_id == job_id, ScoreShard.index.in_(indices[i:i + 1000]), ScoreShard.state == P,
            ).values(published_at=now))


def shards_in_broker(redis_client: Any, queues: Iterable[str]) -> set[tuple[int, int]]:
    """(job_id, index) of shard messages waiting in a queue or delivered but not yet acked."""
    raw: list[bytes] = []
    for queue in queues:
        for key in redis_client.scan_iter(match=f"{queue}*", count=1000):
            key_s = key.decode() if isinstance(key, bytes) else key
            if (key_s == queue or key_s.startswith(f"{queue}\x06\x16")) and redis_client.type(key) in (b"list", "list"):
                raw.extend(redis_client.lrange(key, 0, -1))
    raw.extend(redis_client.hvals("unacked"))
    found: set[tuple[int, int]] = set()
    for item in raw:
        try:
            payload = json.loads(item)
            if isinstance(payload, list):
                payload = payload[0]
            key = parse_shard_task_id(payload.get("headers", {}).get("id", ""))
        except (ValueError, AttributeError, IndexError, TypeError):
            continue
        if key is not None:
            found.add(key)
    return found


# -- maintenance (called from workers.tasks.reap / reconcile) -------------------------------

def reap_shards(db: Any, settings: Settings, celery: Any) -> int:
    """Stale shards back to pending (republished while their job runs); shards of jobs that
    ended cancelled or failed are cancelled and their scratch files deleted."""
    import shutil

    with db.session() as s:
        released = release_stale(s, settings.heartbeat_timeout_s)
        ended = s.execute(
            update(ScoreShard).where(
                ScoreShard.state.in_([P, R]),
                ScoreShard.job_id.in_(select(Job.id).where(Job.state.in_([JobState.cancelled, JobState.failed]))))
            .values(state=ShardState.cancelled, finished_at=utcnow()).returning(ScoreShard.job_id)
        ).scalars().all()
        ended_jobs = s.execute(select(Job.id, Job.tenant_id).where(Job.id.in_(set(ended)))).all() if ended else []
    for job_id, tenant_id in ended_jobs:
        shutil.rmtree(scratch_dir(settings, tenant_id, job_id), ignore_errors=True)
    publish_shards(celery, db, [(j, i, q) for j, i, q, js, to in released if to == P and js == JobState.running])
    return len(released)


def reconcile_shards(db: Any, settings: Settings, celery: Any, queues: Iterable[str]) -> int:
    """Republish pending shards of running jobs whose message the broker lost."""
    import redis

    cutoff = utcnow() - timedelta(seconds=settings.requeue_grace_s)
    with db.session() as s:
        candidates = s.execute(
            select(ScoreShard.job_id, ScoreShard.index, Job.queue).join(Job, Job.id == ScoreShard.job_id)
            .where(ScoreShard.state == P, Job.state == JobState.running,
                   (ScoreShard.published_at.is_(None)) | (ScoreShard.published_at < cutoff))
            .order_by(ScoreShard.job_id, ScoreShard.index).limit(10_000)
        ).all()
    if not candidates:
        return 0
    client = redis.Redis.from_url(settings.broker_url)
    try:
        present = shards_in_broker(client, queues)
    finally:
        client.close()
    with db.session() as s:  # still queued: restart their grace clock
        stamp_published(s, [(j, i) for j, i, _ in candidates if (j, i) in present])
    missing = [(j, i, q) for j, i, q in candidates if (j, i) not in present]
    if missing:
        log.warning("republishing %d score shards missing from the broker", len(missing))
    return publish_shards(celery, db, missing)
