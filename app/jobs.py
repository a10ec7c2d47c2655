"""The job state machine: the only code that changes jobs.state.

queued -> running -> succeeded | failed | cancelled, plus running -> queued when a worker is
lost. Every transition is a single compare-and-set UPDATE guarded in SQL, and appends a
job_events row in the same transaction. Running jobs are fenced by their attempt number:
a worker whose attempt was taken away (reaped) can no longer report or finish.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterable, Optional

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import notify
from app.models import TERMINAL_STATES, Job, JobEvent, JobState, utcnow

Q, R = JobState.queued, JobState.running


def append_event(session: Session, job_id: int, type_: str, data: dict[str, Any]) -> int:
    """Append an event with the job's next sequence number; returns the seq."""
    seq = session.execute(
        update(Job).where(Job.id == job_id).values(event_seq=Job.event_seq + 1).returning(Job.event_seq)
    ).scalar_one()
    session.add(JobEvent(job_id=job_id, seq=seq, ts=utcnow(), type=type_, data=data))
    session.flush()
    notify.touch(session, job_id)
    return seq


def _transition(
    session: Session,
    job_id: int,
    *,
    from_states: Iterable[JobState],
    to: JobState,
    attempt: Optional[int] = None,
    extra_where: tuple = (),
    values: Optional[dict[str, Any]] = None,
    event: Optional[dict[str, Any]] = None,
) -> bool:
    from_states = tuple(from_states)
    assert not (set(from_states) & TERMINAL_STATES), "terminal states never change"
    where = [Job.id == job_id, Job.state.in_(from_states), *extra_where]
    if attempt is not None:
        where.append(Job.attempts == attempt)
    row = session.execute(
        update(Job).where(*where).values(state=to, **(values or {})).returning(Job.attempts)
    ).first()
    if row is None:
        return False
    data = {"to": to.value, "attempt": row[0], **(event or {})}
    append_event(session, job_id, "state", data)
    return True


def submit(
    session: Session,
    *,
    tenant_id: int,
    kind: str,
    spec: dict[str, Any],
    queue: str,
    priority: int = 0,
    max_attempts: int = 3,
    idempotency_key: Optional[str] = None,
) -> tuple[Job, bool]:
    """Insert a queued job (and its first event). Returns (job, created).

    With an idempotency key, a second submit from the same tenant returns the first job.
    The caller commits before publishing to the broker.
    """
    if idempotency_key:
        existing = session.scalar(
            select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
        )
        if existing is not None:
            return existing, False
    job = Job(
        tenant_id=tenant_id, kind=kind, spec=spec, state=Q, queue=queue, priority=priority,
        max_attempts=max_attempts, idempotency_key=idempotency_key, created_at=utcnow(), event_seq=0,
        # Stamped now, published right after commit: if that publish fails, the reconciler
        # finds no broker message once the grace period has passed and publishes again.
        published_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(job)
            session.flush()
    except IntegrityError:
        # Lost a race with a concurrent submit carrying the same key.
        existing = session.scalar(
            select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)
        )
        if existing is None:
            raise
        return existing, False
    append_event(session, job.id, "state", {"to": Q.value, "attempt": 0})
    return job, True


def claim(session: Session, job_id: int, worker: str) -> Optional[int]:
    """queued -> running, atomically. Returns the attempt number, or None if another
    delivery (or a cancel) got there first."""
    now = utcnow()
    ok = _transition(
        session, job_id, from_states=[Q], to=R,
        values={"attempts": Job.attempts + 1, "started_at": now, "heartbeat_at": now, "worker": worker,
                "error": None, "message": "started"},
        event={"from": Q.value, "worker": worker},
    )
    if not ok:
        return None
    return session.scalar(select(Job.attempts).where(Job.id == job_id))


def heartbeat(session: Session, job_id: int, attempt: int) -> Optional[bool]:
    """Refresh heartbeat_at. Returns cancel_requested, or None if this attempt lost the job."""
    row = session.execute(
        update(Job).where(Job.id == job_id, Job.state == R, Job.attempts == attempt)
        .values(heartbeat_at=utcnow()).returning(Job.cancel_requested)
    ).first()
    return None if row is None else bool(row[0])


def report_progress(
    session: Session, job_id: int, attempt: int, progress: float, message: str = "", **data: Any
) -> bool:
    progress = min(max(float(progress), 0.0), 1.0)
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.state == R, Job.attempts == attempt)
        .values(progress=progress, message=message[:2000], heartbeat_at=utcnow())
    )
    if res.rowcount != 1:
        return False
    append_event(session, job_id, "progress", {"progress": progress, "message": message, **data})
    return True


def report_event(session: Session, job_id: int, attempt: int, type_: str, data: dict[str, Any]) -> bool:
    """A metric or log event from the running attempt."""
    owned = session.scalar(select(Job.id).where(Job.id == job_id, Job.state == R, Job.attempts == attempt))
    if owned is None:
        return False
    append_event(session, job_id, type_, data)
    return True


def _finish_values(session: Session, job_id: int) -> dict[str, Any]:
    now = utcnow()
    started = session.scalar(select(Job.started_at).where(Job.id == job_id))
    return {"finished_at": now, "duration_s": (now - started).total_seconds() if started else None}


def succeed(session: Session, job_id: int, attempt: int, result: dict[str, Any]) -> bool:
    return _transition(
        session, job_id, from_states=[R], to=JobState.succeeded, attempt=attempt,
        values={"result": result, "progress": 1.0, "message": "succeeded", **_finish_values(session, job_id)},
        event={"from": R.value},
    )


def fail(session: Session, job_id: int, attempt: int, error: str) -> bool:
    return _transition(
        session, job_id, from_states=[R], to=JobState.failed, attempt=attempt,
        values={"error": error[:10000], "message": "failed", **_finish_values(session, job_id)},
        event={"from": R.value, "error": error[:2000]},
    )


def mark_cancelled(session: Session, job_id: int, attempt: int, result: Optional[dict] = None) -> bool:
    """The running attempt stopped cooperatively after a cancel request."""
    return _transition(
        session, job_id, from_states=[R], to=JobState.cancelled, attempt=attempt,
        values={"message": "cancelled", "result": result, **_finish_values(session, job_id)},
        event={"from": R.value},
    )


def request_cancel(session: Session, job_id: int) -> JobState:
    """Queued jobs are cancelled at once; running jobs get cancel_requested and stop
    between batches. Returns the state after the request."""
    now = utcnow()
    if _transition(
        session, job_id, from_states=[Q], to=JobState.cancelled,
        values={"cancel_requested": True, "finished_at": now, "message": "cancelled"},
        event={"from": Q.value, "reason": "cancel requested"},
    ):
        return JobState.cancelled
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.state == R, Job.cancel_requested.is_(False))
        .values(cancel_requested=True, message="cancel requested")
    )
    if res.rowcount == 1:
        append_event(session, job_id, "cancel_requested", {})
    return session.scalar(select(Job.state).where(Job.id == job_id))


@dataclass
class Reaped:
    job_id: int
    queue: str
    state: JobState


def reap_stale(session: Session, timeout_s: float) -> list[Reaped]:
    """Running jobs whose heartbeat is older than timeout: back to queued (attempts is bumped
    by the next claim), or failed with 'worker lost' once max_attempts is spent, or
    cancelled if a cancel was pending."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    stale = session.execute(
        select(Job.id, Job.attempts, Job.max_attempts, Job.queue, Job.cancel_requested)
        .where(Job.state == R, Job.heartbeat_at < cutoff)
    ).all()
    out: list[Reaped] = []
    for job_id, attempts, max_attempts, queue, cancel_requested in stale:
        guard = (Job.heartbeat_at < cutoff,)
        event = {"from": R.value, "reason": "worker lost"}
        if cancel_requested:
            to, values = JobState.cancelled, {"message": "cancelled", **_finish_values(session, job_id)}
        elif attempts >= max_attempts:
            to = JobState.failed
            values = {"error": "worker lost", "message": "failed", **_finish_values(session, job_id)}
        else:
            to, values = Q, {"worker": None, "message": "worker lost; re-queued", "published_at": None}
        if _transition(session, job_id, from_states=[R], to=to, attempt=attempts, extra_where=guard,
                       values=values, event=event):
            out.append(Reaped(job_id, queue, to))
    return out


def unpublished_queued(session: Session, grace_s: float, limit: int = 10_000) -> list[tuple[int, str]]:
    """Queued jobs never published, or published longer ago than the grace period."""
    cutoff = utcnow() - timedelta(seconds=grace_s)
    rows = session.execute(
        select(Job.id, Job.queue).where(
            Job.state == Q, (Job.published_at.is_(None) & (Job.created_at < cutoff)) | (Job.published_at < cutoff)
        ).order_by(Job.id).limit(limit)
    ).all()
    return [(r[0], r[1]) for r in rows]


def mark_published(session: Session, job_ids: Iterable[int], when: Optional[datetime] = None) -> None:
    ids = list(job_ids)
    if ids:
        session.execute(update(Job).where(Job.id.in_(ids), Job.state == Q).values(published_at=when or utcnow()))


def count_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    counts = {s.value: 0 for s in JobState}
    counts.update({state.value: n for state, n in rows})
    return counts
