"""Score shards in SQL: creation once per job, and the shard lease (app/leases.py, kind
SHARDS): compare-and-set claims fenced by attempt, heartbeats, stale-shard reaping, cancel,
summaries, publishing and reconciling with the broker."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from app import auth, jobs, leases
from app.config import from_env
from app.db import Database
from app.models import JobState, ScoreShard, ShardState, utcnow
from workers.scoring import shards
from tests.conftest import use_template

SHARDS = leases.SHARDS


def beat(s, c, rows_done: int) -> bool:  # noqa: ANN001
    return leases.heartbeat(s, SHARDS, c.id, c.attempt, {"rows_done": rows_done}).owned


@pytest.fixture()
def db(tmp_path, sqlite_template):  # noqa: ANN001, ANN201
    settings = from_env({}, home=tmp_path / "home")
    use_template(settings, sqlite_template)
    database = Database(settings.sqlalchemy_url)
    yield database
    database.dispose()


def new_job(db: Database, state: JobState = JobState.running, max_attempts: int = 2) -> int:
    with db.session() as s:
        tenant = auth.create_tenant(s, f"t{utcnow().timestamp()}")
        job, _ = jobs.submit(s, tenant_id=tenant.id, kind="score", spec={}, queue="cpu", max_attempts=max_attempts)
        if state != JobState.queued:
            jobs.claim(s, job.id, "w")
        return job.id


BLOCKS = [(0, 10, 7), (10, 20, 107), (20, 25, 207)]


def test_shards_are_created_once(db) -> None:  # noqa: ANN001
    job = new_job(db)
    with db.session() as s:
        assert shards.create_shards(s, job, BLOCKS) is True
    with db.session() as s:
        assert shards.create_shards(s, job, BLOCKS[:1]) is False  # a re-run parent keeps them
        got = shards.shards_of(s, job)
    assert [(sh.index, sh.start_row, sh.stop_row, sh.offset, sh.state) for sh in got] == [
        (i, a, b, o, ShardState.pending) for i, (a, b, o) in enumerate(BLOCKS)]


def test_claim_is_compare_and_set_and_fenced_by_attempt(db) -> None:  # noqa: ANN001
    job = new_job(db)
    with db.session() as s:
        shards.create_shards(s, job, BLOCKS)
    with db.session() as s:
        c = shards.claim(s, job, 1, "w1")
        assert c is not None and (c.index, c.start_row, c.stop_row, c.offset, c.attempt) == (1, 10, 20, 107, 1)
        assert shards.claim(s, job, 1, "w2") is None  # a duplicate delivery loses
        assert shards.claim_next(s, job, "w2").index == 0
        assert shards.claim_next(s, job, "w2").index == 2
        assert shards.claim_next(s, job, "w2") is None
        assert beat(s, c, 5)
        assert not leases.heartbeat(s, SHARDS, c.id, c.attempt + 1, {"rows_done": 5}).owned
        summ = shards.summary(s, job)
    assert (summ["running"], summ["rows_done"], summ["rows_total"], summ["shards"]) == (3, 5, 25, 3)
    with db.session() as s:
        assert shards.finish(s, c.id, c.attempt, rows=10, valid=9, output_uri="file:///x", stats={"k": 1})
        assert not shards.finish(s, c.id, c.attempt, rows=10, valid=9, output_uri="file:///y", stats={})
        summ = shards.summary(s, job)
    assert (summ["done"], summ["running"], summ["rows_done"]) == (1, 2, 10)


def test_stale_shards_go_back_to_pending_then_fail_when_attempts_are_spent(db) -> None:  # noqa: ANN001
    job = new_job(db, max_attempts=2)
    with db.session() as s:
        shards.create_shards(s, job, BLOCKS[:1])
        first = shards.claim(s, job, 0, "w1")
        s.execute(update(ScoreShard).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
        got = leases.reap(s, SHARDS, 30)
        assert [(r.job_id, r.key, r.queue, r.state) for r in got] == [(job, (job, 0), "cpu", ShardState.pending)]
        assert not beat(s, first, 1)  # the lost worker learns it lost the shard
        second = shards.claim(s, job, 0, "w2")
        assert second.attempt == 2
        assert leases.reap(s, SHARDS, 30) == []  # fresh heartbeat
        s.execute(update(ScoreShard).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
        assert [r.state for r in leases.reap(s, SHARDS, 30)] == [ShardState.failed]
        summ = shards.summary(s, job)
    assert summ["failed"] == 1 and summ["error"] == (0, "worker lost")


def test_release_with_error_retries_until_max_attempts(db) -> None:  # noqa: ANN001
    job = new_job(db, max_attempts=2)
    with db.session() as s:
        shards.create_shards(s, job, BLOCKS[:1])
        c = shards.claim(s, job, 0, "w")
        assert shards.release(s, c.id, c.attempt, error="boom") == ShardState.pending
        c = shards.claim(s, job, 0, "w")
        assert shards.release(s, c.id, c.attempt, error="boom again") == ShardState.failed
        assert shards.release(s, c.id, c.attempt) is None  # no longer owned
        assert shards.summary(s, job)["error"] == (0, "boom again")


def test_a_released_shard_of_a_cancelled_job_is_cancelled_and_a_stop_is_not_a_failure(db) -> None:  # noqa: ANN001
    job = new_job(db, max_attempts=1)
    with db.session() as s:
        shards.create_shards(s, job, BLOCKS[:2])
        c = shards.claim(s, job, 0, "w")
        assert shards.release(s, c.id, c.attempt) == ShardState.pending  # stopped: no error, retried
        c = shards.claim(s, job, 1, "w")
        jobs.request_cancel(s, job)
        assert leases.heartbeat(s, SHARDS, c.id, c.attempt) == leases.Beat(owned=True, cancel=True)
        assert shards.release(s, c.id, c.attempt, error="boom") == ShardState.cancelled


def test_cancel_stops_pending_and_running_not_done(db) -> None:  # noqa: ANN001
    job = new_job(db)
    with db.session() as s:
        shards.create_shards(s, job, BLOCKS)
        done = shards.claim(s, job, 0, "w")
        shards.finish(s, done.id, done.attempt, rows=10, valid=10, output_uri="file:///x", stats={})
        running = shards.claim(s, job, 1, "w")
        assert shards.cancel_shards(s, job) == 2
        assert not beat(s, running, 3)
        assert [sh.state for sh in shards.shards_of(s, job)] == [ShardState.done, ShardState.cancelled,
                                                                 ShardState.cancelled]


def test_shard_task_ids_are_not_job_task_ids() -> None:
    from app.dispatch import job_id_from_task_id

    tid = SHARDS.task_id((12, 3))
    assert SHARDS.parse_task_id(tid) == (12, 3)
    assert job_id_from_task_id(tid) is None  # the job reconciler must not count it as the job's message
    assert SHARDS.parse_task_id(jobs.LEASE.task_id((12,))) is None
    assert jobs.LEASE.parse_task_id(jobs.LEASE.task_id((12,))) == (12,)


def test_reconcile_republishes_only_shards_the_broker_lost(tmp_path, broker_url, sqlite_template) -> None:  # noqa: ANN001
    import redis

    from app import dispatch
    from app.broker import create_celery, queue_names

    from kombu import pools

    pools.reset()  # kombu's producer pools outlive a test; this test's in-memory Redis is new
    settings = from_env({}, home=tmp_path / "home", broker_url=broker_url, requeue_grace_s=0.0)
    use_template(settings, sqlite_template)
    db = Database(settings.sqlalchemy_url)
    celery = create_celery(settings)
    client = redis.Redis.from_url(broker_url)
    try:
        client.flushall()
        job = new_job(db)
        with db.session() as s:
            shards.create_shards(s, job, BLOCKS)
        assert dispatch.publish(celery, db, SHARDS, [((job, i), "cpu") for i in range(3)]) == 3
        assert dispatch.units_in_broker(client, queue_names(settings))["shard"] == {(job, 0), (job, 1), (job, 2)}
        assert dispatch.republish(celery, db, settings) == 0  # all still queued
        client.flushall()  # Redis lost its queues
        with db.session() as s:
            shards.claim(s, job, 0, "w")  # a running shard is not republished
        assert dispatch.republish(celery, db, settings) == 2
        assert dispatch.units_in_broker(client, queue_names(settings)) == {"job": set(), "shard": {(job, 1), (job, 2)}}
    finally:
        client.flushall()
        client.close()
        db.dispose()
