"""The job state machine: the only code that changes jobs.state.

queued -> running -> succeeded | failed | cancelled, plus running -> queued when a worker is
lost. Every transition is a single compare-and-set UPDATE guarded in SQL (`transition`; the
worker's claim and outcomes: `owned_update`, the same statement built once per shape) that
also takes the event's sequence number, and the INSERT of its job_events row, in one
statement on PostgreSQL (`update_with_event`) and always in the same transaction. A job is
a leased unit like any other
(app/leases.py): claim, heartbeat, attempt fencing and reaping are the shared lease code,
which changes a job's state only through `transition` here (the job lease's hook); a
worker's claim (`claim_job`) writes the same values and event as leases.claim itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Boolean, Integer, Table, bindparam, func, insert, literal, null, select, union_all, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from app import leases, notify
from app.broker import RUN_JOB
from app.models import TERMINAL_STATES, Job, JobEvent, JobState, UTCDateTime, utcnow
from app.stores import usage as usage_store
from app.stores.errors import Invalid

Q, R = JobState.queued, JobState.running


NEXT_SEQ = {"event_seq": Job.event_seq + 1}  # an UPDATE of jobs that also numbers the event it appends
_INSERT_EVENT = insert(cast(Table, JobEvent.__table__))  # add_event's, built once


def add_event(session: Session, job_id: int, seq: int, type_: str, data: dict[str, Any]) -> int:
    """Insert event `seq` (already taken from jobs.event_seq by the caller's UPDATE) and wake
    the job's watchers after commit; returns the seq."""
    row = {"job_id": job_id, "seq": seq, "ts": utcnow(), "type": type_, "data": data}
    session.connection().execute(_INSERT_EVENT, row)
    notify.touch(session, job_id)
    return seq


def append_event(session: Session, job_id: int, type_: str, data: dict[str, Any]) -> int:
    """Append an event with the job's next sequence number; returns the seq."""
    seq = session.execute(update(Job).where(Job.id == job_id).values(**NEXT_SEQ).returning(Job.event_seq)).scalar_one()
    return add_event(session, job_id, seq, type_, data)


def update_with_event(
    session: Session,
    job_id: int,
    where: Sequence[Any],
    values: dict[str, Any],
    type_: str,
    data: dict[str, Any],
    *,
    returning: tuple = (),
    with_attempt: bool = False,
) -> tuple[Any, ...] | None:
    """UPDATE the job (if `where` holds) and append its event numbered by that same UPDATE;
    `data` gains the job's "attempt" (after the update) when with_attempt. Returns (attempts,
    *returning), or None when nothing matched (and no event was added).

    On PostgreSQL this is ONE statement, a data-modifying CTE: WITH moved AS (UPDATE ...
    RETURNING ...), event AS (INSERT INTO job_events SELECT ... FROM moved) SELECT ... FROM
    moved. Elsewhere (SQLite) the UPDATE ... RETURNING and the INSERT are two statements."""
    moved_stmt = (
        update(Job).where(*where).values(**values, **NEXT_SEQ).returning(Job.attempts, Job.event_seq, *returning)
    )
    if session.get_bind().dialect.name != "postgresql":
        row = session.execute(moved_stmt).first()
        if row is None:
            return None
        attempts, seq, *rest = row
        add_event(session, job_id, seq, type_, {**data, "attempt": attempts} if with_attempt else data)
        return (attempts, *rest)
    moved = moved_stmt.cte("moved")
    payload: Any = bindparam("event_data", data, type_=JSONB())
    if with_attempt:
        payload = payload.op("||")(func.jsonb_build_object("attempt", moved.c.attempts))
    event = (
        insert(JobEvent)
        .from_select(
            ["job_id", "seq", "ts", "type", "data"],
            select(literal(job_id), moved.c.event_seq, literal(utcnow(), UTCDateTime()), literal(type_), payload),
        )
        .cte("event")
    )
    columns = [moved.c.attempts, *(moved.c[col.key] for col in returning)]
    row = session.execute(select(*columns).add_cte(event)).first()
    if row is None:
        return None
    notify.touch(session, job_id)
    return tuple(row)


# -- the worker's hot transitions: statements built once per shape ---------------------------
# `update_with_event` builds its statement from SQL expressions on every call; building (the
# CTE's column proxies, coercions) and the cache key of a new statement tree were most of a
# worker's CPU per no-op job. The claim, the progress and metric reports and the outcome of
# a running attempt use `owned_update` instead: the same statement, with every value a bound
# parameter, built once per shape (dialect, columns set, returning) and reused.

_JOBS = cast(Table, Job.__table__)
_SHAPES: dict[tuple[Any, ...], Any] = {}


def _build_owned_update(
    dialect: str,
    columns: tuple[tuple[str, bool], ...],
    by_attempt: bool,
    claim: bool,
    limited: bool,
    returning: tuple[str, ...],
    with_attempt: bool,
    with_before: bool,
    with_usage: bool,
) -> Any:
    c = _JOBS.c
    where = [c.id == bindparam("job_id"), c.state == bindparam("from_state", type_=c.state.type)]
    if by_attempt:
        where.append(c.attempts == bindparam("attempt"))
    # None is SQL NULL, as in .values(col=None) (a bound None would be JSON 'null' in a JSON column)
    values: dict[str, Any] = {
        name: null() if is_none else bindparam(f"set_{name}", type_=c[name].type) for name, is_none in columns
    }
    values["event_seq"] = c.event_seq + (2 if with_before else 1)
    if claim:
        values["attempts"] = c.attempts + 1
    if limited:  # a slot free under the job's tenant's limit on the job's queue (see claim_job)
        if dialect == "postgresql":  # lock, then count on a fresh snapshot (migration 0014)
            where.append(func.medmaas_claim_slot(c.tenant_id, c.queue, bindparam("max_running"), type_=Boolean()))
        else:  # SQLite serialises writers: the statement's own count is current
            other = _JOBS.alias("other")
            running = (
                select(func.count())
                .select_from(other)
                .where(
                    other.c.tenant_id == c.tenant_id,
                    other.c.queue == c.queue,
                    other.c.state == bindparam("running_state", R, type_=c.state.type),
                )
                .scalar_subquery()
            )
            where.append(running < bindparam("max_running"))
    moved_stmt = (
        update(_JOBS).where(*where).values(**values).returning(c.attempts, c.event_seq, *(c[n] for n in returning))
    )
    if dialect != "postgresql":
        return moved_stmt
    moved = moved_stmt.cte("moved")
    payload: Any = bindparam("event_data", type_=JSONB())
    if with_attempt:
        payload = payload.op("||")(func.jsonb_build_object("attempt", moved.c.attempts))
    events = cast(Table, JobEvent.__table__)
    job_id, ts = bindparam("event_job_id", type_=Integer()), bindparam("event_ts", type_=UTCDateTime())
    rows: Any = select(job_id, moved.c.event_seq, ts, bindparam("event_type", type_=events.c.type.type), payload)
    if with_before:  # the event that comes first takes the first of the two numbers
        first = select(
            job_id,
            moved.c.event_seq - 1,
            ts,
            bindparam("before_type", type_=events.c.type.type),
            bindparam("before_data", type_=JSONB()),
        )
        rows = union_all(first, rows)
    event = insert(events).from_select(["job_id", "seq", "ts", "type", "data"], rows).cte("event")
    ctes = (event, usage_store.upsert_after(moved)) if with_usage else (event,)
    return select(moved.c.attempts, *(moved.c[n] for n in returning)).add_cte(*ctes)


def owned_update(
    session: Session,
    job_id: int,
    *,
    from_state: JobState,
    values: dict[str, Any],
    type_: str,
    data: dict[str, Any],
    attempt: int | None = None,
    claim: bool = False,
    max_running: int | None = None,
    returning: tuple[str, ...] = (),
    with_attempt: bool = True,
    before: tuple[str, dict[str, Any]] | None = None,
    usage: list[dict[str, Any]] | None = None,
) -> tuple[Any, ...] | None:
    """`update_with_event` for the worker's hot paths, on a statement built once per shape: set
    `values` (plain values, no SQL expressions) on the job if it is in `from_state` (and at
    `attempt`), and append its event, whose data gains the job's "attempt" after the update
    when with_attempt. `before` (type, data) is one more event, appended just ahead of it by
    the same statement (an outcome carries the attempt's last progress report so). `usage`:
    rows from usage_store.counter_rows, added by the same statement if it matched (on SQLite
    by a second one).
    `claim` also bumps attempts; `max_running` adds claim_job's condition: a slot free under
    the job's tenant's limit of running jobs on its queue. Returns (attempts, *returning columns), or None when nothing matched."""
    dialect = session.get_bind().dialect.name
    columns = tuple((name, value is None) for name, value in values.items())
    key = (
        dialect,
        columns,
        attempt is not None,
        claim,
        max_running is not None,
        returning,
        with_attempt,
        before is not None,
        usage is not None,
    )
    stmt = _SHAPES.get(key)
    if stmt is None:
        stmt = _SHAPES.setdefault(key, _build_owned_update(*key))
    params: dict[str, Any] = {f"set_{name}": value for name, value in values.items() if value is not None}
    params.update(job_id=job_id, from_state=from_state)
    if attempt is not None:
        params["attempt"] = attempt
    if max_running is not None:
        params["max_running"] = max_running
    if dialect != "postgresql":
        row = session.connection().execute(stmt, params).first()
        if row is None:
            return None
        attempts, seq, *rest = row
        if before is not None:
            add_event(session, job_id, seq - 1, *before)
        add_event(session, job_id, seq, type_, {**data, "attempt": attempts} if with_attempt else data)
        if usage is not None:
            usage_store.upsert_rows(session, usage)
        return (attempts, *rest)
    params.update(event_job_id=job_id, event_ts=utcnow(), event_type=type_, event_data=data)
    if before is not None:
        params.update(before_type=before[0], before_data=before[1])
    if usage is not None:
        params.update(usage_store.after_params(usage))
    row = session.connection().execute(stmt, params).first()
    if row is None:
        return None
    notify.touch(session, job_id)
    return tuple(row)


def transition(
    session: Session,
    job_id: int,
    *,
    from_states: Iterable[JobState],
    to: JobState,
    attempt: int | None = None,
    extra_where: tuple = (),
    values: dict[str, Any] | None = None,
    event: dict[str, Any] | None = None,
    returning: tuple = (),
) -> Sequence[Any] | None:
    """The one state change: compare-and-set plus its event. Returns (attempts, *returning),
    or None when the job was not in from_states (or not at `attempt`)."""
    from_states = tuple(from_states)
    assert not (set(from_states) & TERMINAL_STATES), "terminal states never change"
    where = [Job.id == job_id, Job.state.in_(from_states), *extra_where]
    if attempt is not None:
        where.append(Job.attempts == attempt)
    return update_with_event(
        session,
        job_id,
        where,
        {"state": to, **(values or {})},
        "state",
        {"to": to.value, **(event or {})},
        returning=returning,
        with_attempt=True,
    )


def _transition(session: Session, job_id: int, **kw: Any) -> bool:
    return transition(session, job_id, **kw) is not None


class IdempotencyKeyReused(Invalid):
    """The tenant already used this Idempotency-Key for a different request (HTTP 422)."""

    default_code = "idempotency_key_reused"


def request_digest(kind: str, spec: Any, priority: int = 0, max_attempts: int | None = None) -> str:
    """A stable sha256 of a submitted request: the same kind, spec (key order ignored),
    priority and max_attempts give the same digest. It is taken over what the caller sent,
    not the normalised spec (defaults, resolved ids), so a retry matches even when, say, the
    latest version of a model has changed since."""
    canonical = json.dumps(
        {"kind": kind, "spec": spec, "priority": priority, "max_attempts": max_attempts},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def find_idempotent(session: Session, tenant_id: int, idempotency_key: str, request_sha256: str | None) -> Job | None:
    """The tenant's job submitted with this key, if any. IdempotencyKeyReused when that job was
    submitted with a different request (a job that recorded no digest matches any request)."""
    existing = session.scalar(select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key))
    if existing is None:
        return None
    if request_sha256 is not None and existing.request_sha256 not in (None, request_sha256):
        raise IdempotencyKeyReused(
            f"Idempotency-Key {idempotency_key!r} was already used for job {existing.id} with a different "
            "request (kind, spec, priority or max_attempts); send the same request to get that job back, "
            "or use a new key for a new job",
            details={"idempotency_key": idempotency_key, "job_id": existing.id},
        )
    return existing


def submit(
    session: Session,
    *,
    tenant_id: int,
    kind: str,
    spec: dict[str, Any],
    queue: str,
    priority: int = 0,
    max_attempts: int = 3,
    idempotency_key: str | None = None,
    request_sha256: str | None = None,
) -> tuple[Job, bool]:
    """Insert a queued job (and its first event). Returns (job, created).

    With an idempotency key, a second submit from the same tenant returns the first job, when
    its request_sha256 (request_digest of what was submitted) matches; with a different
    digest it raises IdempotencyKeyReused and stores nothing.
    The caller commits before publishing to the broker.
    """
    if idempotency_key:
        existing = find_idempotent(session, tenant_id, idempotency_key, request_sha256)
        if existing is not None:
            return existing, False
    job = Job(
        tenant_id=tenant_id,
        kind=kind,
        spec=spec,
        state=Q,
        queue=queue,
        priority=priority,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
        request_sha256=request_sha256 if idempotency_key else None,
        created_at=utcnow(),
        event_seq=1,  # its first event, appended below
        # Stamped now, published right after commit: if that publish fails, the reconciler
        # finds no broker message once the grace period has passed and publishes again.
        published_at=utcnow(),
    )
    if not idempotency_key:
        session.add(job)
        session.flush()
    else:
        try:
            with session.begin_nested():
                session.add(job)
                session.flush()
        except IntegrityError:
            # Lost a race with a concurrent submit carrying the same key.
            existing = find_idempotent(session, tenant_id, idempotency_key, request_sha256)
            if existing is None:
                raise
            return existing, False
    add_event(session, job.id, 1, "state", {"to": Q.value, "attempt": 0})
    return job, True


def claim(session: Session, job_id: int, worker: str) -> int | None:
    """queued -> running, atomically. Returns the attempt number, or None if another
    delivery (or a cancel) got there first."""
    row = leases.claim(session, LEASE, job_id, worker)
    return None if row is None else int(row[0])


# What a worker needs of the job it claimed, returned by the claim itself (no re-select).
CLAIMED_COLUMNS = (Job.tenant_id, Job.kind, Job.spec, Job.queue, Job.max_attempts, Job.started_at)
CLAIMED_NAMES = tuple(c.key for c in CLAIMED_COLUMNS)


@dataclass(frozen=True)
class Claimed:
    """A claim won: the attempt number and a detached snapshot of the job as claimed (id,
    tenant_id, kind, spec, queue, max_attempts, started_at, attempts); never added to a session."""

    attempt: int
    job: Job


# -- fairness: a tenant's running jobs per queue ---------------------------------------------


@dataclass(frozen=True)
class Waiting:
    """A claim put off: the job's tenant already runs its limit of jobs on the job's queue."""

    message: str


def waiting_message(limit: int, queue: str) -> str:
    return f"waiting: tenant at its limit of {limit} running jobs on queue {queue}"


def claim_job(session: Session, job_id: int, worker: str, max_running: int) -> Claimed | Waiting | None:
    """queued -> running for a worker, unless the job's tenant already runs `max_running` jobs
    on its queue (0: no limit). Then the job stays queued with the reason as its message and
    published_at cleared, so the maintenance tick's republish (`startable`) sends it again once
    a slot is free. None: another delivery (or a cancel) got there first.

    One UPDATE ... RETURNING (with its event's INSERT, on PostgreSQL in the same statement).
    Under a limit, two workers must never both take a tenant's last free slot: on PostgreSQL
    the UPDATE's condition medmaas_claim_slot (migration 0014) holds a per-tenant lock until
    the claim commits and counts after it was granted; SQLite serialises writers anyway."""
    # leases.claim for jobs (the same values and event), on a statement built once
    now = utcnow()
    got = owned_update(
        session,
        job_id,
        from_state=Q,
        values={"state": R, "worker": worker[:255], "heartbeat_at": now, "started_at": now, **LEASE.claim_values},
        type_="state",
        data={"to": R.value, "from": Q.value, "worker": worker},
        claim=True,
        max_running=max_running if max_running > 0 else None,
        returning=CLAIMED_NAMES,
    )
    if got is not None:
        attempt, tenant, kind, spec, job_queue, max_attempts, started_at = got
        job = Job(
            id=job_id,
            tenant_id=tenant,
            kind=kind,
            spec=spec,
            queue=job_queue,
            max_attempts=max_attempts,
            started_at=started_at,
            attempts=attempt,
            state=R,
        )
        return Claimed(int(attempt), job)
    if max_running <= 0:
        return None
    # Still queued, so its tenant had no free slot (claimed or cancelled meanwhile: None).
    waiting = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state == Q)
        .values(message=literal(waiting_message(max_running, queue="")) + Job.queue, published_at=None)
        .returning(Job.message)
    ).first()
    return Waiting(waiting[0]) if waiting is not None else None


def claim_within_limit(session: Session, job_id: int, worker: str, max_running: int) -> int | Waiting | None:
    """`claim_job`, returning just the attempt number of a claim won."""
    got = claim_job(session, job_id, worker, max_running)
    return got.attempt if isinstance(got, Claimed) else got


def to_publish(session: Session, grace_s: float, max_running: int) -> list[leases.Candidate]:
    """leases.to_publish for jobs, less those that could not start now (`startable`): a tenant
    at its limit has none, so its waiting jobs never crowd out other tenants' (the query is
    capped)."""
    where: tuple = ()
    if max_running > 0:
        other = aliased(Job)
        running = (
            select(func.count())
            .select_from(other)
            .where(other.tenant_id == Job.tenant_id, other.queue == Job.queue, other.state == R)
            .correlate(Job)
            .scalar_subquery()
        )
        where = (running < max_running,)
    return startable(session, leases.to_publish(session, LEASE, grace_s, where=where), max_running)


def startable(session: Session, candidates: list[leases.Candidate], max_running: int) -> list[leases.Candidate]:
    """The queued jobs among `candidates` (to be published) that could start now: per tenant
    and queue no more than its free slots, highest priority then oldest first. The others
    stay queued until a running job of theirs ends (0: no limit, all of them)."""
    if max_running <= 0 or not candidates:
        return candidates
    ids = [int(c.key[0]) for c in candidates]
    jobs: dict[int, tuple[int, int]] = {}  # id -> (tenant_id, priority)
    for i in range(0, len(ids), 1000):
        rows = session.execute(select(Job.id, Job.tenant_id, Job.priority).where(Job.id.in_(ids[i : i + 1000])))
        jobs.update({job_id: (tenant_id, priority) for job_id, tenant_id, priority in rows})
    tenants = {tenant_id for tenant_id, _ in jobs.values()}
    running = {
        (tenant_id, queue): n
        for tenant_id, queue, n in session.execute(
            select(Job.tenant_id, Job.queue, func.count())
            .where(Job.state == R, Job.tenant_id.in_(tenants))
            .group_by(Job.tenant_id, Job.queue)
        )
    }
    free: dict[tuple[int, str], int] = {}
    out = []
    known = [c for c in candidates if int(c.key[0]) in jobs]
    for c in sorted(known, key=lambda c: (-jobs[int(c.key[0])][1], int(c.key[0]))):
        slot = (jobs[int(c.key[0])][0], c.queue)
        left = free.setdefault(slot, max_running - running.get(slot, 0))
        if left > 0:
            out.append(c)
            free[slot] = left - 1
    return out


@dataclass(frozen=True)
class Report:
    """A progress report of a running attempt: the job's progress columns and its event."""

    fraction: float
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def values(self) -> dict[str, Any]:
        return {"progress": min(max(float(self.fraction), 0.0), 1.0), "message": self.message[:2000]}

    def event(self) -> dict[str, Any]:
        return {"progress": self.values()["progress"], "message": self.message, **self.data}


def report_progress(
    session: Session, job_id: int, attempt: int, progress: float, message: str = "", **data: Any
) -> bool:
    report = Report(progress, message, data)
    values = {**report.values(), "heartbeat_at": utcnow()}
    return _owned(session, job_id, attempt, values, "progress", report.event(), with_attempt=False)


def report_event(session: Session, job_id: int, attempt: int, type_: str, data: dict[str, Any]) -> bool:
    """A metric or log event from the running attempt."""
    return _owned(session, job_id, attempt, {}, type_, data, with_attempt=False)


def _owned(
    session: Session,
    job_id: int,
    attempt: int,
    values: dict[str, Any],
    type_: str,
    data: dict[str, Any],
    *,
    with_attempt: bool = True,
    last_report: Report | None = None,
    usage: list[dict[str, Any]] | None = None,
) -> bool:
    """A change by the running attempt `attempt` (owned_update from running); whether it applied.
    `last_report`: the attempt's last progress report, written by the same statement (its
    event first; the change's own values win over its columns). `usage`: the attempt's usage
    rows (usage_store.counter_rows), added only if the change applied."""
    before = None
    if last_report is not None:
        values = {**last_report.values(), **values}
        before = ("progress", last_report.event())
    found = owned_update(
        session,
        job_id,
        from_state=R,
        attempt=attempt,
        values=values,
        type_=type_,
        data=data,
        with_attempt=with_attempt,
        before=before,
        usage=usage or None,  # nothing metered: the statement without the usage part
    )
    return found is not None


def _finish_values(session: Session, job_id: int, started_at: datetime | None = None) -> dict[str, Any]:
    """finished_at and duration_s. The worker knows started_at from its claim (`Claimed.job`);
    others (the reaper) have it read here."""
    now = utcnow()
    started = started_at or session.scalar(select(Job.started_at).where(Job.id == job_id))
    return {"finished_at": now, "duration_s": (now - started).total_seconds() if started else None}


def succeed(
    session: Session,
    job_id: int,
    attempt: int,
    result: dict[str, Any],
    *,
    started_at: datetime | None = None,
    last_report: Report | None = None,
    usage: list[dict[str, Any]] | None = None,
) -> bool:
    values = {
        "state": JobState.succeeded,
        "result": result,
        "progress": 1.0,
        "message": "succeeded",
        **_finish_values(session, job_id, started_at),
    }
    event = {"to": JobState.succeeded.value, "from": R.value}
    return _owned(session, job_id, attempt, values, "state", event, last_report=last_report, usage=usage)


def fail(
    session: Session,
    job_id: int,
    attempt: int,
    error: str,
    *,
    started_at: datetime | None = None,
    last_report: Report | None = None,
    usage: list[dict[str, Any]] | None = None,
) -> bool:
    values = {
        "state": JobState.failed,
        "error": error[:10000],
        "message": "failed",
        **_finish_values(session, job_id, started_at),
    }
    event = {"to": JobState.failed.value, "from": R.value, "error": error[:2000]}
    return _owned(session, job_id, attempt, values, "state", event, last_report=last_report, usage=usage)


def mark_cancelled(
    session: Session,
    job_id: int,
    attempt: int,
    result: dict | None = None,
    *,
    started_at: datetime | None = None,
    last_report: Report | None = None,
    usage: list[dict[str, Any]] | None = None,
) -> bool:
    """The running attempt stopped cooperatively after a cancel request."""
    values = {
        "state": JobState.cancelled,
        "message": "cancelled",
        "result": result,
        **_finish_values(session, job_id, started_at),
    }
    event = {"to": JobState.cancelled.value, "from": R.value}
    return _owned(session, job_id, attempt, values, "state", event, last_report=last_report, usage=usage)


def request_cancel(session: Session, job_id: int) -> JobState:
    """Queued jobs are cancelled at once; running jobs get cancel_requested and stop
    between batches. Returns the state after the request."""
    now = utcnow()
    if _transition(
        session,
        job_id,
        from_states=[Q],
        to=JobState.cancelled,
        values={"cancel_requested": True, "finished_at": now, "message": "cancelled"},
        event={"from": Q.value, "reason": "cancel requested"},
    ):
        return JobState.cancelled
    running = (Job.id == job_id, Job.state == R, Job.cancel_requested.is_(False))
    values = {"cancel_requested": True, "message": "cancel requested"}
    if update_with_event(session, job_id, running, values, "cancel_requested", {}) is not None:
        return R
    return session.execute(select(Job.state).where(Job.id == job_id)).scalar_one()


def reap_stale(session: Session, timeout_s: float) -> list[leases.Reaped]:
    """Running jobs whose heartbeat is older than timeout: back to queued (attempts is bumped
    by the next claim), or failed with 'worker lost' once max_attempts is spent, or
    cancelled if a cancel was pending (app.leases.reap)."""
    return leases.reap(session, LEASE, timeout_s)


def _leave_values(session: Session, job_id: int, to: JobState, error: str | None) -> dict[str, Any]:
    """What a running job's row gets when its lease ends without success."""
    if to == Q:
        return {"worker": None, "message": f"{error}; re-queued" if error else "re-queued", "published_at": None}
    if to == JobState.failed:
        return {"error": (error or "failed")[:10000], "message": "failed", **_finish_values(session, job_id)}
    return {"message": "cancelled", **_finish_values(session, job_id)}


LEASE = leases.register(
    leases.LeaseKind(
        name="job",
        model=Job,
        claimable=Q,
        running=R,
        done=JobState.succeeded,
        failed=JobState.failed,
        cancelled=JobState.cancelled,
        task=RUN_JOB,
        key=(Job.id,),
        job_id=Job.id,
        claim_values={"error": None, "message": "started"},
        leave_values=_leave_values,
        transition=transition,
    )
)


def count_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    counts = {s.value: 0 for s in JobState}
    counts.update({state.value: n for state, n in rows})
    return counts
