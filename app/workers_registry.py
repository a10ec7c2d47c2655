"""Which queues have a live worker: each worker process refreshes one Redis key per queue it
consumes, `medmaas:workers:<queue>:<worker name>`, every ANNOUNCE_INTERVAL_S with a TTL of
three intervals (workers/tasks.py Presence), and deletes them when it stops. A worker that
dies silently drops out within the TTL.

The submit checks use `live_queues` to refuse what no connected worker can run (device
cuda with no GPU worker). When the broker cannot be reached the check is skipped: the job
is queued and waits for a worker, as any job does while Redis is down.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.kinds import SubmitContext

log = logging.getLogger(__name__)

PREFIX = "medmaas:workers:"
ANNOUNCE_INTERVAL_S = 5.0
TTL_S = 3 * ANNOUNCE_INTERVAL_S


def presence_key(queue: str, worker: str) -> str:
    return f"{PREFIX}{queue}:{worker}"


def announce(client: Any, queues: Iterable[str], worker: str, ttl_s: float = TTL_S) -> None:
    """Mark `worker` alive on each queue for ttl_s seconds (one round trip)."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.set(presence_key(queue, worker), worker, px=max(1, int(ttl_s * 1000)))
    pipe.execute()


def withdraw(client: Any, queues: Iterable[str], worker: str) -> None:
    keys = [presence_key(q, worker) for q in queues]
    if keys:
        client.delete(*keys)


def live_workers(client: Any) -> dict[str, set[str]]:
    """{queue: {worker name, ...}} for every queue with at least one live worker."""
    out: dict[str, set[str]] = {}
    for key in client.scan_iter(match=f"{PREFIX}*", count=1000):
        key_s = key.decode() if isinstance(key, bytes) else str(key)
        queue, _, worker = key_s[len(PREFIX) :].partition(":")
        if queue and worker:
            out.setdefault(queue, set()).add(worker)
    return out


def live_queues(client: Any) -> set[str]:
    """The queues at least one live worker consumes."""
    return set(live_workers(client))


def live_queues_at(url: str) -> set[str]:
    """live_queues() on the broker at `url` (asked only for specs that need a GPU worker)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        return live_queues(client)
    finally:
        client.close()


def gpu_worker_check(spec: dict[str, Any], ctx: SubmitContext) -> str | None:
    """For a spec asking for device cuda (train, score): raise SpecError naming `device` when
    no worker is alive on the queue the job would go to; return a note for the job when the
    broker could not be asked (the job is then accepted and waits), else None."""
    if not str(spec.get("device", "auto")).startswith("cuda") or ctx.live_queues is None:
        return None
    queue = spec.get("queue") or ctx.settings.gpu_queue
    try:
        live = ctx.live_queues()
    except Exception as exc:  # the broker is down: do not block submission
        log.warning("cannot check for live GPU workers (%s: %s); accepting the job", type(exc).__name__, exc)
        return (
            f"the broker could not be reached at submit, so whether a worker serves queue {queue!r} "
            "was not checked; the job stays queued until one takes it"
        )
    from app.kinds import SpecError

    if queue not in live:
        if spec.get("queue"):
            message = (
                f"no worker is connected to queue {queue!r} to run device {spec['device']}; "
                "use device auto or cpu, or start a worker on that queue"
            )
        else:
            message = (
                "no GPU worker is connected; use device auto or cpu, "
                f"or start `medmaas worker --queues {queue} --gpu 0`"
            )
        raise SpecError(message, "invalid_spec", {"spec": {"device": [message]}})
    return None
