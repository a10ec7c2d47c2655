"""Scale of submission: 1,000 jobs submitted by 50 concurrent clients (threads with a
requests.Session each) against `medmaas web --workers 2`, with no worker running; then
two solo workers drain the queue. Checks: every POST answered 202, every accepted job
has exactly one row (none lost, none duplicated), and every job ran exactly once (one
queued->running and one running->succeeded transition, attempts == 1).

Bare baseline: the same 1,000 POSTs by 50 clients to a bare Flask endpoint under the same
gunicorn flags that only publishes a Celery message (no durable row, no auth); and the
same number of no-op tasks drained by two bare solo Celery workers on the same Redis.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

from bench.common import Stack, log, machine_info, now_iso, row, summary

NAME = "submit_scale"
BODY = {"kind": "sleep", "spec": {"seconds": 0, "steps": 1}}


def submit_many(url: str, key: str | None, n: int, clients: int, body: dict | None = None) -> dict[str, Any]:
    import requests

    lock = threading.Lock()
    next_i = [0]
    statuses: list[int] = []
    latencies: list[float] = []
    ids: list[Any] = []
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client() -> None:
        s = requests.Session()
        if key:
            s.headers["Authorization"] = f"Bearer {key}"
        barrier.wait()
        while True:
            with lock:
                if next_i[0] >= n:
                    return
                next_i[0] += 1
            t = time.perf_counter()
            try:
                r = s.post(url, json=body or BODY, timeout=60)
                status, job_id = r.status_code, (r.json().get("id") if r.status_code in (200, 202) else None)
            except Exception as exc:  # noqa: BLE001  (a lost request is a result, not a crash)
                status, job_id = -1, None
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
            ms = (time.perf_counter() - t) * 1000
            with lock:
                statuses.append(status)
                latencies.append(ms)
                if job_id is not None:
                    ids.append(job_id)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    by_status: dict[str, int] = {}
    for s in statuses:
        by_status[str(s)] = by_status.get(str(s), 0) + 1
    return {"requests": len(statuses), "by_status": by_status, "accepted": by_status.get("202", 0),
            "ids": ids, "distinct_ids": len(set(ids)), "latency_ms": summary(latencies), "wall_s": round(wall, 3),
            "submits_per_s": round(len(statuses) / wall, 1), "errors": errors[:10]}


def bare_drain(st: Stack, n: int, workers: int) -> dict[str, Any]:
    from bench.queue_latency import bare_celery, start_bare_worker

    app = bare_celery(st.redis_url)
    noop = app.tasks["bench.noop"]
    results = [noop.apply_async(queue="bare-drain") for _ in range(n)]
    t_start = time.time()
    procs = [start_bare_worker(st, "bare-drain", f"bare-drain-{i}") for i in range(workers)]
    starts = [r.get(timeout=600) for r in results]
    t_end = time.time()
    for p in procs:
        st.stop(p)
    first = min(starts)
    return {"tasks": n, "workers": workers, "first_start_to_last_done_s": round(t_end - first, 3),
            "tasks_per_s": round(n / (t_end - first), 1), "since_workers_started_s": round(t_end - t_start, 3)}


def run(quick: bool = False, jobs: int | None = None, clients: int = 50, drain_workers: int = 2) -> dict[str, Any]:
    from sqlalchemy import text

    n = jobs or (200 if quick else 1000)
    result: dict[str, Any] = {"benchmark": NAME, "date": now_iso(), "machine": machine_info(), "quick": quick}
    with Stack("scale") as st:
        log(f"{NAME}: web (2 gunicorn workers) + bare app; {n} submits by {clients} clients each, no worker running")
        web, url = st.web(workers=2)
        bare, bare_url = st.bare_web(workers=2)
        tenant_id, key = st.new_tenant("scale")
        # warm-up on another tenant and a queue no worker here consumes: not counted below
        submit_many(url + "/api/v1/jobs", st.key, 20, 10, {"kind": "sleep", "spec": {"seconds": 0, "queue": "inference"}})
        submit_many(bare_url + "/bare/jobs", None, 20, 10)
        plat = submit_many(url + "/api/v1/jobs", key, n, clients)
        bare_sub = submit_many(bare_url + "/bare/jobs", None, n, clients)
        with st.db.engine.connect() as c:
            db_rows = c.execute(text("SELECT id FROM jobs WHERE tenant_id = :t"), {"t": tenant_id}).scalars().all()
        accepted_ids = set(plat["ids"])
        lost = sorted(accepted_ids - set(db_rows))
        extra = sorted(set(db_rows) - accepted_ids)
        log(f"{NAME}: {plat['accepted']}/{n} accepted, {len(db_rows)} rows; draining with {drain_workers} solo workers")
        t_workers = time.time()
        workers = [st.worker("cpu", name=f"drain{i}") for i in range(drain_workers)]
        deadline = time.monotonic() + (300 if quick else 900)
        q_states = text("SELECT state, count(*) FROM jobs WHERE tenant_id = :t GROUP BY state")
        while True:
            with st.db.engine.connect() as c:
                states = dict(c.execute(q_states, {"t": tenant_id}).all())
            if states.get("queued", 0) + states.get("running", 0) == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        with st.db.engine.connect() as c:
            per_job = c.execute(text("""
                SELECT j.id, j.state, j.attempts, j.started_at, j.finished_at,
                  (SELECT count(*) FROM job_events e WHERE e.job_id = j.id AND e.type = 'state'
                     AND e.data->>'to' = 'running') AS runs,
                  (SELECT count(*) FROM job_events e WHERE e.job_id = j.id AND e.type = 'state'
                     AND e.data->>'to' = 'succeeded') AS successes
                FROM jobs j WHERE j.tenant_id = :t"""), {"t": tenant_id}).all()
        for w in workers:
            st.stop(w)
        skipped = sum(w.log_path.read_text(errors="replace").count("not claimable") for w in workers)
        log(f"{NAME}: bare drain of {n} no-op tasks with {drain_workers} bare solo workers")
        bare_dr = bare_drain(st, n, drain_workers)

    succeeded = [r for r in per_job if r.state == "succeeded"]
    exactly_once = [r for r in per_job if r.runs == 1 and r.successes == 1 and r.attempts == 1]
    not_once = [{"id": r.id, "state": r.state, "attempts": r.attempts, "runs": r.runs, "successes": r.successes}
                for r in per_job if not (r.runs == 1 and r.successes == 1 and r.attempts == 1)]
    drain_s = (max(r.finished_at for r in succeeded) - min(r.started_at for r in succeeded)).total_seconds() if succeeded else None
    all_accepted = plat["accepted"] == n
    none_lost = not lost and len(db_rows) == plat["accepted"]
    none_dup = not extra and plat["distinct_ids"] == len(plat["ids"])
    once = len(exactly_once) == n
    result["params"] = {"jobs": n, "clients": clients, "server": "medmaas web --workers 2 (gunicorn gthread x8)",
                        "body": BODY, "drain_workers": f"{drain_workers} x medmaas worker --queues cpu (solo)",
                        "bare_submit": "POST to a bare Flask endpoint that only publishes a Celery message",
                        "bare_drain": f"{drain_workers} bare solo Celery workers, no-op task, Redis result backend"}
    result["checks"] = {
        "all_accepted_202": all_accepted, "by_status": plat["by_status"], "rows": len(db_rows), "lost": lost[:20],
        "none_lost": none_lost, "duplicated_rows": extra[:20], "none_duplicated": none_dup,
        "succeeded": len(succeeded), "exactly_once": len(exactly_once), "not_exactly_once": not_once[:20],
        "duplicate_deliveries_skipped_by_claim": skipped, "errors": plat["errors"],
    }
    result["platform_submit"] = {k: v for k, v in plat.items() if k != "ids"}
    result["bare_submit"] = {k: v for k, v in bare_sub.items() if k != "ids"}
    result["platform_drain"] = {"jobs": n, "first_start_to_last_finish_s": round(drain_s, 3) if drain_s else None,
                                "jobs_per_s": round(n / drain_s, 1) if drain_s else None,
                                "since_workers_started_s": round(time.time() - t_workers, 1)}
    result["bare_drain"] = bare_dr
    pl, bl = plat["latency_ms"], bare_sub["latency_ms"]
    result["rows"] = [
        row(f"{n} submits / {clients} clients: all 202, none lost, none duplicated, each ran exactly once",
            float(len(exactly_once)), float(n), unit="jobs", target="all",
            met=all_accepted and none_lost and none_dup and once,
            note=f"{plat['accepted']} accepted, {len(db_rows)} rows, {len(exactly_once)} ran exactly once"),
        row("submit latency p50 (50 clients)", pl["p50"], bl["p50"], unit="ms", target="(report)", met=None),
        row("submit latency p99 (50 clients)", pl["p99"], bl["p99"], unit="ms", target="(report)", met=None),
        row("submits/s (50 clients)", plat["submits_per_s"], bare_sub["submits_per_s"], unit="req/s", target="(report)",
            met=None),
        row(f"drain rate, {drain_workers} solo workers", result["platform_drain"]["jobs_per_s"] or float("nan"),
            bare_dr["tasks_per_s"], unit="jobs/s", target="(report)", met=None),
    ]
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int)
    ap.add_argument("--clients", type=int, default=50)
    args = ap.parse_args(argv)
    print(json.dumps(run(args.quick, args.jobs, args.clients), indent=2, default=str))


if __name__ == "__main__":
    main()
