"""Shared benchmark harness: a private Redis, a private PostgreSQL database, the real web
server and real workers as subprocesses, plus the bare baselines they are compared with.

Every benchmark builds its own `Stack` (fresh Redis on a free port, fresh database),
so a FLUSH or a flood in one benchmark never touches another or anyone else's services.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
# Benchmarks drive one tenant far past a fair share (thousands of submits, 100 streams on one
# key, long sleep jobs on every queue): the fairness limits (app/limits.py) are off here.
FAIRNESS_OFF = {"rate_limit_enabled": False, "tenant_max_running_per_queue": 0, "sse_max_streams_per_key": 0,
                "sleep_max_s": 3600.0, "sleep_queues": "cpu,gpu,inference"}
PG_ADMIN_URL = os.environ.get("MEDMAAS_BENCH_PG_ADMIN_URL",
                              os.environ.get("MEDMAAS_TEST_PG_ADMIN_URL",
                                             "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))

# The same gunicorn command line `medmaas web` runs (medmaas/cli.py), so the bare baseline is
# served exactly the way the platform is.
GUNICORN_ARGS = ["--worker-class", "gthread", "--timeout", "120", "--graceful-timeout", "10",
                 "--access-logfile", "-"]


# --------------------------------------------------------------------------- statistics


def pct(values: Iterable[float], q: float) -> float:
    """Percentile with linear interpolation (numpy's default), q in 0..100."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values: Iterable[float], digits: int = 3) -> dict[str, float]:
    xs = list(values)
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "p50": round(pct(xs, 50), digits), "p95": round(pct(xs, 95), digits),
            "p99": round(pct(xs, 99), digits), "mean": round(statistics.fmean(xs), digits),
            "min": round(min(xs), digits), "max": round(max(xs), digits)}


def row(metric: str, platform: float, bare: float, *, target: str, met: Optional[bool], unit: str = "",
        ratio: Optional[float] = None, note: str = "") -> dict[str, Any]:
    """One line of the results table. ratio defaults to platform / bare."""
    if ratio is None:
        ratio = platform / bare if bare else float("nan")
    return {"metric": metric, "unit": unit, "platform": _r(platform), "bare": _r(bare), "ratio": _r(ratio, 3),
            "target": target, "met": met, "note": note}


def _r(x: Any, digits: int = 4) -> Any:
    if isinstance(x, float):
        return round(x, digits) if x == x else None
    return x


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    info = {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "mem_gb": mem_gb,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "git": commit + ("+dirty" if dirty else ""), "gpu": None,
            "loadavg_1min_at_start": round(os.getloadavg()[0], 2)}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def machine_label(m: dict[str, Any]) -> str:
    return f"{m.get('cpu', '?')}, {m.get('cores')} cores, {m.get('mem_gb')} GB" + (f", {m['gpu']}" if m.get("gpu") else ", no GPU")


def wait_for_quiet(max_load: float = 1.0, max_wait_s: float = 120.0) -> float:
    """Wait (bounded) for the 1-minute load average to drop below max_load: this machine is
    shared, and other people's test runs make absolute times and even ratios noisy.
    Returns the load average when it gives up or the machine is quiet."""
    deadline = time.monotonic() + max_wait_s
    load = os.getloadavg()[0]
    while load > max_load and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    return round(load, 2)


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_for_log(path: Path, needle: str, timeout: float = 90.0, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"{needle!r} not in {path} after {timeout}s:\n{path.read_text(errors='replace')[-3000:]}")


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    from medmaas.standalone import valkey_binary

    return valkey_binary()


def thread_env(threads: int) -> dict[str, str]:
    """Identical torch/BLAS thread settings for every process that trains."""
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


class Stack:
    """Redis + a PostgreSQL database (or SQLite) + migrations + a tenant and key, and helpers
    to start the web server, workers and bare baselines as subprocesses. Use as a context
    manager: everything it started is stopped and its database dropped on exit."""

    def __init__(self, name: str, *, database: str = "postgres", log_level: str = "WARNING",
                 **settings_overrides: Any):
        self.name = name
        self.database_kind = database
        self.log_level = log_level
        self.settings_overrides = settings_overrides
        self.procs: list[subprocess.Popen] = []
        self.home = Path(tempfile.mkdtemp(prefix=f"medmaas-bench-{name}-"))
        self.logs = self.home / "logs"
        self.logs.mkdir()
        self.pg_name: Optional[str] = None
        self.redis_proc: Optional[subprocess.Popen] = None
        self._db = None

    # -- lifecycle -------------------------------------------------------------------
    def __enter__(self) -> "Stack":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        from app.config import from_env
        from app.migrate import upgrade

        port = free_port()
        self.redis_proc = subprocess.Popen(
            [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
             "--dir", str(self.home), "--loglevel", "warning"],
            stdout=open(self.logs / "redis.log", "wb"), stderr=subprocess.STDOUT)
        wait_for_port(port, 15, self.redis_proc)
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        if self.database_kind == "postgres":
            from sqlalchemy import create_engine, text

            self.pg_name = f"medmaas_bench_{self.name}_{uuid.uuid4().hex[:8]}"
            admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{self.pg_name}"'))
            admin.dispose()
            db_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{self.pg_name}"
        else:
            db_url = ""
        self.settings = from_env({}, home=self.home, database_url=db_url, broker_url=self.redis_url,
                                 secret_key="bench-secret", log_level=self.log_level,
                                 **{**FAIRNESS_OFF, **self.settings_overrides})
        upgrade(self.settings)
        self.tenant_id, self.key = self.new_tenant(f"bench-{self.name}")

    def close(self) -> None:
        for p in reversed(self.procs):
            stop_process(p)
        self.procs.clear()
        if self._db is not None:
            self._db.dispose()
        if self.redis_proc is not None:
            stop_process(self.redis_proc)
        if self.pg_name:
            from sqlalchemy import create_engine, text

            admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)'))
            admin.dispose()
            self.pg_name = None
        if not os.environ.get("MEDMAAS_BENCH_KEEP"):
            shutil.rmtree(self.home, ignore_errors=True)

    # -- data layer ------------------------------------------------------------------
    @property
    def db(self):  # noqa: ANN201
        if self._db is None:
            from app.db import Database

            self._db = Database(self.settings.sqlalchemy_url)
        return self._db

    def new_tenant(self, name: str) -> tuple[int, str]:
        from app import auth
        from app.db import Database

        database = Database(self.settings.sqlalchemy_url)
        try:
            with database.session() as s:
                tenant = auth.create_tenant(s, f"{name}-{uuid.uuid4().hex[:6]}")
                return tenant.id, auth.create_key(s, tenant, "bench")
        finally:
            database.dispose()

    # -- processes -------------------------------------------------------------------
    def env(self, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
        from app.config import to_env

        env = {**os.environ, **to_env(self.settings), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        env.update(extra or {})
        return env

    def spawn(self, args: list[str], log_name: str, extra_env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        log = open(self.logs / f"{log_name}.log", "wb")
        proc = subprocess.Popen(args, env=self.env(extra_env), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                preexec_fn=_own_session_dying_with_parent)
        proc.log_path = self.logs / f"{log_name}.log"  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def web(self, workers: int = 2, threads: int = 8) -> tuple[subprocess.Popen, str]:
        """The production server: `medmaas web` (gunicorn gthread)."""
        port = free_port()
        proc = self.spawn([sys.executable, "-m", "medmaas.cli", "web", "--host", "127.0.0.1", "--port", str(port),
                           "--workers", str(workers), "--threads", str(threads)], f"web-{port}")
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", proc)
        return proc, url

    def bare_web(self, workers: int = 2, threads: int = 8) -> tuple[subprocess.Popen, str]:
        """A bare Flask app (bench.common:bare_app) served by the same gunicorn command line."""
        port = free_port()
        proc = self.spawn([sys.executable, "-m", "gunicorn", "bench.common:bare_app()", "--bind",
                           f"127.0.0.1:{port}", "--workers", str(workers), "--threads", str(threads), *GUNICORN_ARGS],
                          f"bare-web-{port}", {"BENCH_BARE_BROKER_URL": self.redis_url})
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", proc)
        return proc, url

    def worker(self, queues: str = "cpu", *extra: str, extra_env: Optional[dict[str, str]] = None,
               name: str = "worker") -> subprocess.Popen:
        """`medmaas worker` as shipped (solo pool unless told otherwise); returns once it is ready."""
        proc = self.spawn([sys.executable, "-m", "medmaas.cli", "worker", "--queues", queues, *extra],
                          f"{name}-{len(self.procs)}", extra_env)
        wait_for_log(proc.log_path, " ready.", 120, proc)  # type: ignore[attr-defined]
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        stop_process(proc)
        if proc in self.procs:
            self.procs.remove(proc)


def _own_session_dying_with_parent() -> None:
    """Child setup: its own process group (so stop_process reaches gunicorn's workers too),
    and SIGTERM if the benchmark process dies first."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process (and its session's children, e.g. gunicorn workers), then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait()


def wait_http(url: str, proc: Optional[subprocess.Popen] = None, timeout: float = 60.0) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log = getattr(proc, "log_path", None)
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}:\n"
                               f"{log.read_text(errors='replace')[-3000:] if log else ''}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not answering 200 after {timeout}s")


def gunicorn_worker_pids(master_pid: int) -> list[int]:
    """Child processes of a gunicorn master (to profile the workers that serve requests)."""
    try:
        out = subprocess.run(["pgrep", "-P", str(master_pid)], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [int(x) for x in out.split()]


# --------------------------------------------------------------------------- HTTP client


class Api:
    """A tiny client for the platform's HTTP API (one requests.Session)."""

    def __init__(self, base_url: str, key: str):
        import requests

        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        self.base, self.http = base_url.rstrip("/"), requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"
        # gunicorn drops idle keep-alive connections after 2 s; retry GETs that hit one.
        self.http.mount("http://", HTTPAdapter(max_retries=Retry(total=3, connect=3, read=3, backoff_factor=0.05,
                                                                 allowed_methods={"GET"}, status=0)))

    def submit(self, kind: str, spec: dict, **kw: Any) -> dict:
        r = self.http.post(f"{self.base}/api/v1/jobs", json={"kind": kind, "spec": spec, **kw}, timeout=60)
        if r.status_code not in (200, 202):
            raise RuntimeError(f"submit failed: {r.status_code} {r.text[:500]}")
        return r.json()

    def job(self, job_id: int) -> dict:
        r = self.http.get(f"{self.base}/api/v1/jobs/{job_id}", timeout=60)
        r.raise_for_status()
        return r.json()

    def events(self, job_id: int, after: int = 0) -> list[dict]:
        items: list[dict] = []
        while True:
            r = self.http.get(f"{self.base}/api/v1/jobs/{job_id}/events", params={"after": after, "limit": 10000},
                              timeout=60)
            r.raise_for_status()
            page = r.json()["items"]
            items += page
            if len(page) < 10000:
                return items
            after = page[-1]["seq"]

    def upload(self, kind: str, path: Path, **options: str) -> dict:
        with open(path, "rb") as fh:
            r = self.http.post(f"{self.base}/api/v1/datasets", data={"kind": kind, **options},
                               files={"file": (path.name, fh)}, timeout=600)
        if r.status_code != 201:
            raise RuntimeError(f"upload failed: {r.status_code} {r.text[:500]}")
        return r.json()

    def wait(self, job_id: int, timeout: float = 600.0, interval: float = 1.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job["state"] in ("succeeded", "failed", "cancelled"):
                return job
            time.sleep(interval)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s: {self.job(job_id)}")


# --------------------------------------------------------------------------- bare web app


BARE_JOB = {  # the same shape and size as a real GET /api/v1/jobs/{id} answer for a sleep job
    "id": 0, "kind": "sleep", "state": "succeeded",
    "spec": {"seconds": 0.0, "steps": 1, "fail": False, "metrics": False, "queue": None},
    "queue": "cpu", "priority": 0, "attempts": 1, "max_attempts": 3, "progress": 1.0, "message": "succeeded",
    "error": None, "result": {"slept_s": 0.0, "steps": 1, "attempt": 1},
    "created_at": "2025-01-01T00:00:00.000000+00:00", "started_at": "2025-01-01T00:00:00.010000+00:00",
    "finished_at": "2025-01-01T00:00:00.020000+00:00", "heartbeat_at": "2025-01-01T00:00:00.010000+00:00",
    "worker": "bench:1", "cancel_requested": False, "idempotency_key": None, "duration_s": 0.01,
}


def bare_app():  # noqa: ANN201
    """The bare baseline for the web benchmarks: Flask + jsonify, no auth, no database,
    no schema. POST /bare/jobs publishes one Celery message (no durable row) and answers 202."""
    from flask import Flask, jsonify, request

    app = Flask("bare")
    state: dict[str, Any] = {}

    def celery():  # noqa: ANN202
        if "celery" not in state:
            from celery import Celery

            c = Celery("bare-web", broker=os.environ["BENCH_BARE_BROKER_URL"], set_as_current=False)
            c.conf.update(task_ignore_result=True, task_serializer="json", broker_connection_retry_on_startup=True)
            state["celery"] = c
        return state["celery"]

    @app.get("/healthz")
    def healthz():  # noqa: ANN202
        return jsonify({"status": "ok"})

    @app.get("/bare/jobs/<int:job_id>")
    def job(job_id: int):  # noqa: ANN202
        return jsonify({**BARE_JOB, "id": job_id})

    @app.post("/bare/jobs")
    def submit():  # noqa: ANN202
        body = request.get_json(force=True)
        task_id = uuid.uuid4().hex
        celery().send_task("bench.noop", args=[], queue="bare-submit", task_id=task_id)
        return jsonify({**BARE_JOB, "state": "queued", "kind": body.get("kind"), "id": task_id}), 202

    return app


# --------------------------------------------------------------------------- profiling


def py_spy_available() -> bool:
    return shutil.which("py-spy") is not None or (Path(sys.executable).parent / "py-spy").exists()


def py_spy_top(pids: list[int], seconds: float, out_dir: Path, label: str, top: int = 25) -> dict[str, Any]:
    """Sample processes with `py-spy record --format raw` for `seconds` (in the background:
    returns a handle; call finish_profile(handle))."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for pid in pids:
        raw = out_dir / f"{label}-{pid}.txt"
        p = subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                              "--rate", "200", "--format", "raw", "--output", str(raw), "--nonblocking"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append((p, raw))
    return {"procs": procs, "top": top}


def finish_profile(handle: dict[str, Any], focus: Iterable[str] = ()) -> dict[str, Any]:
    """Wait for py-spy and fold its raw stacks into self-time and inclusive-time tables."""
    stacks: dict[str, int] = {}
    for p, raw in handle["procs"]:
        try:
            p.wait(120)
        except subprocess.TimeoutExpired:
            p.kill()
        if raw.exists():
            for line in raw.read_text(errors="replace").splitlines():
                stack, _, count = line.rpartition(" ")
                if stack and count.isdigit():
                    stacks[stack] = stacks.get(stack, 0) + int(count)
    return fold_stacks(stacks, handle["top"], focus)


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    name, _, loc = frame.partition(" (")
    loc = loc.rstrip(")")
    path, _, _line = loc.rpartition(":")
    for marker in ("site-packages/", "/work/main/", str(ROOT) + "/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def fold_stacks(stacks: dict[str, int], top: int = 25, focus: Iterable[str] = ()) -> dict[str, Any]:
    """Self and inclusive sample shares per function; `focus` adds the inclusive share of
    each named function (matched on the "name (file)" label's start) even when not in the top."""
    total = sum(stacks.values())
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    for stack, n in stacks.items():
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        leaf = _frame_name(frames[-1])
        self_t[leaf] = self_t.get(leaf, 0) + n
        for name in {_frame_name(f) for f in frames}:
            incl[name] = incl.get(name, 0) + n

    def table(d: dict[str, int]) -> list[list[Any]]:
        return [[k, round(100.0 * v / total, 1)] for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]] if total else []

    out = {"samples": total, "note": "py-spy samples of threads on CPU (idle threads excluded)",
           "self_pct": table(self_t), "inclusive_pct": table(incl)}
    def matches(label: str, f: str) -> bool:
        if f.startswith("*."):  # any class: "*.do_ping"
            name = label.split(" (", 1)[0]
            return name == f[2:] or name.endswith("." + f[2:])
        return label.startswith(f if " (" in f else f + " (")

    focus = list(focus)
    if focus and total:
        out["focus_inclusive_pct"] = {f: round(100.0 * sum(v for k, v in incl.items() if matches(k, f)) / total, 1)
                                      for f in focus}
    return out


# --------------------------------------------------------------------------- results


def write_result(name: str, result: dict[str, Any], directory: Optional[Path] = None) -> Path:
    directory = directory or RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_and_print(result: dict[str, Any], out: Path) -> None:
    """A benchmark's result JSON at `out` (atomically), and its rows on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_result(out.stem, result, out.parent)
    for r in result["rows"]:
        ratio = f" = {r['ratio']}" if r.get("ratio") is not None else ""
        print(f"{r['metric']}: {r['platform']} vs {r['bare']}{ratio} [{r['target']}] {r['met']}")
    print(f"wrote {out}")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
