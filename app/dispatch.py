"""Publishing job ids to the broker, and finding which ones the broker still holds.

Submission commits the job row first and publishes afterwards; anything that fails in
between is caught by the reconciler, which republishes queued jobs the broker lost.
"""
from __future__ import annotations

import json
import logging
import uuid
from typing import Iterable

from celery import Celery
from kombu import Exchange, Queue

from app import jobs
from app.broker import RUN_JOB
from app.db import Database

log = logging.getLogger(__name__)



def task_id_for(job_id: int) -> str:
    return f"job-{job_id}-{uuid.uuid4().hex[:8]}"


def job_id_from_task_id(task_id: str) -> int | None:
    parts = task_id.split("-")
    if len(parts) == 3 and parts[0] == "job" and parts[1].isdigit():
        return int(parts[1])
    return None


def publish(celery: Celery, job_id: int, queue: str, task: str = RUN_JOB, args: list | None = None) -> None:
    # Declaring the queue on every publish re-creates kombu's routing binding if Redis lost it
    # (FLUSHALL, restart without persistence); otherwise the message would be dropped.
    celery.send_task(task, args=args or [job_id], queue=queue, task_id=task_id_for(job_id),
                     declare=[Queue(queue, Exchange(queue, type="direct"), routing_key=queue)])


def publish_jobs(celery: Celery, db: Database, items: Iterable[tuple[int, str]], stamp: bool = True) -> int:
    """Publish (job_id, queue) pairs and stamp published_at (unless the caller already
    did); returns how many went out."""
    sent: list[int] = []
    for job_id, queue in items:
        try:
            publish(celery, job_id, queue)
            sent.append(job_id)
        except Exception:  # broker down: the reconciler will retry
            log.warning("publishing job %s failed; it stays queued for the reconciler", job_id, exc_info=True)
            break
    if sent and stamp:
        with db.session() as s:
            jobs.mark_published(s, sent)
    return len(sent)


def _job_ids_in_messages(raw_messages: Iterable[bytes]) -> set[int]:
    ids: set[int] = set()
    for raw in raw_messages:
        try:
            payload = json.loads(raw)
            if isinstance(payload, list):  # unacked entries are [message, exchange, routing_key]
                payload = payload[0]
            task_id = payload.get("headers", {}).get("id", "")
        except (ValueError, AttributeError, IndexError, TypeError):
            continue
        job_id = job_id_from_task_id(task_id)
        if job_id is not None:
            ids.add(job_id)
    return ids


def job_ids_in_broker(redis_client, queues: Iterable[str]) -> set[int]:  # noqa: ANN001
    """Job ids with a message waiting in a Redis queue or delivered but not yet acked."""
    raw: list[bytes] = []
    for queue in queues:
        for key in redis_client.scan_iter(match=f"{queue}*", count=1000):
            key_s = key.decode() if isinstance(key, bytes) else key
            # kombu's priority lists are "<queue>\x06\x16<n>"; skip unrelated prefixes
            if key_s == queue or key_s.startswith(f"{queue}\x06\x16"):
                if redis_client.type(key) in (b"list", "list"):
                    raw.extend(redis_client.lrange(key, 0, -1))
    raw.extend(redis_client.hvals("unacked"))
    return _job_ids_in_messages(raw)
