"""Push, not poll: wake whoever watches a job when its events change.

The database stays the record. A transaction that appends a job event (or finishes a unit
of a job's work, such as a scoring shard) marks the job with `touch(session, job_id)`;
after that transaction commits, the job id is published on one Redis pub/sub channel.
Watchers (SSE streams, predict waits, a scoring parent waiting for its shards) register
with the process's `EventHub`, read the database, and sleep until a notification for
their job arrives or a safety-net timeout passes. A missed notification (Redis down,
subscriber reconnecting) therefore delays an event by at most that timeout; it never
loses one, because every wake-up re-reads the database.

Redis pub/sub works with SQLite (standalone) and PostgreSQL alike, and the broker is
already there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import redis
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

CHANNEL = "medmaas:job-events"
_PENDING = "medmaas.notify.pending"

RedisFactory = Callable[[], "redis.Redis"]


def touch(session: Session, job_id: int) -> None:
    """Publish `job_id` once this session's transaction commits (dropped on rollback)."""
    session.info.setdefault(_PENDING, set()).add(int(job_id))


def _client_factory(url: str | None, **options: Any) -> RedisFactory:
    if url is None:
        raise ValueError("a Redis URL or a client factory is needed")
    return lambda: redis.Redis.from_url(url, **options)


class Notifier:
    """The publishing side: one lazily created Redis client per process."""

    def __init__(self, url: str | None = None, factory: RedisFactory | None = None) -> None:
        self._factory: RedisFactory = factory or _client_factory(url, socket_timeout=2, socket_connect_timeout=2)
        self._client: redis.Redis | None = None
        self._warned_at = 0.0

    def publish(self, job_ids: Iterable[int]) -> None:
        ids = sorted(set(job_ids))
        if not ids:
            return
        try:
            if self._client is None:
                self._client = self._factory()
            if len(ids) == 1:  # a job's own transition: the common case, without a pipeline's cost
                self._client.publish(CHANNEL, str(ids[0]))
            else:
                pipe = self._client.pipeline(transaction=False)
                for job_id in ids:
                    pipe.publish(CHANNEL, str(job_id))
                pipe.execute()
        except redis.RedisError:
            # Watchers fall back to their safety-net timeout; say so at most once a minute.
            now = time.monotonic()
            if now - self._warned_at > 60:
                self._warned_at = now
                log.warning("publishing job notifications failed; watchers will poll", exc_info=True)
            self._client = None

    def install(self, factory: sessionmaker) -> None:
        """Publish what each committed transaction of sessions from `factory` touched."""

        def after_commit(session: Session) -> None:
            pending = session.info.pop(_PENDING, None)
            if pending:
                self.publish(pending)

        def after_transaction_end(session: Session, transaction: Any) -> None:
            # Runs after after_commit: whatever is still pending was rolled back or the
            # session was closed without committing; it must not leak into a later commit.
            if transaction.parent is None:
                session.info.pop(_PENDING, None)

        event.listen(factory, "after_commit", after_commit)
        event.listen(factory, "after_transaction_end", after_transaction_end)


class _Waiter:
    """One watcher of one job: a flag set by the hub, waited on by a thread or a coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.flag = threading.Event()
        self.loop = loop
        self.async_flag = asyncio.Event() if loop is not None else None

    def fire(self) -> None:
        self.flag.set()
        if self.loop is not None and self.async_flag is not None:
            with suppress(RuntimeError):  # the loop has closed
                self.loop.call_soon_threadsafe(self.async_flag.set)


class Watch:
    """Returned by EventHub.watch(): wait(timeout) blocks until the job was notified (True)
    or the timeout passed (False). Notifications that arrived since the last wait count."""

    def __init__(self, waiter: _Waiter) -> None:
        self._waiter = waiter

    def wait(self, timeout: float) -> bool:
        woke = self._waiter.flag.wait(timeout)
        self._waiter.flag.clear()
        return woke

    async def wait_async(self, timeout: float) -> bool:
        flag = self._waiter.async_flag
        assert flag is not None, "watch(..., loop=...) for async waits"
        try:
            await asyncio.wait_for(flag.wait(), timeout)
            woke = True
        except TimeoutError:
            woke = False
        flag.clear()
        self._waiter.flag.clear()
        return woke


class EventHub:
    """The subscribing side: one pub/sub connection per process, shared by every watcher.

    A daemon thread listens on CHANNEL and fires the waiters registered for each job id.
    It reconnects after errors; while it is disconnected, waits simply time out.
    """

    def __init__(self, url: str | None = None, factory: RedisFactory | None = None) -> None:
        self._factory: RedisFactory = factory or _client_factory(
            url, socket_connect_timeout=2, health_check_interval=15
        )
        self._lock = threading.Lock()
        self._waiters: dict[int, set[_Waiter]] = defaultdict(set)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.connected = threading.Event()

    # -- watchers ---------------------------------------------------------------------
    @contextmanager
    def watch(self, job_id: int, loop: asyncio.AbstractEventLoop | None = None) -> Iterator[Watch]:
        """Register before reading the database, so a commit between the read and the wait
        still wakes the watcher."""
        self._ensure_started()
        waiter = _Waiter(loop)
        with self._lock:
            self._waiters[int(job_id)].add(waiter)
        try:
            yield Watch(waiter)
        finally:
            with self._lock:
                group = self._waiters.get(int(job_id))
                if group is not None:
                    group.discard(waiter)
                    if not group:
                        del self._waiters[int(job_id)]

    def watching(self) -> int:
        with self._lock:
            return sum(len(g) for g in self._waiters.values())

    def _fire(self, job_id: int) -> None:
        with self._lock:
            waiters = list(self._waiters.get(job_id, ()))
        for w in waiters:
            w.fire()

    # -- the listener thread ----------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._listen_forever, name="medmaas-event-hub", daemon=True)
                self._thread.start()

    def _listen_forever(self) -> None:
        backoff = 0.2
        while not self._stop.is_set():
            pubsub: Any = None
            try:
                pubsub = self._factory().pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                backoff = 0.2
                self._fire_all()  # anything published while we were away: re-read now
                self.connected.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        try:
                            self._fire(int(message["data"]))
                        except (TypeError, ValueError):
                            continue
            except Exception:
                self.connected.clear()
                log.debug("event hub disconnected; retrying in %.1fs", backoff, exc_info=True)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if pubsub is not None:
                    with suppress(Exception):
                        pubsub.close()

    def _fire_all(self) -> None:
        with self._lock:
            waiters = [w for group in self._waiters.values() for w in group]
        for w in waiters:
            w.fire()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # Wake the listener out of its one-second read (job 0 has no watchers anywhere).
            with contextlib.suppress(Exception):
                self._factory().publish(CHANNEL, "0")
            self._thread.join(timeout=3)
