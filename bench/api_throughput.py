"""API throughput: GET /api/v1/jobs/{id} under concurrent load against the production
server (`medmaas web --workers 2`: gunicorn gthread, 8 threads each, PostgreSQL behind it)
vs a bare Flask JSON endpoint (bench.common:bare_app, no auth, no database) served by
the same gunicorn command line. Load: wrk (loopback, fixed duration, a Lua script sets
the Authorization header); a bounded Python thread pool when wrk is not installed.

Both servers are up for the whole run; they are loaded one at a time, alternating
(platform, bare, platform, bare), and the rounds are averaged.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (Api, Stack, finish_profile, gunicorn_worker_pids, log, machine_info, now_iso, pct,
                          py_spy_available, py_spy_top, row)

NAME = "api_throughput"
CONNECTIONS = 16  # = 2 gunicorn workers x 8 threads


def _to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    v, unit = float(m.group(1)), m.group(2)
    return v * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else float("nan")
    for q in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        if m:
            res[f"p{q}_ms"] = _to_ms(m.group(1))
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: (.*)", out)
    res["socket_errors"] = m.group(1).strip() if m else ""
    return res


def wrk_load(url: str, key: str | None, seconds: float, work: Path, connections: int = CONNECTIONS) -> dict[str, Any]:
    script = work / "auth.lua"
    script.write_text(f'wrk.headers["Authorization"] = "Bearer {key}"\n' if key else "\n")
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--timeout", "10s", "--latency", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    res = parse_wrk(out)
    res["tool"] = "wrk -t1 -c%d" % connections
    return res


def python_load(url: str, key: str | None, seconds: float, connections: int = CONNECTIONS) -> dict[str, Any]:
    """Fallback load generator: `connections` threads, each with a keep-alive session."""
    import requests

    lat: list[float] = []
    bad = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client() -> None:
        s = requests.Session()
        if key:
            s.headers["Authorization"] = f"Bearer {key}"
        mine: list[float] = []
        while time.monotonic() < stop_at:
            t = time.perf_counter()
            r = s.get(url, timeout=10)
            mine.append((time.perf_counter() - t) * 1000)
            if r.status_code != 200:
                with lock:
                    bad[0] += 1
        with lock:
            lat.extend(mine)

    t0 = time.monotonic()
    threads = [threading.Thread(target=client) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {"rps": len(lat) / wall, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "requests": len(lat),
            "non_2xx": bad[0], "tool": f"python threads x{connections}"}


def load(url: str, key: str | None, seconds: float, work: Path) -> dict[str, Any]:
    if shutil.which("wrk"):
        return wrk_load(url, key, seconds, work)
    return python_load(url, key, seconds)


def run(quick: bool = False, seconds: float | None = None, profile: bool = True) -> dict[str, Any]:
    seconds = seconds or (5 if quick else 10)
    rounds = 1 if quick else 2
    result: dict[str, Any] = {"benchmark": NAME, "date": now_iso(), "machine": machine_info(), "quick": quick}
    runs: dict[str, list[dict]] = {"platform": [], "bare": []}
    with Stack("api") as st:
        log(f"{NAME}: starting `medmaas web --workers 2` and the bare app under the same gunicorn flags")
        web, url = st.web(workers=2)
        bare, bare_url = st.bare_web(workers=2)
        api = Api(url, st.key)
        worker = st.worker("cpu")
        job = api.submit("sleep", {"seconds": 0, "steps": 1})
        api.wait(job["id"], 60, 0.1)
        st.stop(worker)
        target = f"{url}/api/v1/jobs/{job['id']}"
        bare_target = f"{bare_url}/bare/jobs/{job['id']}"
        body_platform = api.http.get(target).content
        body_bare = api.http.get(bare_target).content
        log(f"{NAME}: warm-up, then {rounds} round(s) of {seconds}s per server, {CONNECTIONS} connections")
        load(target, st.key, 2, st.home)
        load(bare_target, None, 2, st.home)
        for _ in range(rounds):
            runs["platform"].append(load(target, st.key, seconds, st.home))
            runs["bare"].append(load(bare_target, None, seconds, st.home))
        for name, rs in runs.items():
            for r in rs:
                if r.get("non_2xx") or not r.get("requests"):
                    raise RuntimeError(f"{name} load run had errors: {r}")
        p = {k: sum(r[k] for r in runs["platform"]) / rounds for k in ("rps", "p50_ms", "p99_ms")}
        b = {k: sum(r[k] for r in runs["bare"]) / rounds for k in ("rps", "p50_ms", "p99_ms")}
        ratio = p["rps"] / b["rps"]
        if profile and ratio < 0.5 and py_spy_available():
            log(f"{NAME}: ratio {ratio:.2f} < 0.5; profiling the gunicorn workers under load with py-spy")
            handle = py_spy_top(gunicorn_worker_pids(web.pid), seconds, st.home / "profiles", "web")
            load(target, st.key, seconds, st.home)
            result["profile"] = finish_profile(handle, [
                "Flask.wsgi_app", "require_api_key", "authenticate", "touch", "detail", "get (app/stores/jobs.py",
                "Session.scalar", "Session.commit", "Session.close", "_ConnectionFairy._checkout", "*.do_ping",
                "Schema.dump", "*.access", "*.log_request", "PollableMethodQueue.defer", "ThreadWorker.handle",
                "Connection.wait"])
    result["params"] = {"seconds_per_run": seconds, "rounds": rounds, "connections": CONNECTIONS,
                        "server": "gunicorn gthread, 2 workers x 8 threads (medmaas web flags)",
                        "platform_endpoint": "GET /api/v1/jobs/{id} (Bearer key, PostgreSQL)",
                        "bare_endpoint": "GET /bare/jobs/{id} (Flask jsonify of a static dict of the same shape)",
                        "body_bytes": {"platform": len(body_platform), "bare": len(body_bare)},
                        "load_tool": runs["platform"][0]["tool"], "loopback": True}
    result["rows"] = [
        row("GET /jobs/{id} requests/s", p["rps"], b["rps"], unit="req/s", target="≥ 0.5× bare", met=ratio >= 0.5),
        row("GET /jobs/{id} p99 latency", p["p99_ms"], b["p99_ms"], unit="ms", target="(report)", met=None),
        row("GET /jobs/{id} p50 latency", p["p50_ms"], b["p50_ms"], unit="ms", target="(report)", met=None),
    ]
    result["runs"] = runs
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seconds", type=float)
    args = ap.parse_args(argv)
    print(json.dumps(run(args.quick, args.seconds), indent=2, default=str))


if __name__ == "__main__":
    main()
