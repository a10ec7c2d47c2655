r"""Score shards in SQL: created once per job; leased like every unit of work
(app/leases.py, kind SHARDS): claimed with compare-and-set UPDATEs fenced by the shard's
attempt number, heartbeated while they run (workers/lease.py), reaped when their worker dies.

    pending --claim--> running --finish--> done
       ^                  |  \--release (stopped, or error with attempts left)--> pending
       |                  |   \-release (error, attempts spent)--------------------> failed
       +--stale heartbeat-+
    pending | running --cancel_shards (job cancelled / ended)--> cancelled

Each pending shard is also a Celery message (SCORE_SHARD, args [job_id, index]) on the
job's queue, published by app.dispatch; a duplicate or late message loses the claim.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import leases
from app.models import ScoreShard, ShardState, utcnow

log = logging.getLogger(__name__)

P, R = ShardState.pending, ShardState.running
SHARDS = leases.SHARDS


@dataclass(frozen=True)
class Claim:
    id: int
    job_id: int
    index: int
    start_row: int
    stop_row: int
    offset: int | None
    attempt: int


# -- creation and claims -------------------------------------------------------------------


def create_shards(session: Session, job_id: int, blocks: Iterable[tuple[int, int, int | None]]) -> bool:
    """Insert one pending shard per (start_row, stop_row, byte offset) unless the job already
    has shards (a re-run parent keeps them). Returns True if this call created them.
    published_at is stamped now: the parent publishes them right after this commit, and if
    that fails the reconciler finds them missing from the broker after the grace period."""
    if session.scalar(select(func.count()).select_from(ScoreShard).where(ScoreShard.job_id == job_id)):
        return False
    now = utcnow()
    try:
        with session.begin_nested():
            session.add_all(
                ScoreShard(
                    job_id=job_id,
                    index=i,
                    start_row=start,
                    stop_row=stop,
                    offset=offset,
                    state=P,
                    attempts=0,
                    rows_done=0,
                    stats={},
                    published_at=now,
                )
                for i, (start, stop, offset) in enumerate(blocks)
            )
            session.flush()
    except IntegrityError:  # a concurrent attempt created them first
        return False
    return True


_CLAIM_COLUMNS = (
    ScoreShard.id,
    ScoreShard.job_id,
    ScoreShard.index,
    ScoreShard.start_row,
    ScoreShard.stop_row,
    ScoreShard.offset,
)


def _claim_id(session: Session, shard_id: int, worker: str) -> Claim | None:
    row = leases.claim(session, SHARDS, shard_id, worker, returning=_CLAIM_COLUMNS)
    if row is None:
        return None
    attempt, shard_id, job_id, index, start_row, stop_row, offset = row
    return Claim(shard_id, job_id, index, start_row, stop_row, offset, attempt)


def claim(session: Session, job_id: int, index: int, worker: str) -> Claim | None:
    """pending -> running for one shard, atomically; None if another worker got it first."""
    shard_id = session.scalar(select(ScoreShard.id).where(ScoreShard.job_id == job_id, ScoreShard.index == index))
    return None if shard_id is None else _claim_id(session, shard_id, worker)


def claim_next(session: Session, job_id: int, worker: str) -> Claim | None:
    """The lowest-numbered pending shard of the job, or None when none is left."""
    while True:
        row = session.execute(
            select(ScoreShard.id)
            .where(ScoreShard.job_id == job_id, ScoreShard.state == P)
            .order_by(ScoreShard.index)
            .limit(1)
        ).first()
        if row is None:
            return None
        got = _claim_id(session, row[0], worker)
        if got is not None:
            return got
        # lost the race for that one; try the next


def finish(
    session: Session, shard_id: int, attempt: int, *, rows: int, valid: int, output_uri: str, stats: dict[str, Any]
) -> bool:
    return leases.finish(
        session,
        SHARDS,
        shard_id,
        attempt,
        {"rows": rows, "valid": valid, "rows_done": rows, "output_uri": output_uri, "stats": stats, "error": None},
    )


def release(session: Session, shard_id: int, attempt: int, *, error: str | None = None) -> ShardState | None:
    """running -> pending (stopped), or after an error as leases.after_failure decides
    (pending to retry, failed once the job's max_attempts are spent). None if not owned."""
    return leases.release(session, SHARDS, shard_id, attempt, error=error)


def cancel_shards(session: Session, job_id: int) -> int:
    """Every pending or running shard of the job -> cancelled (running ones stop at their next
    heartbeat)."""
    return len(leases.cancel_units(session, SHARDS, job_id=job_id))


def shards_of(session: Session, job_id: int) -> list[ScoreShard]:
    return list(session.scalars(select(ScoreShard).where(ScoreShard.job_id == job_id).order_by(ScoreShard.index)))


def summary(session: Session, job_id: int) -> dict[str, Any]:
    """Counts by state, molecules done (finished rows plus running shards' progress), and
    the first failed shard's error."""
    rows = session.execute(
        select(
            ScoreShard.state,
            func.count(),
            func.coalesce(func.sum(ScoreShard.rows_done), 0),
            func.coalesce(func.sum(ScoreShard.stop_row - ScoreShard.start_row), 0),
        )
        .where(ScoreShard.job_id == job_id)
        .group_by(ScoreShard.state)
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
            .order_by(ScoreShard.index)
            .limit(1)
        ).first()
    return out
