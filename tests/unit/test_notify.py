"""app.notify: commits publish the job ids they touched (rollbacks do not), the EventHub wakes
the watchers of exactly those jobs (threads and coroutines), and a missed notification only
delays a watcher until its safety-net timeout. Redis is fakeredis (it speaks pub/sub)."""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import fakeredis
import pytest
import redis
from sqlalchemy import Column, Integer, create_engine
from sqlalchemy.orm import DeclarativeBase, sessionmaker
from sqlalchemy.pool import StaticPool

from app import notify
from app.notify import CHANNEL, EventHub, Notifier


class _Base(DeclarativeBase):
    pass


class _Row(_Base):
    __tablename__ = "rows"
    id = Column(Integer, primary_key=True)


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def factory_for(server: fakeredis.FakeServer):
    return lambda: fakeredis.FakeRedis(server=server)


def memory_engine():
    """One in-memory SQLite database shared by every thread (commits come from a timer thread)."""
    engine = create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    _Base.metadata.create_all(engine)
    return engine


@pytest.fixture
def sessions(server):
    engine = memory_engine()
    factory = sessionmaker(engine, expire_on_commit=False)
    Notifier(factory=factory_for(server)).install(factory)
    yield factory
    engine.dispose()


@pytest.fixture
def subscriber(server):
    pubsub = fakeredis.FakeRedis(server=server).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CHANNEL)
    yield pubsub
    pubsub.close()


def published(pubsub: Any, wait_s: float = 0.3) -> list[int]:
    """Every job id published until nothing arrives for wait_s. (get_message also answers None
    for the subscribe confirmation, so a None alone does not end the wait.)"""
    got = []
    quiet_until = time.monotonic() + wait_s
    while time.monotonic() < quiet_until:
        message = pubsub.get_message(timeout=max(0.0, quiet_until - time.monotonic()))
        if message is not None and message["type"] == "message":
            got.append(int(message["data"]))
            quiet_until = time.monotonic() + wait_s
    return got


@pytest.fixture
def hub(server):
    hub = EventHub(factory=factory_for(server))
    yield hub
    hub.close()


def connected(hub: EventHub) -> EventHub:
    """Start the hub's listener and wait (on the condition, bounded) until it is subscribed."""
    with hub.watch(0):
        assert hub.connected.wait(5), "the hub never subscribed"
    return hub


# -- publishing ----------------------------------------------------------------------------

def test_commit_publishes_each_touched_job_once(sessions, subscriber) -> None:
    with sessions() as s:
        s.add(_Row())
        notify.touch(s, 3)
        notify.touch(s, 3)
        notify.touch(s, 1)
        assert published(subscriber, 0.1) == []  # nothing before the commit
        s.commit()
    assert sorted(published(subscriber)) == [1, 3]


def test_rollback_publishes_nothing_and_forgets(sessions, subscriber) -> None:
    with sessions() as s:
        s.add(_Row())
        notify.touch(s, 5)
        s.rollback()
        s.add(_Row())
        s.commit()  # a later commit of the same session must not publish the rolled-back id
    assert published(subscriber) == []


def test_close_without_commit_forgets(sessions, subscriber) -> None:
    s = sessions()
    s.add(_Row())
    s.flush()
    notify.touch(s, 6)
    s.close()  # rolled back by closing
    s.add(_Row())
    s.commit()
    s.close()
    assert published(subscriber) == []


def test_savepoint_rollback_keeps_the_outer_transactions_touches(sessions, subscriber) -> None:
    with sessions() as s:
        notify.touch(s, 7)
        s.add(_Row())
        with s.begin_nested() as nested:
            s.add(_Row())
            nested.rollback()
        s.commit()
    assert published(subscriber) == [7]


def test_publish_failure_never_breaks_the_commit(caplog) -> None:
    def down() -> redis.Redis:
        raise redis.ConnectionError("redis is down")

    engine = memory_engine()
    factory = sessionmaker(engine)
    Notifier(factory=down).install(factory)
    with factory() as s:
        s.add(_Row())
        notify.touch(s, 1)
        s.commit()
    with factory() as s:
        assert s.query(_Row).count() == 1
    assert "watchers will poll" in caplog.text
    engine.dispose()


# -- watching ------------------------------------------------------------------------------

def test_a_watcher_is_woken_by_its_jobs_commit(sessions, hub) -> None:
    connected(hub)
    with hub.watch(42) as watch:
        assert hub.watching() == 1

        def commit_later() -> None:
            with sessions() as s:
                s.add(_Row())
                notify.touch(s, 42)
                s.commit()

        t0 = time.monotonic()
        threading.Timer(0.05, commit_later).start()
        assert watch.wait(10) is True
        assert time.monotonic() - t0 < 5  # woken, not timed out (10 s)
    assert hub.watching() == 0


def test_other_jobs_do_not_wake_a_watcher(server, hub) -> None:
    connected(hub)
    notifier = Notifier(factory=factory_for(server))
    with hub.watch(1) as mine, hub.watch(2) as other:
        notifier.publish([2])
        assert other.wait(10) is True
        assert mine.wait(0.2) is False


def test_a_notification_before_the_wait_still_counts(server, hub) -> None:
    """Registered before the read: a commit between the read and the wait is not lost."""
    connected(hub)
    with hub.watch(9) as watch:
        Notifier(factory=factory_for(server)).publish([9])
        deadline = time.monotonic() + 5
        while not watch._waiter.flag.is_set() and time.monotonic() < deadline:  # delivered, nobody waiting yet
            time.sleep(0.01)
        assert watch.wait(0) is True
        assert watch.wait(0) is False  # consumed


def test_async_watchers_are_woken_on_their_loop(server, hub) -> None:
    connected(hub)
    notifier = Notifier(factory=factory_for(server))

    async def main() -> tuple[bool, bool, float]:
        loop = asyncio.get_running_loop()
        with hub.watch(11, loop=loop) as watch:
            t0 = time.monotonic()
            loop.call_later(0.05, lambda: threading.Thread(target=notifier.publish, args=([11],)).start())
            woke = await watch.wait_async(10)
            elapsed = time.monotonic() - t0
        with hub.watch(12, loop=loop) as quiet:
            timed_out = await quiet.wait_async(0.1)  # nothing published for job 12: the timeout path
        return woke, timed_out, elapsed

    woke, timed_out, elapsed = asyncio.run(main())
    assert woke is True
    assert elapsed < 5  # woken, not timed out (10 s)
    assert timed_out is False


def test_the_hub_rewakes_everyone_when_it_connects(server) -> None:
    """Whatever was published while the hub was away is re-read: connecting fires all waiters."""
    attempts = []

    def flaky() -> redis.Redis:
        attempts.append(1)
        if len(attempts) == 1:
            raise redis.ConnectionError("not yet")
        return fakeredis.FakeRedis(server=server)

    hub = EventHub(factory=flaky)
    try:
        with hub.watch(5) as watch:
            assert watch.wait(10) is True  # fired by the (re)connection, not by any publish
            assert len(attempts) >= 2
            assert hub.connected.is_set()
    finally:
        hub.close()


def test_a_missed_notification_only_delays_the_watcher() -> None:
    """Redis unreachable: no notification ever arrives, yet a watcher loop (read, wait with
    a safety net, read again) still sees the change, one timeout late at most."""
    def down() -> redis.Redis:
        raise redis.ConnectionError("redis is down")

    hub = EventHub(factory=down)
    record: dict[str, int | None] = {"seq": None}
    threading.Timer(0.1, lambda: record.update(seq=1)).start()
    seen_at = None
    try:
        t0 = time.monotonic()
        with hub.watch(3) as watch:
            while time.monotonic() - t0 < 10:
                if record["seq"] is not None:  # "the database"
                    seen_at = time.monotonic() - t0
                    break
                assert watch.wait(0.3) is False  # never notified: every wait times out
        assert hub.connected.is_set() is False
    finally:
        hub.close()
    assert seen_at is not None
    assert 0.1 <= seen_at < 1.5


def test_the_sse_feed_reads_on_timeout_without_notifications(app, monkeypatch) -> None:
    """The real stream loop (app.api.jobs.EventFeed) with a hub that never connects: an event
    committed while the stream waits arrives after the safety-net timeout."""
    import app.api.jobs as api_jobs
    from app import jobs
    from tests.conftest import create_tenant_key

    monkeypatch.setattr(api_jobs, "STREAM_SAFETY_NET_S", 0.3)

    def down() -> redis.Redis:
        raise redis.ConnectionError("redis is down")

    dead_hub = EventHub(factory=down)
    app.extensions["medmaas.hub"] = dead_hub
    _tenant, key = create_tenant_key(app)
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}"}
    job = client.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}}, headers=headers).get_json()
    db = app.extensions["medmaas.db"]
    try:
        r = client.get(f"/api/v1/jobs/{job['id']}/stream", headers=headers, buffered=False)
        chunks = iter(r.response)
        first = next(chunks).decode()
        assert "retry:" in first
        assert "id: 1\nevent: state" in first
        t0 = time.monotonic()

        def finish() -> None:
            with db.session() as s:
                attempt = jobs.claim(s, job["id"], "test-worker")
                jobs.succeed(s, job["id"], attempt, {"ok": True})

        threading.Timer(0.05, finish).start()
        rest = ""
        for chunk in chunks:
            rest += chunk.decode()
            if "event: end" in rest:
                break
        elapsed = time.monotonic() - t0
        assert "event: state" in rest
        assert '"succeeded"' in rest
        assert "event: end" in rest
        assert elapsed < 20, elapsed  # safety-net periods (0.3 s), not the stream's lifetime
        r.close()
    finally:
        dead_hub.close()
