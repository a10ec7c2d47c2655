"""One lease model for every unit of work a worker holds: a job, a scoring shard (and later a
search trial or an ensemble member).

A unit is a row with `state`, `attempts`, `worker`, `heartbeat_at`, `started_at` and
`published_at`, and a parent job (a job is its own parent) that holds `queue`,
`max_attempts` and `cancel_requested`. Every unit goes

    claimable --claim (compare-and-set, attempts+1)--> running --> done | failed | cancelled
        ^                                                 |
        +---- release / stale heartbeat (attempts left) --+

and everything a worker holds is fenced by its attempt number: once a unit was reaped (or
cancelled) the old attempt can no longer heartbeat, report or finish it. A `LeaseKind`
describes one such table; the functions here serve them all:

    claim          compare-and-set claimable -> running
    heartbeat      refresh heartbeat_at; tells whether the attempt still owns the unit and
                   whether it should stop (its job was cancelled or has ended)
    release        running -> claimable, or failed once `after_failure` says so
    reap           stale heartbeats -> claimable, failed ('worker lost') or cancelled
    after_failure  the one place that decides whether a failed unit retries
    to_publish / mark_published
                   units whose broker message may be missing, and stamping published_at

State changes of a kind go through its `transition` hook: for jobs that is
app.jobs.transition (the job state machine, which also appends job_events); other kinds
use a plain compare-and-set UPDATE here that wakes the parent job's watchers
(notify.touch) when a unit stops running.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, aliased

from app import notify
from app.broker import SCORE_SHARD
from app.models import TERMINAL_STATES, Job, JobState, ScoreShard, ShardState, utcnow

Key = tuple[int, ...]
S = TypeVar("S", bound=enum.Enum)  # a lease kind's state enum
S_contra = TypeVar("S_contra", bound=enum.Enum, contravariant=True)


class Transition(Protocol[S_contra]):
    def __call__(
        self,
        session: Session,
        unit_id: int,
        /,
        *,
        from_states: Iterable[S_contra],
        to: S_contra,
        attempt: int | None = None,
        extra_where: tuple = (),
        values: dict[str, Any] | None = None,
        event: dict[str, Any] | None = None,
        returning: tuple = (),
    ) -> Sequence[Any] | None:
        """Compare-and-set one unit's state; returns (attempts, *returning) or None if it did not match."""


@dataclass(frozen=True, eq=False, repr=False)
class LeaseKind(Generic[S]):
    """A table of leased units, with states of enum S. `key` are the columns that name a unit in its broker message
    (and are the message's args); `job_id` is the column naming its parent job."""

    name: str
    model: Any
    claimable: S
    running: S
    done: S
    failed: S
    cancelled: S
    task: str
    key: tuple[Any, ...]
    job_id: Any
    # extra column values set by a claim (on top of attempts, worker, heartbeat_at, started_at)
    claim_values: dict[str, Any] = field(default_factory=dict)
    # the values a unit gets when it leaves `running` for `to` (claimable, failed, cancelled)
    leave_values: Callable[[Session, int, S, str | None], dict[str, Any]] | None = None
    transition: Transition[S] | None = None
    # republish claimable units only while their parent job is in one of these states (None: always)
    publish_while: tuple[JobState, ...] | None = None

    def __repr__(self) -> str:
        return f"LeaseKind({self.name!r})"

    @property
    def is_job(self) -> bool:
        return self.model is Job

    # -- broker task ids: "<name>-<key...>-<random>", so one scan tells the kinds apart ----
    def task_id(self, key: Key) -> str:
        return "-".join([self.name, *(str(int(k)) for k in key), uuid.uuid4().hex[:8]])

    def parse_task_id(self, task_id: str) -> Key | None:
        parts = task_id.split("-")
        n = len(self.key)
        if len(parts) == n + 2 and parts[0] == self.name and all(p.isdigit() for p in parts[1 : n + 1]):
            return tuple(int(p) for p in parts[1 : n + 1])
        return None


_KINDS: dict[str, LeaseKind[Any]] = {}


def register(kind: LeaseKind[S]) -> LeaseKind[S]:
    _KINDS[kind.name] = kind
    return kind


def kinds() -> list[LeaseKind[Any]]:
    """Every registered kind, jobs first (parents are reaped before their units). The job
    kind registers itself when app.jobs is imported."""
    import app.jobs  # noqa: F401  (registers the job lease)

    return sorted(_KINDS.values(), key=lambda k: not k.is_job)


# -- the one retry decision -------------------------------------------------------------------


class Outcome(enum.StrEnum):
    retry = "retry"
    fail = "fail"
    cancel = "cancel"


def after_failure(attempts: int, max_attempts: int, *, cancel_requested: bool = False) -> Outcome:
    """What happens to a unit whose attempt failed or whose worker was lost: a cancelled job's
    units are cancelled; otherwise retry until the job's max_attempts are spent."""
    if cancel_requested:
        return Outcome.cancel
    return Outcome.fail if attempts >= max_attempts else Outcome.retry


def _target(kind: LeaseKind[S], outcome: Outcome) -> S:
    return {Outcome.retry: kind.claimable, Outcome.fail: kind.failed, Outcome.cancel: kind.cancelled}[outcome]


# -- state changes ----------------------------------------------------------------------------


def _cas(
    session: Session,
    kind: LeaseKind[Any],
    unit_id: int,
    *,
    from_states: Iterable[enum.Enum],
    to: enum.Enum,
    attempt: int | None = None,
    extra_where: tuple = (),
    values: dict[str, Any] | None = None,
    event: dict[str, Any] | None = None,
    returning: tuple = (),
) -> Sequence[Any] | None:
    m = kind.model
    where = [m.id == unit_id, m.state.in_(tuple(from_states)), *extra_where]
    if attempt is not None:
        where.append(m.attempts == attempt)
    row = session.execute(
        update(m).where(*where).values(state=to, **(values or {})).returning(m.attempts, kind.job_id, *returning)
    ).first()
    if row is None:
        return None
    if to != kind.running:  # finished, released or failed: wake whoever waits on the job
        notify.touch(session, row[1])
    return (row[0], *row[2:])


def move(session: Session, kind: LeaseKind[Any], unit_id: int, **kw: Any) -> Sequence[Any] | None:
    """One compare-and-set state change of a unit, through its kind's transition hook."""
    if kind.transition is not None:
        return kind.transition(session, unit_id, **kw)
    return _cas(session, kind, unit_id, **kw)


def _leave_values(
    session: Session, kind: LeaseKind[Any], unit_id: int, to: enum.Enum, error: str | None
) -> dict[str, Any]:
    return kind.leave_values(session, unit_id, to, error) if kind.leave_values else {}


def claim(
    session: Session,
    kind: LeaseKind[Any],
    unit_id: int,
    worker: str,
    returning: tuple = (),
    extra_where: tuple = (),
) -> Sequence[Any] | None:
    """claimable -> running, atomically, attempts+1. Returns (attempt, *returning), or None if
    another delivery (or a cancel) got there first, or `extra_where` did not hold."""
    now = utcnow()
    m = kind.model
    return move(
        session,
        kind,
        unit_id,
        from_states=[kind.claimable],
        to=kind.running,
        extra_where=extra_where,
        values={
            "attempts": m.attempts + 1,
            "worker": worker[:255],
            "heartbeat_at": now,
            "started_at": now,
            **kind.claim_values,
        },
        event={"from": kind.claimable.value, "worker": worker},
        returning=returning,
    )


@dataclass(frozen=True)
class Beat:
    owned: bool  # False once this attempt lost the unit (reaped, cancelled, finished elsewhere)
    cancel: bool  # the unit should stop: its job was cancelled or has ended


def _owned(kind: LeaseKind[Any], unit_id: int, attempt: int) -> tuple:
    m = kind.model
    return (m.id == unit_id, m.state == kind.running, m.attempts == attempt)


def _cancel_expr(kind: LeaseKind[Any]) -> Any:
    if kind.is_job:
        return Job.cancel_requested
    job = aliased(Job)  # qualified even where SQLite renders the UPDATE's own columns bare
    return (
        select(or_(job.cancel_requested, job.state.in_(tuple(TERMINAL_STATES))))
        .where(job.id == kind.job_id)
        .correlate(kind.model)
        .scalar_subquery()
    )


def heartbeat(
    session: Session, kind: LeaseKind[Any], unit_id: int, attempt: int, values: dict[str, Any] | None = None
) -> Beat:
    """Refresh heartbeat_at (and any progress columns in `values`) if this attempt still owns
    the unit."""
    row = session.execute(
        update(kind.model)
        .where(*_owned(kind, unit_id, attempt))
        .values(heartbeat_at=utcnow(), **(values or {}))
        .returning(_cancel_expr(kind))
    ).first()
    return Beat(False, False) if row is None else Beat(True, bool(row[0]))


def finish(session: Session, kind: LeaseKind[Any], unit_id: int, attempt: int, values: dict[str, Any]) -> bool:
    """running -> done for the owning attempt."""
    now = utcnow()
    return (
        move(
            session,
            kind,
            unit_id,
            from_states=[kind.running],
            to=kind.done,
            attempt=attempt,
            values={"finished_at": now, "heartbeat_at": now, **values},
            event={"from": kind.running.value},
        )
        is not None
    )


def _parent(session: Session, kind: LeaseKind[Any], unit_id: int) -> tuple[int, bool]:
    """(max_attempts, cancel_requested) of the unit's job."""
    m = kind.model
    q = select(Job.max_attempts, Job.cancel_requested)
    q = q.where(Job.id == unit_id) if kind.is_job else q.join(m, kind.job_id == Job.id).where(m.id == unit_id)
    row = session.execute(q).first()
    return (int(row[0]), bool(row[1])) if row is not None else (1, True)


def release(session: Session, kind: LeaseKind[S], unit_id: int, attempt: int, *, error: str | None = None) -> S | None:
    """The owning attempt gives the unit up: back to claimable when it stopped (error None), or
    as `after_failure` decides when it failed. Returns the new state, None if not owned."""
    to = kind.claimable
    if error is not None:
        max_attempts, cancel = _parent(session, kind, unit_id)
        to = _target(kind, after_failure(attempt, max_attempts, cancel_requested=cancel))
    ok = move(
        session,
        kind,
        unit_id,
        from_states=[kind.running],
        to=to,
        attempt=attempt,
        values=_leave_values(session, kind, unit_id, to, error),
        event={"from": kind.running.value, **({"error": error[:2000]} if error else {})},
    )
    return to if ok is not None else None


@dataclass(frozen=True)
class Reaped:
    kind: LeaseKind[Any]
    unit_id: int
    key: Key
    job_id: int
    queue: str
    state: enum.Enum


def reap(session: Session, kind: LeaseKind[Any], timeout_s: float, job_id: int | None = None) -> list[Reaped]:
    """Running units whose heartbeat is older than timeout_s: back to claimable, or failed with
    'worker lost' once the job's max_attempts are spent, or cancelled if a cancel is pending.
    Units of jobs that have ended are left to `cancel_units`."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    m = kind.model
    q = select(m.id, m.attempts, Job.max_attempts, Job.queue, Job.cancel_requested, kind.job_id, *kind.key)
    if not kind.is_job:
        q = q.join(Job, Job.id == kind.job_id).where(Job.state.in_([JobState.queued, JobState.running]))
    q = q.where(m.state == kind.running, m.heartbeat_at < cutoff)
    if job_id is not None:
        q = q.where(kind.job_id == job_id)
    # A row locked by a transaction still open (a worker cut off mid-transaction, ended by the
    # server's idle-in-transaction timeout) is left for a later tick instead of stalling them all.
    q = q.with_for_update(of=m, skip_locked=True)
    out: list[Reaped] = []
    for uid, attempts, max_attempts, queue, cancel, jid, *key in session.execute(q).all():
        to = _target(kind, after_failure(attempts, max_attempts, cancel_requested=bool(cancel)))
        if (
            move(
                session,
                kind,
                uid,
                from_states=[kind.running],
                to=to,
                attempt=attempts,
                extra_where=(m.heartbeat_at < cutoff,),
                values=_leave_values(session, kind, uid, to, "worker lost"),
                event={"from": kind.running.value, "reason": "worker lost"},
            )
            is not None
        ):
            out.append(Reaped(kind, uid, tuple(key), jid, queue, to))
    return out


def cancel_units(session: Session, kind: LeaseKind[Any], *, job_id: int | None = None) -> list[int]:
    """Claimable and running units -> cancelled, for one job or (job_id None) for every job
    that has ended. Running ones stop at their next heartbeat. Returns the job id of each
    unit cancelled."""
    assert not kind.is_job, "jobs are cancelled through app.jobs"
    m = kind.model
    where = [m.state.in_([kind.claimable, kind.running])]
    if job_id is not None:
        where.append(kind.job_id == job_id)
    else:
        where.append(kind.job_id.in_(select(Job.id).where(Job.state.in_(tuple(TERMINAL_STATES)))))
    return list(
        session.execute(
            update(m).where(*where).values(state=kind.cancelled, finished_at=utcnow()).returning(kind.job_id)
        )
        .scalars()
        .all()
    )


# -- publishing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    key: Key
    queue: str
    published: bool  # False: never published since it became claimable, so publish without looking


def to_publish(
    session: Session, kind: LeaseKind[Any], grace_s: float, limit: int = 10_000, where: tuple = ()
) -> list[Candidate]:
    """Claimable units never published since they became claimable, or published longer ago than
    the grace period (then their message may be lost: the caller checks the broker); `where`
    narrows them further."""
    cutoff = utcnow() - timedelta(seconds=grace_s)
    m = kind.model
    q = select(m.published_at, Job.queue, *kind.key)
    if not kind.is_job:
        q = q.join(Job, Job.id == kind.job_id)
    if kind.publish_while is not None:
        q = q.where(Job.state.in_(kind.publish_while))
    q = q.where(m.state == kind.claimable, m.published_at.is_(None) | (m.published_at < cutoff), *where)
    rows = session.execute(q.order_by(*kind.key).limit(limit)).all()
    return [Candidate(tuple(key), queue, published is not None) for published, queue, *key in rows]


def mark_published(session: Session, kind: LeaseKind[Any], keys: Iterable[Key]) -> None:
    """published_at = now for claimable units named by key (grouped by all but the last key column)."""
    groups: dict[Key, list[int]] = {}
    for key in keys:
        groups.setdefault(tuple(key[:-1]), []).append(key[-1])
    now = utcnow()
    *prefix_cols, last_col = kind.key
    for prefix, lasts in groups.items():
        for i in range(0, len(lasts), 1000):
            session.execute(
                update(kind.model)
                .where(
                    *(c == v for c, v in zip(prefix_cols, prefix, strict=True)),
                    last_col.in_(lasts[i : i + 1000]),
                    kind.model.state == kind.claimable,
                )
                .values(published_at=now)
            )


# -- the scoring-shard kind -----------------------------------------------------------------


def _shard_leave_values(session: Session, unit_id: int, to: enum.Enum, error: str | None) -> dict[str, Any]:
    values: dict[str, Any] = {
        "worker": None,
        "rows_done": 0,
        "published_at": None,
        "error": error[:10000] if error else None,
    }
    if to != ShardState.pending:
        values["finished_at"] = utcnow()
    return values


SHARDS = register(
    LeaseKind(
        name="shard",
        model=ScoreShard,
        claimable=ShardState.pending,
        running=ShardState.running,
        done=ShardState.done,
        failed=ShardState.failed,
        cancelled=ShardState.cancelled,
        task=SCORE_SHARD,
        key=(ScoreShard.job_id, ScoreShard.index),
        job_id=ScoreShard.job_id,
        claim_values={"finished_at": None, "rows_done": 0, "error": None},
        leave_values=_shard_leave_values,
        # a parent that died leaves its job queued: its shards wait for the next parent's publish
        publish_while=(JobState.running,),
    )
)
