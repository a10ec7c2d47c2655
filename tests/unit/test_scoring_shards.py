"""Score shards in SQL: creation once per job, compare-and-set claims fenced by attempt,
heartbeats, stale-shard release, cancel, summaries."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from app import auth, jobs
from app.config import from_env
from app.db import Database
from app.migrate import upgrade
from app.models import JobState, ScoreShard, ShardState, utcnow
from workers.scoring import shards


@pytest.fixture()
def db(tmp_path):  # noqa: ANN001, ANN201
    settings = from_env({}, home=tmp_path / "home")
    upgrade(settings)
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
        assert shards.heartbeat(s, c.id, c.attempt, 5)
        assert not shards.heartbeat(s, c.id, c.attempt + 1, 5)
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
        assert shards.release_stale(s, 30) == [(job, 0, "cpu", JobState.running, ShardState.pending)]
        assert not shards.heartbeat(s, first.id, first.attempt, 1)  # the lost worker learns it lost the shard
        second = shards.claim(s, job, 0, "w2")
        assert second.attempt == 2
        assert shards.release_stale(s, 30) == []  # fresh heartbeat
        s.execute(update(ScoreShard).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
        assert shards.release_stale(s, 30)[0][4] == ShardState.failed
        summ = shards.summary(s, job)
    assert summ["failed"] == 1 and summ["error"] == (0, "worker lost")


def test_release_with_error_retries_until_max_attempts(db) -> None:  # noqa: ANN001
    job = new_job(db, max_attempts=2)
    with db.session() as s:
        shards.create_shards(s, job, BLOCKS[:1])
        c = shards.claim(s, job, 0, "w")
        assert shards.release(s, c.id, c.attempt, error="boom", max_attempts=2) == ShardState.pending
        c = shards.claim(s, job, 0, "w")
        assert shards.release(s, c.id, c.attempt, error="boom again", max_attempts=2) == ShardState.failed
        assert shards.release(s, c.id, c.attempt) is None  # no longer owned


def test_cancel_stops_pending_and_running_not_done(db) -> None:  # noqa: ANN001
    job = new_job(db)
    with db.session() as s:
        shards.create_shards(s, job, BLOCKS)
        done = shards.claim(s, job, 0, "w")
        shards.finish(s, done.id, done.attempt, rows=10, valid=10, output_uri="file:///x", stats={})
        running = shards.claim(s, job, 1, "w")
        assert shards.cancel_shards(s, job) == 2
        assert not shards.heartbeat(s, running.id, running.attempt, 3)
        assert [sh.state for sh in shards.shards_of(s, job)] == [ShardState.done, ShardState.cancelled,
                                                                 ShardState.cancelled]


def test_shard_task_ids_are_not_job_task_ids() -> None:
    from app.dispatch import job_id_from_task_id

    tid = shards.shard_task_id(12, 3)
    assert shards.parse_shard_task_id(tid) == (12, 3)
    assert job_id_from_task_id(tid) is None  # the job reconciler must not count it as the job's message
    assert shards.parse_shard_task_id("job-12-abcdef12") is None


def test_reconcile_republishes_only_shards_the_broker_lost(tmp_path, redis_url) -> None:  # noqa: ANN001
    import redis

    from app.broker import create_celery, queue_names

    settings = from_env({}, home=tmp_path / "home", broker_url=redis_url, requeue_grace_s=0.0)
    upgrade(settings)
    db = Database(settings.sqlalchemy_url)
    celery = create_celery(settings)
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
        job = new_job(db)
        with db.session() as s:
            shards.create_shards(s, job, BLOCKS)
        assert shards.publish_shards(celery, db, [(job, i, "cpu") for i in range(3)]) == 3
        assert shards.shards_in_broker(client, queue_names(settings)) == {(job, 0), (job, 1), (job, 2)}
        assert shards.reconcile_shards(db, settings, celery, queue_names(settings)) == 0  # all still queued
        client.flushall()  # Redis lost its queues
        with db.session() as s:
            shards.claim(s, job, 0, "w")  # a running shard is not republished
        assert shards.reconcile_shards(db, settings, celery, queue_names(settings)) == 2
        assert shards.shards_in_broker(client, queue_names(settings)) == {(job, 1), (job, 2)}
    finally:
        client.flushall()
        client.close()
        db.dispose()
