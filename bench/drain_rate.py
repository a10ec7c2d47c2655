"""Drain rate: two `medmaas worker` processes draining N no-op `sleep` jobs (seconds=0)
against two bare Celery workers draining N no-op tasks, in jobs per second.

Both pairs of workers are started and ready first and stay up; the two sides then drain in
alternate rounds (bare, platform, bare, ...), each round N units enqueued in one burst
(platform: N queued jobs committed in one transaction through the job state machine, then
published exactly as the API publishes them; bare: N apply_async), faster than either side
drains them. The rate is N over the time from the first unit's start to the last
unit's end (platform: min(started_at) to max(finished_at), the server's stamps; bare: the
task returns time.time(), so the span of those stamps). Submit costs are not measured here
(queue_latency and api_throughput measure them).

The workers run as shipped (solo pool, prefetch 1, acks_late); the tenant's running-jobs
limit is left at its default (4), so each claim pays the fairness check as in production.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from bench.common import Stack, log, machine_info, now_iso, row, wait_for_log
from bench.queue_latency import BARE_QUEUE, SLEEP_SPEC, bare_celery

NAME = "drain_rate"
WORKERS = 2
TARGET_RATIO = 0.3


def _spawn_platform_workers(st: Stack, n: int) -> list[Any]:
    """n solo `medmaas worker` processes, spawned together, returned once all are ready."""
    procs = [st.spawn([sys.executable, "-m", "medmaas.cli", "worker", "--queues", "cpu"], f"drain-worker-{i}")
             for i in range(n)]
    for p in procs:
        wait_for_log(p.log_path, " ready.", 120, p)
    return procs


def _spawn_bare_workers(st: Stack, n: int) -> list[Any]:
    procs = [st.spawn([sys.executable, "-m", "bench.queue_latency", "--bare-worker", st.redis_url, "--queue",
                       BARE_QUEUE], f"drain-bare-{i}") for i in range(n)]
    for p in procs:
        wait_for_log(p.log_path, " ready.", 120, p)
    return procs


def enqueue_platform(st: Stack, n: int) -> list[int]:
    """N queued `sleep` jobs, committed together, then published as the API does."""
    from app import dispatch
    from app.broker import create_celery
    from app.stores import jobs as job_store

    ids: list[tuple[int, str]] = []
    with st.db.session() as s:
        for _ in range(n):
            _kind, spec, queue = job_store.validate(s, st.settings, st.tenant_id, "sleep", dict(SLEEP_SPEC))
            job, _created = _submit(s, st, spec, queue)
            ids.append((job.id, queue))
    celery = create_celery(st.settings)
    sent = dispatch.publish_jobs(celery, st.db, ids, stamp=False)
    if sent != n:
        raise RuntimeError(f"published {sent} of {n} jobs")
    return [job_id for job_id, _ in ids]


def _submit(s: Any, st: Stack, spec: dict[str, Any], queue: str) -> Any:
    from app import jobs

    return jobs.submit(s, tenant_id=st.tenant_id, kind="sleep", spec=spec, queue=queue,
                       max_attempts=st.settings.default_max_attempts)


def wait_platform(st: Stack, ids: list[int], timeout_s: float) -> tuple[float, float]:
    """(first started_at, last finished_at) as epoch seconds once every job succeeded."""
    from sqlalchemy import func, select

    from app.models import Job, JobState

    deadline = time.monotonic() + timeout_s
    while True:
        with st.db.sessionmaker() as s:
            done, failed, first, last = s.execute(
                select(func.count().filter(Job.state == JobState.succeeded),
                       func.count().filter(Job.state.in_([JobState.failed, JobState.cancelled])),
                       func.min(Job.started_at), func.max(Job.finished_at)).where(Job.id.in_(ids))).one()
        if failed:
            raise RuntimeError(f"{failed} drain jobs failed or were cancelled")
        if done == len(ids):
            return first.timestamp(), last.timestamp()
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {done} of {len(ids)} jobs succeeded after {timeout_s:.0f}s")
        time.sleep(0.2)


def drain_bare(app: Any, n: int, timeout_s: float) -> tuple[float, float]:
    noop = app.tasks["bench.noop"]
    results = [noop.apply_async(queue=BARE_QUEUE) for _ in range(n)]
    stamps = [r.get(timeout=timeout_s) for r in results]
    for r in results:
        r.forget()
    return min(stamps), max(stamps)


def run(quick: bool = False, jobs: int | None = None, rounds: int | None = None) -> dict[str, Any]:
    """Both pairs of workers stay up (an idle pair only waits on its queue) and drain in
    alternate rounds, bare first: a slow spell of a shared machine then falls on both sides
    instead of on one. The table gives the median rate of each side and the median of the
    rounds' ratios."""
    n = jobs or (200 if quick else 1000)
    rounds = rounds or (2 if quick else 3)
    timeout_s = 600.0
    result: dict[str, Any] = {"benchmark": NAME, "date": now_iso(), "machine": machine_info(), "quick": quick}
    with Stack("drain", tenant_max_running_per_queue=4) as st:
        log(f"{NAME}: {WORKERS} bare Celery workers and {WORKERS} platform workers, {rounds} rounds of {n} units")
        _spawn_bare_workers(st, WORKERS)
        app = bare_celery(st.redis_url)
        drain_bare(app, 10, 60)  # warm-up: connections, imports
        _spawn_platform_workers(st, WORKERS)
        wait_platform(st, enqueue_platform(st, 10), 120)
        spans: list[tuple[float, float]] = []
        for r in range(rounds):
            b0, b1 = drain_bare(app, n, timeout_s)
            p0, p1 = wait_platform(st, enqueue_platform(st, n), timeout_s)
            spans.append((p1 - p0, b1 - b0))
            log(f"{NAME}: round {r + 1}: platform {n / max(p1 - p0, 1e-6):.0f} jobs/s, bare {n / max(b1 - b0, 1e-6):.0f}")
    platform_rates = [n / max(p, 1e-6) for p, _b in spans]
    bare_rates = [n / max(b, 1e-6) for _p, b in spans]
    ratio = statistics.median(p / b for p, b in zip(platform_rates, bare_rates))
    result["params"] = {"units": n, "rounds": rounds,
                        "workers": f"{WORKERS} × medmaas worker --queues cpu (solo)",
                        "bare": f"{WORKERS} × bare Celery solo worker, same flags, Redis result backend",
                        "job": {"kind": "sleep", "spec": SLEEP_SPEC}, "tenant_max_running_per_queue": 4,
                        "database": "PostgreSQL (private database)", "broker": "redis-server (private, loopback)"}
    result["rounds"] = [{"platform_span_s": round(p, 3), "bare_span_s": round(b, 3),
                         "ratio": round(b / max(p, 1e-6), 3)} for p, b in spans]
    result["rows"] = [row("drain rate, 2 workers, no-op units", statistics.median(platform_rates),
                          statistics.median(bare_rates), unit="jobs/s", ratio=ratio,
                          target=f"≥ {TARGET_RATIO}× bare", met=ratio >= TARGET_RATIO,
                          note=f"median of {rounds} alternated rounds")]
    return result


def round_trips(n: int = 100) -> dict[str, float]:
    """Round trips to PostgreSQL per operation, in this process: a GET /api/v1/jobs/{id} and a
    POST /api/v1/jobs through the Flask test client, and one no-op `sleep` job through
    workers.tasks.execute_job (fairness limit 4). Counts the times psycopg waited for the
    server to answer (a read wait of its I/O generators: BEGIN, statements, COMMIT/ROLLBACK,
    pings); a wait that needed no I/O (switching autocommit on an idle connection) is none."""
    import psycopg.connection
    from psycopg.waiting import Wait

    waits = [0]
    wait = psycopg.connection.Connection.wait

    def counted(gen: Any) -> Any:
        sent = None
        try:
            while True:
                state = gen.send(sent)
                if state & Wait.R:
                    waits[0] += 1
                sent = yield state
        except StopIteration as stop:
            return stop.value

    def counting(self: Any, gen: Any, *args: Any, **kwargs: Any) -> Any:
        return wait(self, counted(gen), *args, **kwargs)

    def per_call(fn: Any, count: int) -> float:
        waits[0] = 0
        for _ in range(count):
            fn()
        return waits[0] / count

    psycopg.connection.Connection.wait = counting  # type: ignore[method-assign]
    try:
        with Stack("round-trips", tenant_max_running_per_queue=4) as st:
            from app.broker import create_celery
            from app.factory import create_app
            from workers.tasks import execute_job, get_db

            client = create_app(st.settings).test_client()
            headers = {"Authorization": f"Bearer {st.key}"}
            body = {"kind": "sleep", "spec": SLEEP_SPEC}
            job_id = client.post("/api/v1/jobs", json=body, headers=headers).get_json()["id"]
            for _ in range(3):
                client.get(f"/api/v1/jobs/{job_id}", headers=headers)
            out = {
                "GET /api/v1/jobs/{id}": per_call(lambda: client.get(f"/api/v1/jobs/{job_id}", headers=headers), n),
                "POST /api/v1/jobs": per_call(lambda: client.post("/api/v1/jobs", json=body, headers=headers), n),
            }
            db, celery = get_db(st.settings), create_celery(st.settings)
            ids = iter(enqueue_platform(st, n + 1))
            execute_job(db, st.settings, celery, next(ids))
            out["one no-op job in the worker"] = per_call(lambda: execute_job(db, st.settings, celery, next(ids)), n)
            return out
    finally:
        psycopg.connection.Connection.wait = wait  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--jobs", type=int)
    p.add_argument("--round-trips", action="store_true", help="count PostgreSQL round trips per operation instead")
    args = p.parse_args(argv)
    import json

    result = round_trips() if args.round_trips else run(args.quick, args.jobs)
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
