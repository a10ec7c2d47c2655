"""The job state machine's unit tests (tests/unit/test_job_state_machine.py, on SQLite there)
run again here against PostgreSQL: the same functions, with `db` on the session's database."""
from __future__ import annotations

import pytest

from app.db import Database
from tests.unit.test_job_state_machine import *  # noqa: F403  (collects the same tests here)

pytestmark = pytest.mark.integration


@pytest.fixture
def db(pg_settings):
    database = Database(pg_settings.sqlalchemy_url)
    yield database
    database.dispose()


def test_a_row_locked_by_a_worker_cut_off_mid_transaction_stalls_no_reaping_and_is_released(db: Database) -> None:
    """Found by the chaos suite (partition_pg, seed 14): a worker cut off from PostgreSQL inside
    a transaction kept its job row locked for the whole partition, and the reaper blocked on it.
    Now the reaper skips locked rows, and a worker's session idle in a transaction past the
    heartbeat timeout is ended by the server, which releases the lock."""
    import time

    from sqlalchemy import select

    from app import jobs
    from app.models import Job, JobState
    from tests.unit.test_job_state_machine import backdate, new_job

    stuck, other = new_job(db), new_job(db)
    for job_id in (stuck, other):
        with db.session() as s:
            jobs.claim(s, job_id, "w")
        backdate(db, job_id)
    cut_off = Database(db.url, idle_in_transaction_s=4.0)  # as a worker's (heartbeat timeout)
    try:
        session = cut_off.sessionmaker()
        session.execute(select(Job.id).where(Job.id == stuck).with_for_update()).all()  # then silence
        started = time.monotonic()
        with db.session() as s:
            reaped = {r.job_id for r in jobs.reap_stale(s, timeout_s=60)}
        assert other in reaped and stuck not in reaped  # not blocked by the lock
        assert time.monotonic() - started < 3.0  # a blocked reaper waits out the 4 s timeout
        time.sleep(5.0)  # the server ends the idle transaction: the lock goes with it
        with db.session() as s:
            assert stuck in {r.job_id for r in jobs.reap_stale(s, timeout_s=60)}
            assert s.get(Job, stuck).state == JobState.queued
        session.invalidate()  # its connection was ended by the server
    finally:
        cut_off.dispose()


def test_concurrent_claims_never_take_more_than_the_tenants_free_slots(db: Database) -> None:
    """Eight workers claim eight jobs of one tenant at once, each in autocommit as a worker does
    (Database.run): with a limit of 2 on the queue, exactly 2 win and the others are told to wait,
    round after round; the lock in the claim's condition (migration 0014) serialises them."""
    import threading

    from sqlalchemy import func, select

    from app import auth, jobs
    from app.models import Job, JobState

    workers = [Database(db.url) for _ in range(8)]
    try:
        with db.session() as s:
            tenant = auth.create_tenant(s, "claim-race")
        for _round in range(5):
            with db.session() as s:
                ids = [jobs.submit(s, tenant_id=tenant.id, kind="sleep", spec={}, queue="cpu")[0].id for _ in range(8)]
            start, outcomes = threading.Barrier(8), []

            def claim(worker: Database, job_id: int) -> None:
                start.wait()
                outcomes.append(worker.run(lambda s: jobs.claim_job(s, job_id, "w", 2), one_statement=True))

            threads = [threading.Thread(target=claim, args=pair) for pair in zip(workers, ids)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sum(isinstance(o, jobs.Claimed) for o in outcomes) == 2, outcomes
            assert sum(isinstance(o, jobs.Waiting) for o in outcomes) == 6, outcomes
            with db.session() as s:
                running = s.scalar(
                    select(func.count()).where(Job.tenant_id == tenant.id, Job.state == JobState.running)
                )
                assert running == 2
                for job_id in ids:  # end the round: the running ones succeed, the waiting ones are cancelled
                    jobs.request_cancel(s, job_id)
                for job in s.scalars(select(Job).where(Job.id.in_(ids), Job.state == JobState.running)):
                    assert jobs.succeed(s, job.id, job.attempts, {})
    finally:
        for worker in workers:
            worker.dispose()
