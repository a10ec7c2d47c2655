"""SSE load: does an open job stream cost the web server a thread?

The production server (`medmaas web --workers 2`: gunicorn with uvicorn workers serving
app.asgi, PostgreSQL + Redis behind it) with 10 running jobs, each reporting progress once a
second. GET /api/v1/jobs/{id} is timed by one sequential keep-alive client:

1. unloaded: the jobs run, nobody watches them;
2. loaded: 100 SSE streams are open on those jobs (10 viewers each), all receiving events;
3. unloaded again, after the streams are closed (drift check).

Target: loaded p50 <= 2x unloaded p50. The streams must keep receiving events while the
GETs are timed (push delay = arrival time - the event's own timestamp).

Diagnostic baseline (skipped with --no-gthread): the previous server, gunicorn gthread
2 workers x 8 threads on the WSGI app, with the same 100 streams: each stream holds a
thread, so GETs queue behind them (bounded tries with a short timeout).

Everything is on loopback, every loop is bounded, and the jobs are cancelled at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import socket
import sys
import threading
import time
from typing import Any

from bench.common import GUNICORN_ARGS, Api, Stack, free_port, log, machine_info, now_iso, pct, row, summary, wait_http

NAME = "sse_load"
STREAMS = 100
JOBS = 10
EVENT_INTERVAL_S = 1.0


class SseClient(threading.Thread):
    """One SSE viewer on a raw HTTP/1.0 socket (the body ends when the connection does, and
    shutdown() from another thread ends the read at once). Records each event's arrival."""

    def __init__(self, port: int, path: str, key: str, connect_timeout: float = 10.0):
        super().__init__(daemon=True)
        self.port, self.path, self.key = port, path, key
        self.connect_timeout = connect_timeout
        self.sock: socket.socket | None = None
        self.status: int | None = None
        self.events: list[tuple[float, str, dict]] = []  # (arrival wall time, type, data)
        self.error: str | None = None
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.connect_timeout)
            self.sock = sock
            sock.settimeout(None)
            sock.sendall((f"GET {self.path} HTTP/1.0\r\nHost: 127.0.0.1:{self.port}\r\n"
                          f"Authorization: Bearer {self.key}\r\nAccept: text/event-stream\r\n\r\n").encode())
            f = sock.makefile("rb")
            status_line = f.readline().decode("latin-1")
            self.status = int(status_line.split()[1]) if status_line else None
            while f.readline() not in (b"\r\n", b"\n", b""):  # headers
                pass
            event, data = "message", None
            for raw in f:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                elif line == "" and data is not None:
                    with self.lock:
                        self.events.append((time.time(), event, json.loads(data)))
                    if event == "end":
                        break
                    event, data = "message", None
        except OSError as exc:
            if self.sock is not None and self.sock.fileno() != -1:
                self.error = repr(exc)
        finally:
            if self.sock is not None:
                self.sock.close()

    def count(self, type_: str = "progress") -> int:
        with self.lock:
            return sum(1 for _, t, _ in self.events if t == type_)

    def delays(self, since: float) -> list[float]:
        with self.lock:
            return [at - dt.datetime.fromisoformat(d["ts"]).timestamp()
                    for at, t, d in self.events if t == "progress" and at >= since]

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


def open_streams(port: int, key: str, job_ids: list[int], n: int) -> list[SseClient]:
    clients = [SseClient(port, f"/api/v1/jobs/{job_ids[i % len(job_ids)]}/stream", key) for i in range(n)]
    for c in clients:
        c.start()
    return clients


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} after {timeout}s")


def close_streams(clients: list[SseClient]) -> None:
    for c in clients:
        c.close()
    for c in clients:
        c.join(10)


def time_gets(api: Api, url: str, n: int, timeout: float = 30.0) -> tuple[list[float], int]:
    """n sequential GETs; (latencies in ms of the ones answered, number that failed or timed out)."""
    import requests

    lat, failed = [], 0
    for _ in range(n):
        t = time.perf_counter()
        try:
            r = api.http.get(url, timeout=timeout)
            ok = r.status_code == 200
        except requests.RequestException:
            ok = False
        if ok:
            lat.append((time.perf_counter() - t) * 1000)
        else:
            failed += 1
    return lat, failed


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def gthread_baseline(st: Stack, job_ids: list[int], streams: int, tries: int) -> dict[str, Any]:
    """The previous server (gunicorn gthread 2 x 8 on app.wsgi) under the same streams."""
    port = free_port()
    proc = st.spawn([sys.executable, "-m", "gunicorn", "app.wsgi:app", "--bind", f"127.0.0.1:{port}",
                     "--workers", "2", "--threads", "8", *GUNICORN_ARGS], f"gthread-web-{port}")
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc)
    api = Api(url, st.key)
    target = f"{url}/api/v1/jobs/{job_ids[0]}"
    time_gets(api, target, 5)
    unloaded, _ = time_gets(api, target, 50)
    clients = open_streams(port, st.key, job_ids, streams)
    try:
        time.sleep(3)  # bounded settle: the first 16 streams take every thread; the rest queue
        served = sum(1 for c in clients if c.count() > 0)
        loaded, failed = time_gets(api, target, tries, timeout=2.0)
    finally:
        close_streams(clients)
        st.stop(proc)
    return {"server": "gunicorn gthread, 2 workers x 8 threads, app.wsgi:app (the previous `medmaas web`)",
            "streams_opened": streams, "streams_receiving_events": served,
            "get_unloaded_ms": summary(unloaded), "get_loaded_ms": summary(loaded),
            "get_tries": tries, "get_failed_or_timed_out_2s": failed}


def run(quick: bool = False, streams: int = STREAMS, gthread: bool = True) -> dict[str, Any]:
    samples = 100 if quick else 300
    result: dict[str, Any] = {"benchmark": NAME, "date": now_iso(), "machine": machine_info(), "quick": quick}
    with Stack("sse") as st:
        log(f"{NAME}: starting `medmaas web --workers 2` (uvicorn workers, app.asgi) and a worker for {JOBS} jobs")
        _web, url = st.web(workers=2)
        api = Api(url, st.key)
        st.worker("cpu", "--pool", "threads", "--concurrency", str(JOBS))
        probe = api.submit("sleep", {"seconds": 0, "steps": 1})
        api.wait(probe["id"], 60, 0.1)
        target = f"{url}/api/v1/jobs/{probe['id']}"
        duration = 240 if quick else 480  # longer than the run; cancelled at the end anyway
        jobs = [api.submit("sleep", {"seconds": duration, "steps": int(duration / EVENT_INTERVAL_S)})
                for _ in range(JOBS)]
        job_ids = [j["id"] for j in jobs]
        try:
            wait_for(lambda: all(api.job(i)["state"] == "running" for i in job_ids), 60, "jobs not running")
            time_gets(api, target, 20)  # warm both web workers' pools
            log(f"{NAME}: unloaded: {samples} sequential GET /api/v1/jobs/{{id}} ({JOBS} jobs running, no streams)")
            before, _ = time_gets(api, target, samples)

            log(f"{NAME}: opening {streams} SSE streams ({streams // JOBS} per job)")
            clients = open_streams(port_of(url), st.key, job_ids, streams)
            try:
                wait_for(lambda: all(c.count() > 0 for c in clients), 60, "not every stream got a progress event")
                counts = [c.count() for c in clients]
                t_load = time.time()
                log(f"{NAME}: loaded: {samples} GETs with {streams} streams open")
                loaded, loaded_failed = time_gets(api, target, samples)
                window = time.time() - t_load
                # every stream still live: one more event after the GETs (events come every second)
                wait_for(lambda: all(c.count() > n for c, n in zip(clients, counts, strict=False)), 30,
                         "a stream stopped receiving events")
                got = [c.count() - n for c, n in zip(clients, counts, strict=False)]
                delays = [d * 1000 for c in clients for d in c.delays(t_load)]
                errors = [c.error for c in clients if c.error] + [f"status {c.status}" for c in clients
                                                                  if c.status != 200]
            finally:
                close_streams(clients)
            log(f"{NAME}: unloaded again after closing the streams")
            after, _ = time_gets(api, target, samples)
            baseline = None
            if gthread:
                log(f"{NAME}: diagnostic: the previous gthread server under the same {streams} streams")
                baseline = gthread_baseline(st, job_ids, streams, tries=10)
        finally:
            for i in job_ids:
                api.http.post(f"{url}/api/v1/jobs/{i}/cancel", timeout=30)
    if errors:
        raise RuntimeError(f"stream errors: {errors[:5]}")
    if loaded_failed:
        raise RuntimeError(f"{loaded_failed} GETs failed with the streams open")
    # Conservative: the faster of the two unloaded runs (before / after) is the baseline.
    base = before if pct(before, 50) <= pct(after, 50) else after
    p50_ratio = pct(loaded, 50) / pct(base, 50)
    result["params"] = {
        "server": "medmaas web --workers 2 (gunicorn + app.asgi.Worker; Flask on 8 a2wsgi threads per worker)",
        "database": "PostgreSQL", "streams": streams, "jobs": JOBS, "viewers_per_job": streams // JOBS,
        "event_interval_s": EVENT_INTERVAL_S, "get_samples": samples, "get_client": "1 sequential keep-alive client",
        "endpoint": "GET /api/v1/jobs/{id} (Bearer key)", "loopback": True,
    }
    result["get_ms"] = {"unloaded": summary(before), "loaded": summary(loaded), "unloaded_after": summary(after)}
    result["streams"] = {
        "opened": streams, "receiving_events": sum(1 for g in got if g > 0),
        "events_during_loaded_window": sum(got), "loaded_window_s": round(window, 2),
        "expected_events_per_s": round(streams / EVENT_INTERVAL_S, 1),
        "push_delay_ms": summary(delays, 1),
    }
    if baseline is not None:
        result["gthread_baseline"] = baseline
    result["rows"] = [
        row(f"GET /jobs/{{id}} p50, {streams} SSE streams open vs none", pct(loaded, 50), pct(base, 50), unit="ms",
            target="≤ 2× unloaded", met=p50_ratio <= 2.0,
            note=f"unloaded p50 before {pct(before, 50):.1f} ms, after {pct(after, 50):.1f} ms; the lower is the bare"),
        row(f"GET /jobs/{{id}} p95, {streams} SSE streams open vs none", pct(loaded, 95), pct(base, 95), unit="ms",
            target="(report)", met=None),
        row(f"streams receiving events while loaded ({sum(got)} events in {window:.0f} s)",
            float(sum(1 for g in got if g > 0)), float(streams), unit="streams", target="all", met=all(got)),
        row("push delay p50 / p95 (event commit → stream)", pct(delays, 50), pct(delays, 95), unit="ms",
            target="(report; old poll: 300-500 ms)", met=None, ratio=float("nan"),
            note="bare column = p95"),
    ]
    if baseline is not None:
        b = baseline
        row_b = row(f"previous server (gthread 2×8): streams served of {streams} opened",
                    float(b["streams_receiving_events"]), float(streams), unit="streams", target="(diagnostic)",
                    met=None, note=f"GET p50 {b['get_loaded_ms'].get('p50')} ms, p95 {b['get_loaded_ms'].get('p95')} ms, "
                                   f"{b['get_failed_or_timed_out_2s']}/{b['get_tries']} over 2 s")
        result["rows"].append(row_b)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--streams", type=int, default=STREAMS)
    ap.add_argument("--no-gthread", action="store_true", help="skip the previous-server diagnostic")
    args = ap.parse_args(argv)
    print(json.dumps(run(args.quick, args.streams, not args.no_gthread), indent=2, default=str))


if __name__ == "__main__":
    main()
