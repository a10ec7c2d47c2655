"""One lease model (app/leases.py, workers/lease.py) for jobs and scoring shards (SQLite and
the in-memory broker of tests/unit/conftest.py): the retry decision, heartbeats with attempt fencing and cancel,
reaping, the maintenance tick, publishing through one broker scan, and the notifications
that wake a scoring parent."""
from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from app import auth, dispatch, jobs, leases
from app.db import Database
from app.models import Job, JobEvent, JobState, ScoreShard, ShardState, utcnow
from app.notify import EventHub, Notifier
from workers.lease import Lease
from workers.scoring import shards
from tests.conftest import use_template

SHARDS = leases.SHARDS
BLOCKS = [(0, 10, 0), (10, 20, 100), (20, 25, 200)]


@pytest.fixture()
def settings(tmp_path, broker_url, sqlite_template):  # noqa: ANN001, ANN201
    from kombu import pools

    from app.config import from_env

    # kombu keeps producer pools per broker URL for the whole process: drop the previous
    # test's, whose connections point at that test's in-memory Redis
    pools.reset()

    settings = from_env({}, home=tmp_path / "home", broker_url=broker_url, requeue_grace_s=30.0)
    use_template(settings, sqlite_template)
    return settings


@pytest.fixture()
def db(settings):  # noqa: ANN001, ANN201
    database = Database(settings.sqlalchemy_url, notifier=Notifier(settings.broker_url))
    yield database
    database.dispose()


def new_job(db: Database, *, claimed: bool = True, max_attempts: int = 2, blocks: list | None = None) -> int:
    with db.session() as s:
        tenant = auth.create_tenant(s, f"lease-{time.monotonic_ns()}")
        job, _ = jobs.submit(s, tenant_id=tenant.id, kind="score", spec={}, queue="cpu", max_attempts=max_attempts)
        if claimed:
            jobs.claim(s, job.id, "parent")
        if blocks:
            shards.create_shards(s, job.id, blocks)
        return job.id


def backdate(db: Database, model: type, where: tuple, seconds: float = 120) -> None:
    with db.session() as s:
        s.execute(update(model).where(*where).values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def wait_until(predicate, timeout: float = 10.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# -- the one retry decision --------------------------------------------------------------------

def test_after_failure_is_the_one_retry_decision() -> None:
    assert leases.after_failure(1, 3) == leases.Outcome.retry
    assert leases.after_failure(3, 3) == leases.Outcome.fail
    assert leases.after_failure(1, 3, cancel_requested=True) == leases.Outcome.cancel


def test_every_kind_is_registered_jobs_first() -> None:
    assert [k.name for k in leases.kinds()] == ["job", "shard"]
    for kind in leases.kinds():
        key = (7,) * len(kind.key)
        assert kind.parse_task_id(kind.task_id(key)) == key
        assert all(other.parse_task_id(kind.task_id(key)) is None for other in leases.kinds() if other is not kind)


# -- claim, heartbeat, cancel, reap for both kinds -----------------------------------------------

def test_a_claim_is_compare_and_set_for_jobs_and_shards(db: Database) -> None:
    job_id = new_job(db, claimed=False)
    with db.session() as s:
        assert leases.claim(s, jobs.LEASE, job_id, "w1") == (1,)
        assert leases.claim(s, jobs.LEASE, job_id, "w2") is None
        shards.create_shards(s, job_id, BLOCKS)
        sid = s.scalar(select(ScoreShard.id).where(ScoreShard.job_id == job_id, ScoreShard.index == 1))
        assert leases.claim(s, SHARDS, sid, "w3", returning=(ScoreShard.index,)) == (1, 1)
        assert leases.claim(s, SHARDS, sid, "w4") is None
        event = s.scalars(select(JobEvent.data).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)).all()[-1]
    assert event == {"to": "running", "attempt": 1, "from": "queued", "worker": "w1"}


def test_a_shard_heartbeat_reports_its_jobs_cancel_and_end(db: Database) -> None:
    job_id = new_job(db, blocks=BLOCKS)
    with db.session() as s:
        a = shards.claim(s, job_id, 0, "w")
        b = shards.claim(s, job_id, 1, "w")
        assert leases.heartbeat(s, SHARDS, a.id, a.attempt) == leases.Beat(owned=True, cancel=False)
        jobs.request_cancel(s, job_id)
        assert leases.heartbeat(s, SHARDS, a.id, a.attempt) == leases.Beat(owned=True, cancel=True)
        assert leases.heartbeat(s, SHARDS, b.id, b.attempt + 1) == leases.Beat(owned=False, cancel=False)
    other = new_job(db, blocks=BLOCKS)
    with db.session() as s:
        c = shards.claim(s, other, 0, "w")
        jobs.fail(s, other, 1, "parent failed")  # the job ended without a cancel request
        assert leases.heartbeat(s, SHARDS, c.id, c.attempt) == leases.Beat(owned=True, cancel=True)


def test_the_reaper_treats_jobs_and_shards_alike(db: Database) -> None:
    job_id = new_job(db, max_attempts=2, blocks=BLOCKS[:1])
    with db.session() as s:
        c = shards.claim(s, job_id, 0, "w")
    backdate(db, ScoreShard, (ScoreShard.id == c.id,))
    backdate(db, Job, (Job.id == job_id,))
    with db.session() as s:
        reaped = [leases.reap(s, kind, 60) for kind in leases.kinds()]
        job = s.get(Job, job_id)
        shard = s.get(ScoreShard, c.id)
        assert (job.state, job.published_at, shard.state, shard.published_at) == (
            JobState.queued, None, ShardState.pending, None)  # both need a new message
    assert [[(r.kind.name, r.key, r.state) for r in rs] for rs in reaped] == [
        [("job", (job_id,), JobState.queued)], [("shard", (job_id, 0), ShardState.pending)]]
    with db.session() as s:  # the job's next attempt: attempts are spent for both on the next loss
        assert jobs.claim(s, job_id, "w2") == 2
        c2 = shards.claim(s, job_id, 0, "w2")
    backdate(db, ScoreShard, (ScoreShard.id == c.id,))
    backdate(db, Job, (Job.id == job_id,))
    with db.session() as s:
        got = [r.state for kind in (SHARDS, jobs.LEASE) for r in leases.reap(s, kind, 60)]
        assert got == [ShardState.failed, JobState.failed]
        assert s.get(ScoreShard, c2.id).error == "worker lost" and s.get(Job, job_id).error == "worker lost"


# -- the maintenance tick and the broker -------------------------------------------------------------

def test_the_tick_cancels_units_of_ended_jobs_and_removes_their_scratch(db: Database, settings) -> None:  # noqa: ANN001
    from workers.runtime import scratch_dir
    from workers.tasks import reap

    job_id = new_job(db, blocks=BLOCKS)
    with db.session() as s:
        shards.claim(s, job_id, 0, "w")
        tenant_id = s.get(Job, job_id).tenant_id
    scratch = scratch_dir(settings, tenant_id, job_id)
    (scratch / "parts").mkdir(parents=True)
    (scratch / "parts" / "shard-000000-a1.parquet").write_bytes(b"x")
    backdate(db, Job, (Job.id == job_id,))
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(max_attempts=1))
    reaped = reap(db, settings)
    assert [(r.kind.name, r.state) for r in reaped] == [("job", JobState.failed)]
    with db.session() as s:
        assert {sh.state for sh in shards.shards_of(s, job_id)} == {ShardState.cancelled}
    assert not scratch.exists()


def test_one_broker_scan_finds_jobs_and_shards_queued_and_unacked(db: Database, settings) -> None:  # noqa: ANN001
    import redis

    from app.broker import create_celery, queue_names

    celery = create_celery(settings)
    client = redis.Redis.from_url(settings.broker_url)
    try:
        client.flushall()
        job_id = new_job(db, claimed=False)
        parent = new_job(db, blocks=BLOCKS)
        assert dispatch.publish_jobs(celery, db, [(job_id, "cpu")]) == 1
        assert dispatch.publish(celery, db, SHARDS, [((parent, 1), "gpu")]) == 1
        # a message a worker took but has not acked: kombu keeps [message, exchange, routing_key]
        delivered = {"headers": {"id": SHARDS.task_id((parent, 2))}}
        client.hset("unacked", "tag-1", json.dumps([delivered, "cpu", "cpu"]))
        assert dispatch.units_in_broker(client, queue_names(settings)) == {
            "job": {(job_id,)}, "shard": {(parent, 1), (parent, 2)}}
    finally:
        client.flushall()
        client.close()


def test_republish_sends_reaped_units_even_when_their_old_message_is_unacked(db: Database, settings) -> None:  # noqa: ANN001
    import redis

    from app.broker import create_celery, queue_names

    celery = create_celery(settings)
    client = redis.Redis.from_url(settings.broker_url)
    try:
        client.flushall()
        job_id = new_job(db, claimed=False)
        assert dispatch.publish_jobs(celery, db, [(job_id, "cpu")]) == 1
        assert dispatch.republish(celery, db, settings) == 0  # published just now and still queued
        with db.session() as s:
            jobs.claim(s, job_id, "dies")
        # the dead worker's message stays in `unacked` (the visibility timeout is a week)
        client.hset("unacked", "tag-1", json.dumps([{"headers": {"id": jobs.LEASE.task_id((job_id,))}}, "", "cpu"]))
        backdate(db, Job, (Job.id == job_id,))
        with db.session() as s:
            assert [r.state for r in jobs.reap_stale(s, 60)] == [JobState.queued]
        assert dispatch.republish(celery, db, settings) == 1
        assert dispatch.republish(celery, db, settings) == 0  # stamped: not sent twice
        queued = client.lrange("cpu", 0, -1)
        assert len(queued) == 2 and all(dispatch.job_id_from_task_id(json.loads(m)["headers"]["id"]) == job_id
                                        for m in queued)
        assert dispatch.units_in_broker(client, queue_names(settings))["job"] == {(job_id,)}
    finally:
        client.flushall()
        client.close()


# -- the worker's Lease thread and the parent's notifications --------------------------------

def test_the_lease_thread_beats_and_sees_cancel_and_loss(db: Database) -> None:
    job_id = new_job(db, blocks=BLOCKS)
    with db.session() as s:
        c = shards.claim(s, job_id, 0, "w")
    rows = {"n": 0}
    with Lease(db, SHARDS, c.id, c.attempt, 0.05, extra=lambda: {"rows_done": rows["n"]}) as lease:
        rows["n"] = 7
        assert wait_until(lambda: _rows_done(db, c.id) == 7)  # each beat writes the progress columns
        assert not lease.check()
        with db.session() as s:
            jobs.request_cancel(s, job_id)
        assert wait_until(lambda: lease.cancelled) and lease.check() and not lease.lost
    with db.session() as s:
        d = shards.claim(s, job_id, 1, "w")
    with Lease(db, SHARDS, d.id, d.attempt, 0.05) as lease:
        with db.session() as s:
            shards.cancel_shards(s, job_id)
        assert wait_until(lambda: lease.lost)


def _rows_done(db: Database, shard_id: int) -> int:
    with db.session() as s:
        return s.get(ScoreShard, shard_id).rows_done


def test_job_context_exposes_lost_and_cancelled(db: Database, settings) -> None:  # noqa: ANN001
    from workers.runtime import JobCancelled, JobContext, JobLost

    job_id = new_job(db, claimed=False)
    with db.session() as s:
        attempt = jobs.claim(s, job_id, "w")
    ctx = JobContext(db, settings, job_id, attempt, 1, {})
    assert not ctx.should_stop(poll_s=0) and not ctx.lost and not ctx.cancelled
    with db.session() as s:
        jobs.request_cancel(s, job_id)
    assert ctx.should_stop(poll_s=0) and ctx.cancelled and not ctx.lost
    with pytest.raises(JobCancelled):
        ctx.check_cancel()
    backdate(db, Job, (Job.id == job_id,))
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=False))
        jobs.reap_stale(s, 60)  # re-queued: this attempt is fenced off
    with pytest.raises(JobLost):
        ctx.progress(0.5, force=True)
    assert ctx.lost


def test_finishing_or_releasing_a_shard_wakes_the_parent(db: Database, settings) -> None:  # noqa: ANN001
    job_id = new_job(db, blocks=BLOCKS)
    hub = EventHub(settings.broker_url)
    try:
        with hub.watch(job_id) as watch:
            assert hub.connected.wait(10)
            watch.wait(0)  # drop the wake-up a hub may send every watcher when it (re)subscribes
            with db.session() as s:
                c = shards.claim(s, job_id, 0, "w")
            assert not watch.wait(0.2)  # a claim is not news for the parent
            with db.session() as s:
                assert shards.finish(s, c.id, c.attempt, rows=10, valid=10, output_uri="file:///x", stats={})
            assert watch.wait(10)
            with db.session() as s:
                c = shards.claim(s, job_id, 1, "w")
            watch.wait(0)
            with db.session() as s:
                assert shards.release(s, c.id, c.attempt, error="boom") == ShardState.pending
            assert watch.wait(10)
    finally:
        hub.close()
