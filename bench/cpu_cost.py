"""CPU cost per 1,000 operations, platform vs bare: a measure that holds on a busy machine,
where the wall-clock benchmarks (api_throughput, drain_rate, predict_latency) are noisy.

For each side the CPU seconds (user + system, from /proc through psutil) of the server's
process tree (gunicorn master and workers, or the Celery workers) and of the PostgreSQL
backends serving the benchmark's private database are read before and after a fixed number
of operations, and divided by the count:

    python -m bench.cpu_cost get [--requests 3000] [--connections 16]  # GET /api/v1/jobs/{id} vs bare jsonify
    python -m bench.cpu_cost drain [--jobs 600]         # no-op sleep jobs, 2 workers, vs bare Celery tasks
    python -m bench.cpu_cost predict [--requests 2000]  # online predict, 1 molecule, 16 clients
    ... --py-spy DIR                                    # also record the platform side's stacks (py-spy --gil)

The load generator (threads with keep-alive http.client connections) is not counted. Two
in-process scenarios measure the CPU time of the calling thread only, min and median of 7
alternating rounds, which a busy machine disturbs least:

    python -m bench.cpu_cost inproc [--requests 2100]   # GET /jobs/{id}, Flask test client, vs the bare app
    python -m bench.cpu_cost inproc-job [--jobs 350]    # workers.tasks.execute_job of no-op jobs
    ... --py-spy FILE                                   # here: a cProfile (CPU-time clock) of the platform side
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import Stack, fold_stacks, gunicorn_worker_pids, log, machine_info, now_iso

CONNECTIONS = 16


# --------------------------------------------------------------------------- CPU accounting


def _cpu(proc: Any) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def tree(pid: int) -> list[Any]:
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def pg_backends(database: str) -> list[Any]:
    """The PostgreSQL backend processes connected to `database` (their titles name it)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if cmd.startswith("postgres:") and f" {database} " in f"{cmd} ":
            found.append(p)
    return found


class CpuMeter:
    """CPU seconds of named groups of processes between `start` and `stop`. Groups are
    re-resolved at stop too (a backend opened meanwhile counts from its birth)."""

    def __init__(self, groups: dict[str, Any]) -> None:
        self.groups = groups  # name -> callable returning processes
        self.before: dict[str, dict[int, float]] = {}

    def _read(self) -> dict[str, dict[int, float]]:
        import psutil

        out: dict[str, dict[int, float]] = {}
        for name, procs in self.groups.items():
            got: dict[int, float] = {}
            for p in procs():
                with contextlib.suppress(psutil.Error):  # exited meanwhile
                    got[p.pid] = _cpu(p)
            out[name] = got
        return out

    def start(self) -> None:
        self.before = self._read()

    def stop(self) -> dict[str, float]:
        after = self._read()
        return {
            name: round(sum(v - self.before.get(name, {}).get(pid, 0.0) for pid, v in procs.items()), 4)
            for name, procs in after.items()
        }


# --------------------------------------------------------------------------- load


def load(
    url: str, n: int, connections: int, headers: dict[str, str], body: Any = None, bodies: list[Any] | None = None
) -> dict[str, Any]:
    """n requests over `connections` keep-alive connections (GET, or POST of JSON `body`, or of
    bodies[i % len] in turn); raises on any non-2xx answer."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(n):
        todo.put(i)
    errors: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                break
            payload = bodies[i % len(bodies)] if bodies else body
            if payload is None:
                conn.request("GET", path, headers=headers)
            else:
                conn.request("POST", path, body=json.dumps(payload), headers={**headers, "Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            if r.status >= 300:
                errors.append(f"{r.status}: {data[:200]!r}")
                break
        conn.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"{url}: {len(errors)} failed, e.g. {errors[0]}")
    return {"requests": n, "wall_s": round(wall, 3), "rps": round(n / wall, 1)}


def per_thousand(cpu: dict[str, float], n: int) -> dict[str, float]:
    out = {f"{k}_ms": round(v * 1000 / n, 3) for k, v in cpu.items()}
    out["total_ms"] = round(sum(cpu.values()) * 1000 / n, 3)
    return {k.replace("_ms", "_s_per_1000"): v for k, v in out.items()}


class Spy:
    """py-spy record (raw stacks) of some processes for `seconds`, in the background."""

    def __init__(self, pids: list[int], seconds: float, out_dir: Path | None, label: str) -> None:
        import subprocess

        self.procs: list[tuple[Any, Path]] = []
        if out_dir is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        exe = str(Path(sys.executable).parent / "py-spy")
        for pid in pids:
            raw = out_dir / f"{label}-{pid}.txt"
            cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "250",
                   "--format", "raw", "--output", str(raw), "--nonblocking", "--gil"]
            self.procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), raw))
        time.sleep(0.5)

    def finish(self, top: int = 30) -> dict[str, Any] | None:
        if not self.procs:
            return None
        stacks: dict[str, int] = {}
        for p, raw in self.procs:
            p.wait(120)
            if raw.exists():
                for line in raw.read_text(errors="replace").splitlines():
                    stack, _, count = line.rpartition(" ")
                    if stack and count.isdigit() and "Condition.wait" not in stack and "select (selectors" not in stack:
                        stacks[stack] = stacks.get(stack, 0) + int(count)
        return fold_stacks(stacks, top)


# --------------------------------------------------------------------------- scenarios


def run_get(n: int, spy_dir: Path | None) -> dict[str, Any]:
    from bench.common import Api

    with Stack("cpu-get") as st:
        web, url = st.web(workers=2)
        bare, bare_url = st.bare_web(workers=2)
        api = Api(url, st.key)
        worker = st.worker("cpu")
        job = api.submit("sleep", {"seconds": 0, "steps": 1})
        api.wait(job["id"], 60, 0.1)
        st.stop(worker)
        assert st.pg_name is not None
        db = st.pg_name
        sides = {
            "platform": (f"{url}/api/v1/jobs/{job['id']}", {"Authorization": f"Bearer {st.key}"},
                         {"web": lambda: tree(web.pid), "postgres": lambda: pg_backends(db)}),
            "bare": (f"{bare_url}/bare/jobs/{job['id']}", {}, {"web": lambda: tree(bare.pid)}),
        }
        out: dict[str, Any] = {}
        for target, headers, _groups in sides.values():
            load(target, 300, CONNECTIONS, headers)  # warm-up
        for rnd in range(2):
            for name, (target, headers, groups) in sides.items():
                spy = Spy(gunicorn_worker_pids(web.pid), 6, spy_dir, "get") if name == "platform" and rnd == 0 else None
                m = CpuMeter(groups)
                m.start()
                res = load(target, n, CONNECTIONS, headers)
                res.update(per_thousand(m.stop(), n))
                out.setdefault(name, []).append(res)
                if spy is not None:
                    out["profile"] = spy.finish()
    return out


def run_drain(n: int, spy_dir: Path | None) -> dict[str, Any]:
    from bench.drain_rate import (
        _spawn_bare_workers,
        _spawn_platform_workers,
        drain_bare,
        enqueue_platform,
        wait_platform,
    )
    from bench.queue_latency import bare_celery

    out: dict[str, Any] = {}
    with Stack("cpu-drain", tenant_max_running_per_queue=4) as st:
        assert st.pg_name is not None
        db = st.pg_name
        redis_pid = st.redis_proc.pid if st.redis_proc else None

        def redis() -> list[Any]:
            import psutil

            return [psutil.Process(redis_pid)] if redis_pid else []

        bare_workers = _spawn_bare_workers(st, 2)
        app = bare_celery(st.redis_url)
        drain_bare(app, 20, 60)
        m = CpuMeter({"workers": lambda: [p for w in bare_workers for p in tree(w.pid)], "redis": redis})
        m.start()
        t0 = time.monotonic()
        drain_bare(app, n, 600)
        res: dict[str, Any] = {"jobs": n, "wall_s": round(time.monotonic() - t0, 2)}
        res.update(per_thousand(m.stop(), n))
        out["bare"] = res
        for p in bare_workers:
            st.stop(p)
        workers = _spawn_platform_workers(st, 2)
        wait_platform(st, enqueue_platform(st, 20), 120)
        m = CpuMeter({"workers": lambda: [p for w in workers for p in tree(w.pid)], "postgres": lambda: pg_backends(db),
                      "redis": redis})
        ids = enqueue_platform(st, n)
        m.start()
        spy = Spy([p.pid for w in workers for p in tree(w.pid)], 5, spy_dir, "drain")
        t0 = time.monotonic()
        p0, p1 = wait_platform(st, ids, 600)
        res = {"jobs": n, "wall_s": round(time.monotonic() - t0, 2), "span_s": round(p1 - p0, 2)}
        res.update(per_thousand(m.stop(), n))
        out["platform"] = res
        out["profile"] = spy.finish()
        for p in workers:
            st.stop(p)
    return out


def run_predict(n: int, spy_dir: Path | None) -> dict[str, Any]:
    import tempfile

    from bench.common import thread_env
    from bench.predict_latency import freesolv_smiles, register, start_bare, train_bundle

    _, smiles = freesolv_smiles()
    bodies = [{"inputs": [s]} for s in smiles[:200]]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medmaas-cpu-predict-") as tmp:
        bundle = Path(tmp) / "bundle"
        train_bundle(bundle, epochs=1)
        with Stack("cpu-predict") as st:
            assert st.pg_name is not None
            db = st.pg_name
            register(st, bundle)
            inf = st.worker("inference", extra_env={**thread_env(1), "MEDMAAS_TORCH_THREADS": "1"}, name="inference")
            web, url = st.web(workers=2, threads=8)
            bare_url = start_bare(st, bundle, 2)
            bare = st.procs[-1]
            sides = {
                "platform": (f"{url}/api/v1/models/freesolv/predict", {"Authorization": f"Bearer {st.key}"},
                             {"web": lambda: tree(web.pid), "inference": lambda: tree(inf.pid),
                              "postgres": lambda: pg_backends(db)}),
                "bare": (f"{bare_url}/predict", {}, {"web": lambda: tree(bare.pid)}),
            }
            for target, headers, _g in sides.values():
                load(target, 200, CONNECTIONS, headers, bodies=bodies)
            for rnd in range(2):
                for name, (target, headers, groups) in sides.items():
                    spy = (Spy(gunicorn_worker_pids(web.pid), 6, spy_dir, "predict")
                           if name == "platform" and rnd == 0 else None)
                    m = CpuMeter(groups)
                    m.start()
                    res = load(target, n, CONNECTIONS, headers, bodies=bodies)
                    res.update(per_thousand(m.stop(), n))
                    out.setdefault(name, []).append(res)
                    if spy is not None:
                        out["profile"] = spy.finish()
    return out


def run_inproc(n: int, profile: Path | None) -> dict[str, Any]:
    """One thread, no server: GET /api/v1/jobs/{id} through the Flask test client against
    PostgreSQL, and the bare app's GET, in CPU milliseconds of this thread per request. Less
    exposed to a busy machine than the server runs; leaves out the HTTP server's own cost."""
    from app.factory import create_app
    from bench.common import bare_app

    out: dict[str, Any] = {}
    with Stack("cpu-inproc") as st:
        from bench.drain_rate import enqueue_platform

        job_id = enqueue_platform(st, 1)[0]
        client = create_app(st.settings).test_client()
        bare = bare_app().test_client()
        headers = {"Authorization": f"Bearer {st.key}"}
        calls = {
            "platform": lambda: client.get(f"/api/v1/jobs/{job_id}", headers=headers),
            "bare": lambda: bare.get(f"/bare/jobs/{job_id}"),
        }
        for call in calls.values():
            for _ in range(200):
                assert call().status_code == 200
        rounds: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(7):  # alternating; the minimum is the least disturbed by other load
            for name, call in calls.items():
                t0 = time.thread_time()
                for _ in range(n // 7):
                    call()
                rounds[name].append((time.thread_time() - t0) * 1000 / (n // 7))
        for name, values in rounds.items():
            out[name] = {"min_ms": round(min(values), 3), "median_ms": round(sorted(values)[3], 3)}
        if profile is not None:
            import cProfile

            prof = cProfile.Profile(time.thread_time)  # CPU time, not wall: waits on the database are free
            prof.enable()
            for _ in range(n):
                calls["platform"]()
            prof.disable()
            prof.dump_stats(str(profile))
    out["unit"] = "CPU ms of the calling thread per request"
    return out


def run_inproc_job(n: int, profile: Path | None) -> dict[str, Any]:
    """One no-op `sleep` job at a time through workers.tasks.execute_job in this process (what a
    worker does per delivery, less Celery), fairness limit 4: CPU ms of this thread per job
    (min and median of 7 rounds), and of the PostgreSQL backends."""
    from app.broker import create_celery
    from bench.drain_rate import enqueue_platform
    from workers.tasks import execute_job, get_db

    out: dict[str, Any] = {}
    with Stack("cpu-inproc-job", tenant_max_running_per_queue=4) as st:
        assert st.pg_name is not None
        db_name = st.pg_name
        db, celery = get_db(st.settings), create_celery(st.settings)
        per = max(1, n // 7)
        ids = iter(enqueue_platform(st, 20 + 7 * per + (n if profile else 0)))
        for _ in range(20):
            execute_job(db, st.settings, celery, next(ids))
        rounds, pg = [], []
        for _ in range(7):
            m = CpuMeter({"postgres": lambda: pg_backends(db_name)})
            m.start()
            t0 = time.thread_time()
            for _ in range(per):
                assert execute_job(db, st.settings, celery, next(ids)) == "succeeded"
            rounds.append((time.thread_time() - t0) * 1000 / per)
            pg.append(m.stop()["postgres"] * 1000 / per)
        out["worker_thread_ms"] = {"min": round(min(rounds), 3), "median": round(sorted(rounds)[3], 3)}
        out["postgres_ms"] = {"min": round(min(pg), 3), "median": round(sorted(pg)[3], 3)}
        if profile is not None:
            import cProfile

            prof = cProfile.Profile(time.thread_time)
            prof.enable()
            for _ in range(n):
                execute_job(db, st.settings, celery, next(ids))
            prof.disable()
            prof.dump_stats(str(profile))
    out["unit"] = "CPU ms per no-op job"
    return out


def main(argv: list[str] | None = None) -> int:
    global CONNECTIONS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=["get", "drain", "predict", "inproc", "inproc-job"])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--jobs", type=int, default=600)
    ap.add_argument("--connections", type=int, default=16, help="concurrent clients (get, predict)")
    ap.add_argument("--py-spy", type=Path, help="record the platform side's stacks into this directory")
    ap.add_argument("--no-profile-print", action="store_true")
    args = ap.parse_args(argv)
    CONNECTIONS = args.connections
    result: dict[str, Any] = {"benchmark": f"cpu_cost_{args.scenario}", "date": now_iso(), "machine": machine_info(),
                              "connections": CONNECTIONS}
    if args.scenario == "get":
        result.update(run_get(args.requests, args.py_spy))
    elif args.scenario == "drain":
        result.update(run_drain(args.jobs, args.py_spy))
    elif args.scenario == "predict":
        result.update(run_predict(args.requests, args.py_spy))
    elif args.scenario == "inproc":
        result.update(run_inproc(args.requests, args.py_spy))
    else:
        result.update(run_inproc_job(args.jobs, args.py_spy))
    profile = result.pop("profile", None)
    print(json.dumps(result, indent=1, default=str))
    if profile and not args.no_profile_print:
        print(json.dumps(profile, indent=1, default=str))
    log(f"cpu_cost {args.scenario}: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
