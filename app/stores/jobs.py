"""Jobs: look-ups, the list (filters, keyset paging), state counts, events, cancel and
submit (validate with the kind's spec, commit, then publish)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, cast

from marshmallow import ValidationError
from sqlalchemy import Row, Select, Table, bindparam, func, select
from sqlalchemy import delete as delete_rows
from sqlalchemy.orm import Session

from app import dispatch, workers_registry
from app import jobs as state_machine
from app.artifacts import job_dir
from app.broker import queue_names
from app.config import Settings
from app.db import Database
from app.kinds import KindSpec, SpecError, SubmitContext, all_kinds
from app.models import TERMINAL_STATES, Dataset, Job, JobEvent, JobState, ModelVersion, ScoreShard, ShardState
from app.notify import EventHub
from app.stores import erasure
from app.stores.errors import Conflict, NotFound
from app.stores.paging import cursor_page

STATES = [s.value for s in JobState]
# Kinds the jobs list and the state counts leave out unless asked for: every online
# prediction is a job, and they would bury the training and scoring jobs. Still readable by id.
HIDDEN_KINDS = ("predict",)


def get(session: Session, tenant_id: int, job_id: int) -> Job:
    """The tenant's job; another tenant's id is indistinguishable from a missing one."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))
    if job is None:
        raise NotFound(f"Job {job_id} not found")
    return job


_JOBS = cast(Table, Job.__table__)
_READ_STATEMENTS: dict[tuple[str, ...], Select[Any]] = {}


def read(session: Session, tenant_id: int, job_id: int, columns: Iterable[str]) -> Row[Any]:
    """`get` for a reader that only serialises the job: these columns of the tenant's job as
    one Core row (a statement built once per column set, no ORM loading or identity map);
    NotFound as `get`."""
    names = tuple(columns)
    stmt = _READ_STATEMENTS.get(names)
    if stmt is None:
        stmt = select(*(_JOBS.c[name] for name in names)).where(
            _JOBS.c.id == bindparam("job_id"), _JOBS.c.tenant_id == bindparam("tenant_id")
        )
        _READ_STATEMENTS[names] = stmt
    row = session.connection().execute(stmt, {"job_id": job_id, "tenant_id": tenant_id}).first()
    if row is None:
        raise NotFound(f"Job {job_id} not found")
    return row


def _listed(q: Any, kind: str | None, include_hidden: bool) -> Any:
    """Filter a jobs query by kind: the named kind (hidden ones too), else every kind but the
    HIDDEN_KINDS unless include_hidden."""
    if kind is not None:
        return q.where(Job.kind == kind)
    if not include_hidden:
        return q.where(Job.kind.not_in(HIDDEN_KINDS))
    return q


def list_page(
    session: Session,
    tenant_id: int,
    *,
    state: str | None = None,
    kind: str | None = None,
    limit: int = 50,
    cursor: int | None = None,
    include_hidden: bool = False,
    tag: str | None = None,
    model: str | None = None,
    search: str | None = None,
) -> dict[str, Any]:
    """{"items", "next_cursor"}: the tenant's jobs newest first, filtered by state and kind
    (and by tag, model and a search in the spec: app.stores.lifecycle.filtered). Without a
    kind, online predict jobs (HIDDEN_KINDS) are left out unless include_hidden."""
    from app.stores.lifecycle import filtered

    q = select(Job).where(Job.tenant_id == tenant_id)
    if state is not None:
        q = q.where(Job.state == JobState(state))
    q = _listed(q, kind, include_hidden)
    q = filtered(session, q, tag=tag, model=model, search=search)
    return cursor_page(session, q, Job.id, limit, cursor)


def state_counts(
    session: Session, tenant_id: int, *, kind: str | None = None, include_hidden: bool = False
) -> dict[str, int]:
    """Jobs per state, every state present (0 when none); the same kinds list_page lists."""
    q = _listed(select(Job.state, func.count()).where(Job.tenant_id == tenant_id), kind, include_hidden)
    rows = session.execute(q.group_by(Job.state)).all()
    counts = dict.fromkeys(STATES, 0)
    counts.update({state.value: n for state, n in rows})
    return counts


def kinds_used(session: Session, tenant_id: int) -> list[str]:
    """The kinds the tenant has jobs of (also kinds no longer registered)."""
    return sorted(session.scalars(select(Job.kind).where(Job.tenant_id == tenant_id).distinct()).all())


def events_after(session: Session, tenant_id: int, job_id: int, after: int = 0, limit: int = 1000) -> dict[str, Any]:
    """{"items": events with seq > after in order, "last_seq", "state": the job's state}."""
    job = get(session, tenant_id, job_id)
    rows = list(
        session.scalars(
            select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.seq > after).order_by(JobEvent.seq).limit(limit)
        ).all()
    )
    return {"items": rows, "last_seq": rows[-1].seq if rows else after, "state": job.state.value}


def succeeded(session: Session, tenant_id: int, job_id: int) -> Job:
    """The job, once it has succeeded (its result is available); Conflict before."""
    job = get(session, tenant_id, job_id)
    if job.state != JobState.succeeded:
        raise Conflict(f"Job {job_id} is {job.state.value}; its result is not available", "not_ready")
    return job


def request_cancel(session: Session, tenant_id: int, job_id: int) -> tuple[Job, JobState]:
    """Cancel (queued: at once; running: between batches) and commit. Returns the job and
    its state after the request; Conflict when it has already finished."""
    job = get(session, tenant_id, job_id)
    if job.state in TERMINAL_STATES:
        raise Conflict(f"Job {job_id} already {job.state.value}")
    state = state_machine.request_cancel(session, job.id)
    session.commit()
    session.refresh(job)
    return job, state


def validate(
    session: Session, settings: Settings, tenant_id: int, kind_name: str, spec: dict[str, Any]
) -> tuple[KindSpec, dict[str, Any], str]:
    """(kind, normalised spec, queue), or a SpecError naming the problem."""
    kinds = all_kinds()
    kind = kinds.get(kind_name)
    if kind is None or not kind.submittable:
        names = sorted(k for k, v in kinds.items() if v.submittable)
        raise SpecError(f"Unknown job kind {kind_name!r}; known kinds: {', '.join(names)}", "unknown_kind")
    try:
        normalised = kind.schema().load(spec)
    except ValidationError as exc:
        raise SpecError(f"Invalid spec for kind {kind_name!r}", "invalid_spec", {"spec": exc.messages}) from exc
    if kind.check is not None:
        ctx = SubmitContext(session, tenant_id, settings, lambda: workers_registry.live_queues_at(settings.broker_url))
        normalised = kind.check(normalised, ctx)
    queue = kind.route(normalised, settings)
    if queue not in queue_names(settings):
        raise SpecError(f"Unknown queue {queue!r}", "invalid_spec", {"spec": {"queue": queue_names(settings)}})
    return kind, normalised, queue


def create(
    session: Session,
    settings: Settings,
    tenant_id: int,
    kind: str,
    spec: dict[str, Any],
    *,
    priority: int = 0,
    max_attempts: int | None = None,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Validate and commit a queued job (not yet published). Returns (job, created).

    With an idempotency key seen before: the same request (kind, spec, priority and
    max_attempts as submitted) gives the tenant's existing job and False, checked before
    validation so a retry gets its job back even if the spec would no longer validate; a
    different request raises IdempotencyKeyReused (422) and stores nothing."""
    digest = None
    if idempotency_key:
        digest = state_machine.request_digest(kind, spec, priority, max_attempts)
        existing = state_machine.find_idempotent(session, tenant_id, idempotency_key, digest)
        if existing is not None:
            return existing, False
    _kind, normalised, queue = validate(session, settings, tenant_id, kind, spec)
    try:
        lock_references(session, tenant_id, normalised)
    except SpecError:
        session.rollback()
        raise
    job, created = state_machine.submit(
        session,
        tenant_id=tenant_id,
        kind=kind,
        spec=normalised,
        queue=queue,
        priority=priority,
        max_attempts=max_attempts or settings.default_max_attempts,
        idempotency_key=idempotency_key,
        request_sha256=digest,
    )
    if created and normalised.get("notes"):  # e.g. what could not be checked at submit
        job.message = "; ".join(normalised["notes"])[:2000]
    session.commit()  # durable before the broker hears of it
    return job, created


def submit(
    session: Session,
    celery: Any,
    db: Database,
    settings: Settings,
    tenant_id: int,
    kind: str,
    spec: dict[str, Any],
    *,
    priority: int = 0,
    max_attempts: int | None = None,
    idempotency_key: str | None = None,
) -> tuple[Job, bool]:
    """Validate, commit, then publish: every caller that creates a job (the API, the pages,
    online predict) goes through here."""
    job, created = create(
        session,
        settings,
        tenant_id,
        kind,
        spec,
        priority=priority,
        max_attempts=max_attempts,
        idempotency_key=idempotency_key,
    )
    if created:
        dispatch.publish_jobs(celery, db, [(job.id, job.queue)], stamp=False)
    return job, created


def wait_finished(
    db: Database, hub: EventHub, job_id: int, timeout: float, safety_net_s: float = 2.0
) -> tuple[JobState, Any, str | None]:
    """The job's (state, result, error) once it ends, or as it stands after `timeout`. Woken
    by the worker's commits; re-read at least every `safety_net_s` in case a notification is
    missed (the database is the record)."""
    deadline = time.monotonic() + timeout
    with hub.watch(job_id) as watch:
        while True:
            with db.sessionmaker() as s:
                state, result, error = s.execute(select(Job.state, Job.result, Job.error).where(Job.id == job_id)).one()
            left = deadline - time.monotonic()
            if state in TERMINAL_STATES or left <= 0:
                return state, result, error
            watch.wait(min(left, safety_net_s))


def lock_references(session: Session, tenant_id: int, spec: dict[str, Any]) -> None:
    """For a job about to be inserted: lock the datasets and model versions its spec names
    until the job commits (erasure.hold), so that they cannot be erased before; SpecError
    (422) naming the field when one was erased since the kind's check read it. See
    app.stores.erasure for the other side."""
    for fields, model in ((erasure.DATASET_FIELDS, Dataset), (erasure.MODEL_VERSION_FIELDS, ModelVersion)):
        for field in fields:
            ref = erasure.as_id(spec.get(field))
            if ref is None:
                continue
            if not erasure.hold(session, model, model.id == ref, model.tenant_id == tenant_id):
                what = f"Dataset {ref}" if model is Dataset else f"Model {spec.get('model') or ref!r}"
                message = f"{what} was deleted while this job was being submitted"
                raise SpecError(message, "deleted", {"spec": {field: [message]}})


def delete(session: Session, settings: Settings, tenant_id: int, job_id: int) -> None:
    """Erase a finished job: its row, events and score shards, then its directory
    (checkpoints, score files, scratch). Conflict while it is queued or running (cancel it
    first). A model version it trained stays (its job_id becomes null)."""
    job = get(session, tenant_id, job_id)
    if session.scalar(select(ScoreShard.id).where(ScoreShard.job_id == job.id, ScoreShard.state == ShardState.running)):
        session.rollback()
        raise Conflict(
            f"Job {job_id}'s scoring shards are still stopping; delete it again in a few seconds",
            "in_use",
            {"job_ids": [job_id]},
        )
    # Compare-and-set: terminal states never change, so a job deleted here was finished.
    deleted = session.scalar(
        delete_rows(Job)
        .where(Job.id == job.id, Job.tenant_id == tenant_id, Job.state.in_(TERMINAL_STATES))
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    if deleted is None:
        state = session.scalar(select(Job.state).where(Job.id == job.id))
        session.rollback()
        if state is None:
            raise NotFound(f"Job {job_id} not found")
        raise Conflict(
            f"Job {job_id} is {state.value}; cancel it first (POST /api/v1/jobs/{job_id}/cancel), then delete it",
            "job_active",
            {"job_ids": [job_id], "state": state.value},
        )
    session.expunge(job)
    trash = erasure.Trash(settings, tenant_id)
    trash.move(job_dir(settings, tenant_id, job_id))
    erasure.commit(session, trash)
