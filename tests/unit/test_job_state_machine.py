"""The state machine in app/jobs.py (SQLite; unit tests are service-free, and the same
transitions run against PostgreSQL in tests/integration)."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
from sqlalchemy import update

from app import auth, jobs, leases
from app.db import Database
from app.models import Job, JobState, utcnow
from tests.conftest import use_template


@pytest.fixture()
def db(tmp_path, broker_url, sqlite_template):  # noqa: ANN001, ANN201
    from app.config import from_env

    settings = from_env({}, home=tmp_path / "home", broker_url=broker_url)
    use_template(settings, sqlite_template)
    database = Database(settings.sqlalchemy_url)
    yield database
    database.dispose()


def new_job(db: Database, **kw) -> int:  # noqa: ANN003
    with db.session() as s:
        tenant = auth.create_tenant(s, f"sm-{time.monotonic_ns()}")
        job, _ = jobs.submit(s, tenant_id=tenant.id, kind="sleep", spec={}, queue="cpu", **kw)
        return job.id


def state_events(db: Database, job_id: int) -> list[str]:
    from sqlalchemy import select

    from app.models import JobEvent

    with db.session() as s:
        return [e.data["to"] for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id,
                                                                       JobEvent.type == "state").order_by(JobEvent.seq))]


def test_claim_is_compare_and_set(db: Database) -> None:
    job_id = new_job(db)
    with db.session() as s:
        assert jobs.claim(s, job_id, "w1") == 1
    with db.session() as s:
        assert jobs.claim(s, job_id, "w2") is None  # duplicate delivery loses
        assert s.get(Job, job_id).worker == "w1"


def test_terminal_states_never_change(db: Database) -> None:
    job_id = new_job(db)
    with db.session() as s:
        attempt = jobs.claim(s, job_id, "w")
        assert jobs.succeed(s, job_id, attempt, {"x": 1})
    with db.session() as s:
        assert not jobs.fail(s, job_id, attempt, "late failure")
        assert not jobs.mark_cancelled(s, job_id, attempt)
        assert jobs.request_cancel(s, job_id) == JobState.succeeded
        assert jobs.claim(s, job_id, "w2") is None
        assert s.get(Job, job_id).result == {"x": 1}
    assert state_events(db, job_id) == ["queued", "running", "succeeded"]


def backdate(db: Database, job_id: int, seconds: float = 120) -> None:
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def events(db: Database, job_id: int) -> list[dict]:
    from sqlalchemy import select

    from app.models import JobEvent

    with db.session() as s:
        return [e.data for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id,
                                                                 JobEvent.type == "state").order_by(JobEvent.seq))]


def test_reaper_requeues_then_fails_after_max_attempts(db: Database) -> None:
    job_id = new_job(db, max_attempts=2)
    for expected in ("queued", "failed"):
        with db.session() as s:
            attempt = jobs.claim(s, job_id, "w")
        with db.session() as s:
            assert jobs.reap_stale(s, timeout_s=60) == []  # a fresh heartbeat is left alone
        backdate(db, job_id)
        with db.session() as s:
            reaped = jobs.reap_stale(s, timeout_s=60)
        assert [r.state.value for r in reaped if r.job_id == job_id] == [expected]
        with db.session() as s:  # the lost attempt is fenced off
            assert not jobs.succeed(s, job_id, attempt, {})
            assert leases.heartbeat(s, jobs.LEASE, job_id, attempt) == leases.Beat(owned=False, cancel=False)
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.state == JobState.failed and job.error == "worker lost" and job.attempts == 2
    assert events(db, job_id) == [
        {"to": "queued", "attempt": 0},
        {"to": "running", "attempt": 1, "from": "queued", "worker": "w"},
        {"to": "queued", "attempt": 1, "from": "running", "reason": "worker lost"},
        {"to": "running", "attempt": 2, "from": "queued", "worker": "w"},
        {"to": "failed", "attempt": 2, "from": "running", "reason": "worker lost"},
    ]


def test_reaper_cancels_a_lost_job_with_a_pending_cancel(db: Database) -> None:
    job_id = new_job(db)
    with db.session() as s:
        jobs.claim(s, job_id, "w")
        assert jobs.request_cancel(s, job_id) == JobState.running
    backdate(db, job_id)
    with db.session() as s:
        assert [r.state for r in jobs.reap_stale(s, timeout_s=60)] == [JobState.cancelled]
        assert s.get(Job, job_id).finished_at is not None


def test_cancel_running_sets_flag_seen_by_heartbeat(db: Database) -> None:
    job_id = new_job(db)
    with db.session() as s:
        attempt = jobs.claim(s, job_id, "w")
        assert leases.heartbeat(s, jobs.LEASE, job_id, attempt) == leases.Beat(owned=True, cancel=False)
        assert jobs.request_cancel(s, job_id) == JobState.running
        assert leases.heartbeat(s, jobs.LEASE, job_id, attempt) == leases.Beat(owned=True, cancel=True)
        assert jobs.mark_cancelled(s, job_id, attempt)
    assert state_events(db, job_id) == ["queued", "running", "cancelled"]


def test_event_sequence_is_gapless(db: Database) -> None:
    job_id = new_job(db)
    with db.session() as s:
        attempt = jobs.claim(s, job_id, "w")
        for i in range(5):
            jobs.report_progress(s, job_id, attempt, i / 5, f"step {i}")
        jobs.succeed(s, job_id, attempt, {})
    from sqlalchemy import select

    from app.models import JobEvent

    with db.session() as s:
        seqs = s.scalars(select(JobEvent.seq).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)).all()
    assert seqs == list(range(1, 9))


def all_events(db: Database, job_id: int) -> list[tuple[int, str, dict]]:
    from sqlalchemy import select

    from app.models import JobEvent

    with db.session() as s:
        rows = s.execute(
            select(JobEvent.seq, JobEvent.type, JobEvent.data).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        ).all()
        return [(seq, type_, data) for seq, type_, data in rows]


def claimed_job_context(db: Database, tmp_path) -> tuple:  # noqa: ANN001
    """(job id, its Claimed, the worker's JobContext) of a new job claimed by worker "w"."""
    from app.config import from_env
    from workers.runtime import JobContext

    job_id = new_job(db)
    with db.session() as s:
        claimed = jobs.claim_job(s, job_id, "w", max_running=0)
    assert isinstance(claimed, jobs.Claimed)
    return job_id, claimed, JobContext(db, from_env({}, home=tmp_path), job_id, claimed.attempt, claimed.job.tenant_id, {})


def test_a_report_of_completion_is_written_by_the_outcome_statement(db: Database, tmp_path) -> None:  # noqa: ANN001
    job_id, claimed, ctx = claimed_job_context(db, tmp_path)
    ctx.progress(0.5, "half", force=True)
    ctx.progress(1.0, "step 2/2", step=2)
    assert [t for _seq, t, _data in all_events(db, job_id)] == ["state", "state", "progress"]  # 1.0 held back
    with db.session() as s:
        assert jobs.succeed(
            s, job_id, claimed.attempt, {}, started_at=claimed.job.started_at, last_report=ctx.final_report
        )
    written = all_events(db, job_id)
    assert [seq for seq, _t, _data in written] == [1, 2, 3, 4, 5]
    assert [(t, data.get("progress"), data.get("to")) for _seq, t, data in written][2:] == [
        ("progress", 0.5, None),
        ("progress", 1.0, None),
        ("state", None, "succeeded"),
    ]
    assert written[3][2] == {"progress": 1.0, "message": "step 2/2", "step": 2}
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.progress, job.message, job.event_seq) == (1.0, "succeeded", 5)


def test_a_failure_after_a_report_of_completion_keeps_the_report(db: Database, tmp_path) -> None:  # noqa: ANN001
    job_id, claimed, ctx = claimed_job_context(db, tmp_path)
    ctx.progress(1.0, "done", rows=3)
    with db.session() as s:
        assert jobs.fail(s, job_id, claimed.attempt, "saving failed", last_report=ctx.final_report)
        assert not jobs.fail(s, job_id, claimed.attempt, "again", last_report=ctx.final_report)  # ended: no events
    assert [(seq, t, data.get("message")) for seq, t, data in all_events(db, job_id)][2:] == [
        (3, "progress", "done"),
        (4, "state", None),
    ]
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and (job.state, job.progress, job.message) == (JobState.failed, 1.0, "failed")


def test_migrations_match_models(db: Database) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from app.db import Base

    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
