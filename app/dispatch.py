"""The broker side of leases: publishing units (jobs, scoring shards, ...) and finding which
ones the broker still holds.

A unit's message carries only its key (a job id; a shard's job id and index) under the task
id "<kind>-<key...>-<random>". Submission commits the row first and publishes afterwards;
anything that fails in between, and every unit that went back to claimable (reaped,
released), is published by the one republish path, `republish`, which the maintenance
tick runs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from app import jobs, leases
from app.broker import queue_names
from app.config import Settings
from app.db import Database

log = logging.getLogger(__name__)


def publish(
    celery: Celery, db: Database, kind: leases.LeaseKind, items: Iterable[tuple[leases.Key, str]], stamp: bool = True
) -> int:
    """Publish (key, queue) pairs of one kind and stamp published_at (unless the caller already
    did); returns how many went out. A broker failure stops the batch: the units stay
    claimable and `republish` sends them later."""
    sent: list[leases.Key] = []
    for key, queue in items:
        key = tuple(key)
        try:
            # Declaring the queue on every publish re-creates kombu's routing binding if Redis lost
            # it (FLUSHALL, restart without persistence); otherwise the message would be dropped.
            celery.send_task(
                kind.task,
                args=list(key),
                queue=queue,
                task_id=kind.task_id(key),
                declare=[Queue(queue, Exchange(queue, type="direct"), routing_key=queue)],
            )
        except Exception:
            log.warning("publishing %s %s failed; it stays for the reconciler", kind.name, key, exc_info=True)
            break
        sent.append(key)
    if sent and stamp:
        with db.session() as s:
            leases.mark_published(s, kind, sent)
    return len(sent)


def publish_jobs(celery: Celery, db: Database, items: Iterable[tuple[int, str]], stamp: bool = True) -> int:
    """Publish (job_id, queue) pairs (`publish` for the job kind)."""
    return publish(celery, db, jobs.LEASE, (((job_id,), queue) for job_id, queue in items), stamp=stamp)


def job_id_from_task_id(task_id: str) -> int | None:
    key = jobs.LEASE.parse_task_id(task_id)
    return None if key is None else key[0]


def units_in_broker(redis_client: Any, queues: Iterable[str]) -> dict[str, set[leases.Key]]:
    """Keys of every kind's units with a message waiting in a queue or delivered but not yet
    acked, from one pass over the queues and the `unacked` hash: {kind name: {key, ...}}."""
    raw: list[bytes] = []
    for queue in queues:
        for key in redis_client.scan_iter(match=f"{queue}*", count=1000):
            key_s = key.decode() if isinstance(key, bytes) else key
            # kombu's priority lists are "<queue>\x06\x16<n>"; skip unrelated prefixes
            if (key_s == queue or key_s.startswith(f"{queue}\x06\x16")) and redis_client.type(key) in (b"list", "list"):
                raw.extend(redis_client.lrange(key, 0, -1))
    raw.extend(redis_client.hvals("unacked"))
    kinds = leases.kinds()
    found: dict[str, set[leases.Key]] = {k.name: set() for k in kinds}
    for item in raw:
        try:
            payload = json.loads(item)
            if isinstance(payload, list):  # unacked entries are [message, exchange, routing_key]
                payload = payload[0]
            task_id = payload.get("headers", {}).get("id", "")
        except (ValueError, AttributeError, IndexError, TypeError):
            continue
        for kind in kinds:
            unit = kind.parse_task_id(task_id or "")
            if unit is not None:
                found[kind.name].add(unit)
                break
    return found


def republish(celery: Celery, db: Database, settings: Settings) -> int:
    """The one republish path, for every kind: publish claimable units that went back to
    claimable (published_at cleared), and those published longer than requeue_grace_s ago
    whose message the broker no longer holds (a Redis restart loses its queue; the DB does
    not). Units still in the broker just restart their grace clock. Returns how many went out."""
    with db.session() as s:
        candidates = {
            # jobs whose tenant is at its running limit on their queue wait for a free slot
            kind: jobs.to_publish(s, settings.requeue_grace_s, settings.tenant_max_running_per_queue)
            if kind.is_job
            else leases.to_publish(s, kind, settings.requeue_grace_s)
            for kind in leases.kinds()
        }
    present: dict[str, set[leases.Key]] = {}
    if any(c.published for cs in candidates.values() for c in cs):
        import redis

        client = redis.Redis.from_url(settings.broker_url)
        try:
            present = units_in_broker(client, queue_names(settings))
        finally:
            client.close()
    sent = 0
    for kind, cs in candidates.items():
        held = present.get(kind.name, set())
        waiting = [c.key for c in cs if c.published and c.key in held]
        missing = [(c.key, c.queue) for c in cs if not (c.published and c.key in held)]
        if waiting:
            with db.session() as s:
                leases.mark_published(s, kind, waiting)
        if missing:
            lost = sum(1 for c in cs if c.published and c.key not in held)
            log.log(
                logging.WARNING if lost else logging.INFO,
                "publishing %d %s units (%d missing from the broker)",
                len(missing),
                kind.name,
                lost,
            )
            sent += publish(celery, db, kind, missing)
    return sent
