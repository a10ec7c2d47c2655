"""A parent job that drives its own units of work: ScoreShard rows on the SHARDS lease
(app/leases.py), which are scoring shards (workers/scoring/runner.py) or ensemble members
(workers/kinds/train.py).

The parent publishes all pending units but one for the other workers on the queue, then claims
pending units itself with the same compare-and-set as the shard task until none is left, and
waits for the units other workers hold (their notifications wake it, app/notify.py). One worker
finishes a job alone; every extra worker takes units off it, through the unit's message (the
shard task, workers/tasks.py): `claim_for_message`, run, `release_failed` on an error.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from app import dispatch, leases
from app.config import Settings
from app.models import Job, JobState, ShardState
from workers.scoring import shards
from workers.scoring.shards import Claim

log = logging.getLogger(__name__)

# The parent waits for notifications while other workers hold the last units; this is only
# the safety net for a missed one (and the pace at which it reaps their stale leases).
FANIN_WAIT_S = 2.0


@dataclass
class UnitJob:
    """A job split into units, as a worker running one of them sees it: `queue` is where its
    units' messages go, `max_attempts` how often a unit may be tried."""

    db: Any
    settings: Settings
    job_id: int
    tenant_id: int
    queue: str
    max_attempts: int


def claim_for_message(db: Any, job_id: int, index: int, worker: str) -> Claim | None:
    """Claim unit `index` of a job for the unit's message (the shard task); None, to skip it,
    when the job is gone, being cancelled or ended, or the unit is not pending (a duplicate or
    late delivery loses the claim)."""
    with db.session() as s:
        row = s.execute(select(Job.state, Job.cancel_requested).where(Job.id == job_id)).first()
        if row is None or row[1] or row[0] not in (JobState.queued, JobState.running):
            return None
        return shards.claim(s, job_id, index, worker)


def release_failed(db: Any, claim: Claim, exc: BaseException, *, trace: bool = True) -> str:
    """Give back a unit whose run raised `exc`, with the error (and the traceback being
    handled, when `trace`): pending again while it has attempts left, else failed. Returns
    the outcome "failed"."""
    error = f"{type(exc).__name__}: {exc}"
    if trace:
        error += f"\n{traceback.format_exc(limit=5)}"
    with db.session() as s:  # a retry is published by the reconciler (or claimed by the parent)
        shards.release(s, claim.id, claim.attempt, error=error)
    return "failed"


def interrupted(db: Any, claim: Claim, lease: Any, exc: BaseException, what: str) -> str:
    """The outcome of a unit (ensemble member, search trial) whose run under `lease` raised
    `exc`, to be called in its `except` block: lost when the lease was taken away; released
    as cancelled or stopped when training was told to stop; otherwise logged and released as
    failed (release_failed)."""
    from workers.ml.training import TrainingCancelled

    stopped = isinstance(exc, TrainingCancelled)
    if not stopped:
        log.exception("%s attempt %s failed", what, claim.attempt)
    if lease.lost:
        return "lost"
    if not stopped:
        return release_failed(db, claim, exc)
    with db.session() as s:
        shards.release(s, claim.id, claim.attempt)
    return "cancelled" if lease.cancelled else "stopped"


def publish_pending(ctx: Any, queue: str) -> None:
    """Make stale units of dead workers pending again, then publish every pending unit but
    the first (the parent takes that one) on `queue`, when there is a broker."""
    with ctx.db.session() as s:
        leases.reap(s, leases.SHARDS, ctx.settings.heartbeat_timeout_s, job_id=ctx.job_id)
        pending = [sh.index for sh in shards.shards_of(s, ctx.job_id) if sh.state == ShardState.pending]
    if ctx.celery is not None and len(pending) > 1:
        # the first one is ours; the rest are for any worker on the queue
        dispatch.publish(ctx.celery, ctx.db, leases.SHARDS, [((ctx.job_id, i), queue) for i in pending[1:]])


def run_unit_job(
    ctx: Any,
    *,
    count: int,
    queue: str,
    summary: Callable[[], dict[str, Any]],
    run_claimed: Callable[[Claim, Callable[[], None]], str],
    share: float,
    label: str,
    unit: str,
    units: str,
    max_attempts: int,
) -> None:
    """A parent job made of `count` units (ensemble members, search trials): create them
    (once across attempts), publish the pending ones on `queue`, and drive them to the end
    (`drive_units`), reporting `share` x their mean progress as the job's, with `label`
    ("ensemble members") in the message and `<units>_done/_running/_total` in the event.
    `run_claimed(claim, on_progress)` runs one claimed unit in this process and calls
    `on_progress()` as it goes."""
    from workers.runtime import JobLost

    with ctx.db.session() as s:
        created = shards.create_shards(s, ctx.job_id, [(i, i, None) for i in range(count)])
    ctx.log(f"{count} {label}", **{units: count}, created=created)
    publish_pending(ctx, queue)

    def report(force: bool = False) -> dict[str, Any]:
        summ = summary()
        ctx.progress(
            share * summ["fraction"],
            f"{label} done {summ['done']}/{summ[units]}, running {summ['running']}",
            force=force,
            **{f"{units}_done": summ["done"], f"{units}_running": summ["running"], f"{units}_total": summ[units]},
        )
        return summ

    def on_progress() -> None:
        with contextlib.suppress(JobLost):  # ctx.should_stop() is now True: the unit stops
            report()

    report(force=True)
    drive_units(
        ctx,
        run_claimed=lambda claim: run_claimed(claim, on_progress),
        summary=report,
        unit=unit,
        units=units,
        max_attempts=max_attempts,
    )
    report(force=True)


def drive_units(
    ctx: Any,
    *,
    run_claimed: Callable[[Claim], str],
    summary: Callable[[], dict[str, Any]],
    unit: str,
    units: str,
    max_attempts: int,
) -> None:
    """Run the job's pending units in turn, then wait until every unit is done.

    `run_claimed(claim)` runs one claimed unit and returns its outcome ("stopped" and
    "cancelled" make the parent check for a cancel). `summary()` counts the units by state
    (`shards.summary` keys: one per ShardState, `units` for the total, `error` = (index,
    error) of the first failed one). `unit`/`units` name them in errors ("shard"/"shards").
    Raises JobCancelled (JobLost) on a cancel (lost lease), RuntimeError when a unit failed or
    was cancelled without a cancel request.
    """
    db, settings = ctx.db, ctx.settings
    worker = ctx.worker or "parent"
    hub = getattr(ctx, "hub", None)
    # Watch before reading: a unit that finishes between a read and the wait still wakes us.
    with hub.watch(ctx.job_id) if hub is not None else contextlib.nullcontext() as watch:
        while True:
            ctx.check_cancel()
            with db.session() as s:
                # stale units of dead workers: pending again (we claim them; the reconciler
                # publishes them for the others)
                leases.reap(s, leases.SHARDS, settings.heartbeat_timeout_s, job_id=ctx.job_id)
                claim = shards.claim_next(s, ctx.job_id, worker)
            if claim is not None:
                if run_claimed(claim) in ("stopped", "cancelled"):
                    ctx.check_cancel(poll_s=0)
                continue
            summ = summary()
            if summ.get("failed"):
                index, error = summ["error"]
                # The unit's row keeps its traceback for the operator; the job says one sentence.
                reason = (error or "unknown error").split("\n", 1)[0]
                raise RuntimeError(f"{unit} {index} failed after {max_attempts} attempts: {reason}")
            if summ.get("cancelled"):
                ctx.check_cancel(poll_s=0)
                raise RuntimeError(f"{units} of this job were cancelled without a cancel request")
            if summ["done"] == summ[units]:
                return
            # Other workers hold the remaining units: sleep until one of them finishes, is
            # released or fails (each commits a notification for this job), or a cancel.
            if watch is not None:
                if watch.wait(FANIN_WAIT_S):
                    ctx.check_cancel(poll_s=0.25)
            else:  # no event hub (a context built outside a worker): the safety-net pace
                time.sleep(FANIN_WAIT_S)
