"""The oracle: after the faults stop and the system settles (a bounded wait), hold every
accepted job to the job contract. Each violation is one sentence naming the job.

Checks, per accepted job:
    terminal        it reached a terminal state within the settle bound, and while settling
                    it never sat `running` on a heartbeat older than the reaper's bound
    expected        it succeeded: the workload asks no job to fail, and train jobs get
                    attempts enough for their kills (a fault that fails a job is a finding)
    one terminal    exactly one state event into a terminal state, the last state event, the
                    row's state; exactly one running -> succeeded for a succeeded job
    state order     queued, then (running, queued)*, running, terminal, attempts numbered 1..n
    gapless seq     event seqs are 1..jobs.event_seq
    train           one model version for the job, the one its result names; the epoch events
                    of every attempt continue after the last epoch an earlier attempt
                    reported (each reported epoch was checkpointed first), so a resumed attempt
                    never starts over
    score           every shard done, and the result file has every library row exactly once,
                    in order (row 0..n-1, ids as in the library)
    predict         one prediction per input
and overall: the tenants have no job the API did not accept (no duplicate from a retried
submit; only an online predict call that failed may leave a predict job behind, at most one
per failed call, and it too ends exactly once), every job accepted by POST /jobs has
exactly one `job.create` audit row, every answer of the online predict route held one
prediction per input, and every tenant's audit chain verifies (app/audit.py verify_tenant,
which seals unsealed rows first).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from datetime import timedelta

import pyarrow.parquet as pq
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app import audit
from app.artifacts import job_dir, open_read
from app.config import Settings
from app.kinds.score import score_files
from app.models import TERMINAL_STATES, AuditEvent, Job, JobState, ModelVersion, ScoreShard, ShardState, Tenant, utcnow
from tests.chaos.observe import Event, Observer
from tests.chaos.workload import Accepted, Workload

TERMINAL = {s.value for s in TERMINAL_STATES}


@dataclass
class Verdict:
    jobs_checked: int = 0
    violations: list[str] = field(default_factory=list)
    settle_s: float = 0.0
    states: dict[str, int] = field(default_factory=dict)
    resumed_train_attempts: int = 0  # attempts that continued from an earlier attempt's checkpoint
    retried_jobs: int = 0  # jobs that needed more than one attempt
    kinds: dict[str, int] = field(default_factory=dict)  # jobs checked per kind
    orphan_predict_jobs: int = 0  # predict jobs of online calls that failed (not accepted, still checked)

    def add(self, job_id: int | None, message: str) -> None:
        self.violations.append(f"job {job_id}: {message}" if job_id is not None else message)


def stale_running(observer: Observer, job_ids: set[int], older_than_s: float) -> list[int]:
    """Of job_ids, those `running` with a heartbeat older than older_than_s."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    ids = sorted(job_ids)
    return observer.read(
        lambda s: list(
            s.execute(
                select(Job.id).where(Job.id.in_(ids), Job.state == JobState.running, Job.heartbeat_at < cutoff)
            ).scalars()
        )
    )


def settle(verdict: Verdict, observer: Observer, jobs: list[Accepted], timeout_s: float, stale_s: float) -> None:
    """Wait (bounded) until every accepted job is terminal. Meanwhile (beat is up, no faults)
    a job may not stay `running` on a heartbeat older than stale_s: the reaper's bound."""
    started = time.monotonic()
    pending = {j.id for j in jobs}
    stale: set[int] = set()
    while pending and time.monotonic() - started < timeout_s:
        pending = {i for i in pending if not observer.job(i).terminal}
        stale.update(stale_running(observer, pending, stale_s) if pending else [])
        if pending:
            time.sleep(0.25)
    for job_id in sorted(stale):
        verdict.add(job_id, f"running on a heartbeat older than the reaper's bound ({stale_s:.0f}s)")
    verdict.settle_s = round(time.monotonic() - started, 3)


def state_events(events: list[Event]) -> list[Event]:
    return [e for e in events if e.type == "state"]


def check_states(verdict: Verdict, job: Job, events: list[Event]) -> None:
    seqs = [e.seq for e in events]
    if seqs != list(range(1, job.event_seq + 1)):
        verdict.add(job.id, f"event seqs are not 1..{job.event_seq} without gaps: {seqs}")
    states = state_events(events)
    path = [e.data.get("to") for e in states]
    terminal = [e for e in states if e.data.get("to") in TERMINAL]
    if len(terminal) != 1 or path[-1] not in TERMINAL or path[-1] != job.state.value:
        verdict.add(job.id, f"not exactly one terminal state (the row's {job.state.value}): {path}")
    if job.state == JobState.succeeded:
        from_running = [e for e in terminal if e.data.get("to") == "succeeded" and e.data.get("from") == "running"]
        if len(from_running) != 1:
            verdict.add(job.id, f"{len(from_running)} running -> succeeded transitions")
    body = path[1:-1] if path and path[-1] in TERMINAL else path[1:]
    well_formed = path[:1] == ["queued"] and all(
        s == ("running" if i % 2 == 0 else "queued") for i, s in enumerate(body)
    )
    if body and body[-1] != "running" and job.state != JobState.cancelled:
        well_formed = False
    if not well_formed:
        verdict.add(job.id, f"state events out of order: {path}")
    attempts = [e.data.get("attempt") for e in states if e.data.get("to") == "running"]
    if attempts != list(range(1, len(attempts) + 1)):
        verdict.add(job.id, f"running attempts are not numbered 1..n: {attempts}")


def epochs_by_attempt(events: list[Event]) -> list[tuple[int, list[int]]]:
    """[(attempt, [epoch of each metric event it reported])] in order."""
    out: list[tuple[int, list[int]]] = []
    for e in events:
        if e.type == "state" and e.data.get("to") == "running":
            out.append((int(e.data.get("attempt") or 0), []))
        elif e.type == "metric" and "epoch" in e.data and out:
            out[-1][1].append(int(e.data["epoch"]))
    return out


def check_train(verdict: Verdict, s: Session, job: Job, events: list[Event]) -> None:
    versions = s.execute(select(ModelVersion.version).where(ModelVersion.job_id == job.id)).scalars().all()
    if len(versions) != 1:
        verdict.add(job.id, f"train job registered {len(versions)} model versions")
    elif (job.result or {}).get("version") != versions[0]:
        verdict.add(job.id, f"result names version {(job.result or {}).get('version')}, registered {versions[0]}")
    verdict.resumed_train_attempts += check_resume(
        verdict, job.id, events, int(job.spec.get("epochs", 0)), bool((job.result or {}).get("stopped_early"))
    )


def check_resume(verdict: Verdict, job_id: int, events: list[Event], epochs_asked: int, stopped_early: bool) -> int:
    """Every attempt's epochs run on from the last epoch an earlier attempt reported (it was
    checkpointed before it was reported), every epoch up to the last is reported, and the job
    ends at the epochs asked. Returns how many
    attempts resumed from an earlier attempt's checkpoint."""
    seen = 0
    resumed = 0
    for attempt, epochs in epochs_by_attempt(events):
        if epochs and epochs != list(range(epochs[0], epochs[0] + len(epochs))):
            verdict.add(job_id, f"attempt {attempt} reported epochs {epochs}")
        if epochs and epochs[0] <= seen:
            verdict.add(job_id, f"attempt {attempt} restarted at epoch {epochs[0]} after epoch {seen} was checkpointed")
        if seen:  # an earlier attempt checkpointed: this one went on from there (or had nothing left to train)
            resumed += 1
        seen = max([seen, *epochs])
    if seen != epochs_asked and not stopped_early:
        verdict.add(job_id, f"epochs reported end at {seen}, the spec asks {epochs_asked}")
    reported = {epoch for _, epochs in epochs_by_attempt(events) for epoch in epochs}
    missing = sorted(set(range(1, seen + 1)) - reported)
    if missing:  # checkpointed (a later attempt resumed after them) but their metrics never reported
        verdict.add(job_id, f"epochs {missing} were trained but never reported")
    return resumed


def check_score(verdict: Verdict, s: Session, settings: Settings, job: Job, library_ids: list[str]) -> None:
    shards = s.execute(select(ScoreShard.index, ScoreShard.state).where(ScoreShard.job_id == job.id)).all()
    if not shards or any(state != ShardState.done for _, state in shards):
        verdict.add(job.id, f"score shards not all done: {sorted((i, st.value) for i, st in shards)}")
    path = score_files(job_dir(settings, job.tenant_id, job.id))["parquet"]
    try:
        with open_read(path) as fh:
            table = pq.read_table(io.BytesIO(fh.read()), columns=["row", "id"])
    except (OSError, ValueError) as exc:
        verdict.add(job.id, f"score result unreadable: {exc}")
        return
    rows, ids = table.column("row").to_pylist(), table.column("id").to_pylist()
    if rows != list(range(len(library_ids))):
        verdict.add(job.id, f"score rows are not 0..{len(library_ids) - 1} once each in order ({len(rows)} rows)")
    if ids != library_ids:
        verdict.add(job.id, "score ids differ from the library's, in order")
    if (job.result or {}).get("rows") != len(library_ids):
        verdict.add(job.id, f"result counts {(job.result or {}).get('rows')} rows, the library has {len(library_ids)}")


def check_submits_audited(verdict: Verdict, s: Session, workload: Workload) -> None:
    """Each accepted job has exactly one `job.create` audit row with outcome ok (a retried
    submit that got the existing job back is not a second creation)."""
    rows = s.execute(
        select(AuditEvent.object_id, func.count())
        .where(
            AuditEvent.tenant_id.in_([t.id for t in workload.tenants]),
            AuditEvent.action == "job.create",
            AuditEvent.outcome == "ok",
        )
        .group_by(AuditEvent.object_id)
    ).all()
    created: dict[str | None, int] = {object_id: int(n) for object_id, n in rows}
    for job in workload.jobs:
        if job.via != "jobs":
            continue  # a predict route's job is audited as the call (model.predict)
        n = created.get(str(job.id), 0)
        if n != 1:
            verdict.add(job.id, f"{n} job.create audit rows (one expected)")


def judge(
    observer: Observer, settings: Settings, workload: Workload, settle_timeout_s: float, stale_s: float
) -> Verdict:
    verdict = Verdict()
    settle(verdict, observer, workload.jobs, settle_timeout_s, stale_s)
    tenant_ids = [t.id for t in workload.tenants]
    accepted = {j.id for j in workload.jobs}

    def check(s: Session) -> None:
        for acc in workload.jobs:
            job = s.get(Job, acc.id)
            if job is None:
                verdict.add(acc.id, "accepted but not in the database")
                continue
            verdict.jobs_checked += 1
            verdict.states[job.state.value] = verdict.states.get(job.state.value, 0) + 1
            verdict.kinds[job.kind] = verdict.kinds.get(job.kind, 0) + 1
            if job.state not in TERMINAL_STATES:
                verdict.add(job.id, f"still {job.state.value} {verdict.settle_s:.0f}s after the faults stopped")
                continue
            if job.state != JobState.succeeded:
                verdict.add(job.id, f"{job.kind} ended {job.state.value}: {job.error}")
            events = observer.events(job.id)
            check_states(verdict, job, events)
            verdict.retried_jobs += job.attempts > 1
            if job.state != JobState.succeeded:
                continue
            if job.kind == "train":
                check_train(verdict, s, job, events)
            elif job.kind == "score":
                check_score(verdict, s, settings, job, workload.library_ids)
            elif job.kind == "sleep" and (job.result or {}).get("steps") != acc.spec["steps"]:
                verdict.add(job.id, f"sleep result {job.result} does not match its spec {acc.spec}")
            elif job.kind == "predict":
                predictions = (job.result or {}).get("predictions") or []
                if len(predictions) != len(acc.spec["inputs"]):
                    verdict.add(job.id, f"{len(predictions)} predictions for {len(acc.spec['inputs'])} inputs")
        extra = s.execute(select(Job).where(Job.tenant_id.in_(tenant_ids), Job.id.not_in(sorted(accepted)))).scalars()
        orphans = 0
        for job in extra:
            if job.kind == "predict" and orphans < workload.failed_calls:
                orphans += 1  # left behind by a predict call that failed: it still ends exactly once
                if job.state in TERMINAL_STATES:
                    check_states(verdict, job, observer.events(job.id))
                else:
                    verdict.add(job.id, f"a failed call's predict job still {job.state.value}")
                continue
            verdict.add(job.id, "a job the API never accepted (a duplicate of a retried submit?)")
        verdict.orphan_predict_jobs = orphans
        for problem in workload.problems:
            verdict.add(None, problem)
        keys = s.execute(
            select(Job.idempotency_key, func.count())
            .where(Job.tenant_id.in_(tenant_ids), Job.idempotency_key.is_not(None))
            .group_by(Job.idempotency_key)
            .having(func.count() > 1)
        ).all()
        for key, n in keys:
            verdict.add(None, f"idempotency key {key} has {n} jobs")
        for tenant in s.scalars(select(Tenant).where(Tenant.id.in_(tenant_ids))):
            report = audit.verify_tenant(s, tenant)
            if not report.intact:
                verdict.add(None, f"audit chain of tenant {tenant.name}: {report.summary()}")
        check_submits_audited(verdict, s, workload)

    observer.read(check)
    return verdict
