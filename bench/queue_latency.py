"""Queue latency: HTTP submit -> worker claim -> succeeded for `sleep` jobs (seconds=0),
against a bare Celery apply_async round trip of a no-op task on the same Redis.

Platform path (per job, submitted one at a time, the next only after the previous one
finished): POST /api/v1/jobs to `medmaas web` (gunicorn, 2 workers) -> row committed ->
job id published -> one solo `medmaas worker` claims it (started_at) -> runs `sleep`
(seconds=0, steps=1) -> succeeded (finished_at). Times are measured against the client's
clock (`time.time()` just before the POST); started_at / finished_at are the server's
stamps on the same machine.

Bare path: a separate Celery app on the same Redis with a Redis result backend, a solo
worker with the same flags; the task returns time.time() when it starts. t0 just before
apply_async; start = the task's stamp; round trip = when AsyncResult.get() returns.

The two run interleaved in blocks (both workers up, the idle one costs nothing), so
drift on a shared machine hits both alike.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from bench.common import (Api, Stack, finish_profile, gunicorn_worker_pids, log, machine_info, now_iso, py_spy_available,
                          py_spy_top, row, summary, wait_for_log)

NAME = "queue_latency"
BARE_QUEUE = "bare"
SLEEP_SPEC = {"seconds": 0, "steps": 1}


# --------------------------------------------------------------------------- bare Celery


def bare_celery(broker_url: str):  # noqa: ANN201
    from celery import Celery

    app = Celery("bare", broker=broker_url, backend=broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_default_queue=BARE_QUEUE, broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False, worker_send_task_events=False, result_expires=600,
    )

    app.task(name="bench.noop")(noop)
    return app


def noop() -> float:
    """The bare task: does nothing but say when it started."""
    return time.time()


def run_bare_worker(broker_url: str, queue: str = BARE_QUEUE) -> None:
    app = bare_celery(broker_url)
    app.worker_main(["worker", "-Q", queue, "-P", "solo", "-c", "1", "--loglevel", "INFO",
                     "-n", f"bare-{os.getpid()}@%h", "--without-gossip", "--without-mingle"])


def start_bare_worker(st: Stack, queue: str = BARE_QUEUE, name: str = "bare-worker"):  # noqa: ANN201
    proc = st.spawn([sys.executable, "-m", "bench.queue_latency", "--bare-worker", st.redis_url, "--queue", queue],
                    f"{name}-{len(st.procs)}")
    wait_for_log(proc.log_path, " ready.", 120, proc)
    return proc


# --------------------------------------------------------------------------- measurement


def _commits(st: Stack) -> int:
    from sqlalchemy import text

    with st.db.engine.connect() as c:
        c.execute(text("SELECT pg_stat_clear_snapshot()"))
        return int(c.execute(text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()")).scalar())


def pg_commit_ms(st: Stack, n: int = 200) -> dict[str, float]:
    """Round trip of one tiny write transaction (UPDATE + COMMIT) on the benchmark database:
    the unit cost every state transition and event of the platform pays."""
    from sqlalchemy import text

    out = []
    with st.db.engine.connect() as c:
        c.execute(text("CREATE TABLE IF NOT EXISTS bench_commit (n int)"))  # private database, dropped after
        c.execute(text("INSERT INTO bench_commit VALUES (0)"))
        c.commit()
        for _ in range(n):
            t = time.perf_counter()
            c.execute(text("UPDATE bench_commit SET n = n + 1"))
            c.commit()
            out.append((time.perf_counter() - t) * 1000)
    return summary(out)


def platform_block(api: Api, st: Stack, n: int, out: dict[str, list[float]], polls: list[int] | None = None) -> None:
    from sqlalchemy import text

    polls = polls if polls is not None else [0]
    q = text("SELECT state, created_at, started_at, finished_at FROM jobs WHERE id = :id")
    with st.db.engine.connect() as conn:
        for _ in range(n):
            t0 = time.time()
            r = api.http.post(f"{api.base}/api/v1/jobs", json={"kind": "sleep", "spec": SLEEP_SPEC}, timeout=30)
            t_resp = time.time()
            if r.status_code != 202:
                raise RuntimeError(f"submit answered {r.status_code}: {r.text[:300]}")
            job_id = r.json()["id"]
            deadline = time.monotonic() + 30
            while True:
                state, created, started, finished = conn.execute(q, {"id": job_id}).one()
                conn.commit()
                polls[0] += 1
                if state in ("succeeded", "failed", "cancelled"):
                    t_seen = time.time()
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {state} after 30s")
                time.sleep(0.002)
            if state != "succeeded":
                raise RuntimeError(f"job {job_id} ended {state}")
            ms = lambda t: (t - t0) * 1000.0  # noqa: E731
            out["http_202"].append(ms(t_resp))
            out["row_committed"].append(ms(created.timestamp()))
            out["running"].append(ms(started.timestamp()))
            out["succeeded"].append(ms(finished.timestamp()))
            out["observed"].append(ms(t_seen))
            out["202_to_running"].append((started.timestamp() - t_resp) * 1000.0)
            out["run"].append((finished.timestamp() - started.timestamp()) * 1000.0)


def bare_block(app: Any, n: int, out: dict[str, list[float]]) -> None:
    noop = app.tasks["bench.noop"]
    for _ in range(n):
        t0 = time.time()
        res = noop.apply_async(queue=BARE_QUEUE)
        started = res.get(timeout=30)
        t_done = time.time()
        res.forget()
        out["running"].append((started - t0) * 1000.0)
        out["succeeded"].append((t_done - t0) * 1000.0)


def run(quick: bool = False, jobs: int | None = None, profile: bool = True, diagnose: bool = True) -> dict[str, Any]:
    n = jobs or (50 if quick else 250)
    block = 25
    warmup = 5 if quick else 10
    plat: dict[str, list[float]] = {k: [] for k in ("http_202", "row_committed", "running", "succeeded", "observed",
                                                      "202_to_running", "run")}
    bare: dict[str, list[float]] = {"running": [], "succeeded": []}
    result: dict[str, Any] = {"benchmark": NAME, "date": now_iso(), "machine": machine_info(), "quick": quick}
    with Stack("queue") as st:
        log(f"{NAME}: starting web (2 gunicorn workers), one solo platform worker, one solo bare worker")
        web, url = st.web(workers=2)
        worker = st.worker("cpu")
        bare_worker = start_bare_worker(st)
        api = Api(url, st.key)
        app = bare_celery(st.redis_url)
        platform_block(api, st, warmup, {k: [] for k in plat})
        bare_block(app, warmup, {k: [] for k in bare})
        log(f"{NAME}: {n} sequential jobs on each path, interleaved in blocks of {block}")
        c0 = _commits(st)
        polls = [0]
        done = 0
        t_start = time.monotonic()
        while done < n:
            k = min(block, n - done)
            bare_block(app, k, bare)
            platform_block(api, st, k, plat, polls)
            done += k
        wall = time.monotonic() - t_start
        commit_cost = pg_commit_ms(st)
        time.sleep(1.0)  # PostgreSQL flushes its statistics asynchronously
        commits = _commits(st) - c0 - polls[0] - 1 - 202
        profile_out: dict[str, Any] = {}
        p50_gap = summary(plat["succeeded"])["p50"] - summary(bare["succeeded"])["p50"]
        if profile and py_spy_available() and p50_gap > 10.0:
            log(f"{NAME}: target missed by {p50_gap - 10:.1f} ms; profiling the platform path with py-spy")
            pids = {"worker": [worker.pid], "web": gunicorn_worker_pids(web.pid)}
            secs = 6 if quick else 12
            handles = {k: py_spy_top(v, secs, st.home / "profiles", k) for k, v in pids.items()}
            extra = {k: [] for k in plat}
            t_end = time.monotonic() + secs - 1
            while time.monotonic() < t_end:
                platform_block(api, st, 10, extra)
            focus = {"worker": ["execute_job", "claim", "kind_for", "JobContext.start_heartbeat", "run (workers/kinds/sleep.py",
                                "JobContext.check_cancel", "Lease.beat", "JobContext.progress", "succeed",
                                "free_accelerator_memory", "JobContext.stop_heartbeat", "Session.commit"],
                     "web": ["require_api_key", "authenticate", "validate (app/stores/jobs.py", "submit (app/api/jobs.py", "submit (app/jobs.py", "submit (app/stores/jobs.py",
                             "Session.commit", "publish_jobs", "publish", "mark_published", "Session.refresh",
                             "Schema.dump", "Database.session"]}
            profile_out = {k: finish_profile(h, focus[k]) for k, h in handles.items()}
            profile_out["jobs_during_profile"] = len(extra["succeeded"])
        st.stop(bare_worker)
        st.stop(worker)
        # Diagnostic (not the platform as shipped): the same path with the worker's per-job
        # gc.collect() (workers.tasks.free_accelerator_memory) patched out, to show how much
        # of the gap it accounts for.
        what_if: dict[str, list[float]] = {k: [] for k in plat}
        if diagnose:
            log(f"{NAME}: diagnostic block with free_accelerator_memory() patched out of the worker")
            code = ("import workers.tasks as t; t.free_accelerator_memory = lambda: None; "
                    "from medmaas.cli import main; main()")
            patched = st.spawn([sys.executable, "-c", code, "worker", "--queues", "cpu"], "worker-no-gc")
            wait_for_log(patched.log_path, " ready.", 120, patched)
            platform_block(api, st, warmup, {k: [] for k in plat})
            platform_block(api, st, min(n, 100), what_if)  # 50 with --quick
            st.stop(patched)

    ps, bs = {k: summary(v) for k, v in plat.items()}, {k: summary(v) for k, v in bare.items()}
    result["params"] = {"jobs_per_path": n, "warmup": warmup, "block": block, "sleep_spec": SLEEP_SPEC,
                        "web": "medmaas web --workers 2 (gunicorn gthread, 8 threads)", "worker": "medmaas worker --queues cpu (solo)",
                        "bare": "Celery apply_async + AsyncResult.get on the same Redis, solo worker, same flags",
                        "database": "PostgreSQL (private database)", "broker": "redis-server (private, loopback)"}
    gap50 = ps["succeeded"]["p50"] - bs["succeeded"]["p50"]
    gap_run50 = ps["running"]["p50"] - bs["running"]["p50"]
    result["rows"] = [
        row("submit→succeeded p50", ps["succeeded"]["p50"], bs["succeeded"]["p50"], unit="ms",
            target="≤ bare + 10 ms", met=gap50 <= 10.0, note=f"gap {gap50:.1f} ms"),
        row("submit→succeeded p95", ps["succeeded"]["p95"], bs["succeeded"]["p95"], unit="ms", target="(report)", met=None),
        row("submit→running p50", ps["running"]["p50"], bs["running"]["p50"], unit="ms",
            target="(report; ≤ bare + 10 ms)", met=None, note=f"gap {gap_run50:.1f} ms"),
        row("submit→running p95", ps["running"]["p95"], bs["running"]["p95"], unit="ms", target="(report)", met=None),
    ]
    if what_if["succeeded"]:
        ws = {k: summary(v) for k, v in what_if.items()}
        result["diagnostic_without_gc_collect_ms"] = ws
        result["rows"].append(row("submit→succeeded p50, worker without per-job gc.collect() (diagnostic)",
                                  ws["succeeded"]["p50"], bs["succeeded"]["p50"], unit="ms", target="(diagnostic)",
                                  met=None, note=f"gap {ws['succeeded']['p50'] - bs['succeeded']['p50']:.1f} ms"))
    result["platform_ms"] = ps
    result["bare_ms"] = bs
    result["breakdown_p50_ms"] = {
        "POST answered 202 (row committed + published)": ps["http_202"]["p50"],
        "client t0 -> row created_at stamp (HTTP + auth + validation)": ps["row_committed"]["p50"],
        "202 answered -> worker claimed (broker delivery + claim transaction)": ps["202_to_running"]["p50"],
        "claimed -> succeeded (sleep kind: heartbeat poll, progress event, finish transaction)": ps["run"]["p50"],
    }
    result["db_transactions_per_job"] = round(commits / max(n, 1), 2) if commits else None
    result["db_transactions_note"] = ("PostgreSQL xact_commit+xact_rollback of the benchmark database during the "
                                      "measured platform jobs, minus the client's own polls, divided by the job count")
    result["pg_commit_ms"] = commit_cost
    result["pg_commit_note"] = ("one UPDATE + COMMIT on a one-row table in the benchmark database (WAL flush with "
                                "synchronous_commit=on), sequential, after the measured jobs")
    result["wall_s"] = round(wall, 1)
    if profile_out:
        result["profile"] = profile_out
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bare-worker", metavar="BROKER_URL")
    p.add_argument("--queue", default=BARE_QUEUE)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--jobs", type=int)
    args = p.parse_args(argv)
    if args.bare_worker:
        run_bare_worker(args.bare_worker, args.queue)
        return
    import json

    print(json.dumps(run(args.quick, args.jobs), indent=2, default=str))


if __name__ == "__main__":
    main()
