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
