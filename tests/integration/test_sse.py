"""Server-sent events against the real web server, as `medmaas web` runs it (gunicorn with
uvicorn workers serving app.asgi), on PostgreSQL + Redis, with a real worker subprocess.

- events are pushed: a progress event reaches the stream a few milliseconds after the
  worker commits it (the old poll slept 0.3-0.5 s between reads);
- open streams hold no web thread: with 48 streams open (three times the old server's
  2 x 8 threads), GET /api/v1/jobs/{id} still answers about as fast as with none;
- the stream routes authenticate exactly like the Flask routes (401 without a key or
  cookie, 404 for another tenant's job, the same JSON error bodies);
- a stream resumes after Last-Event-ID / ?after.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from app.config import to_env
from medmaas.standalone import free_port
from tests.conftest import ROOT, create_tenant_key, get_latencies, wait_until

pytestmark = pytest.mark.integration

TERMINAL = ("succeeded", "failed", "cancelled")


class WebServer:
    """`medmaas web` as a subprocess on a free port."""

    def __init__(self, settings: Any, log_dir: Path, workers: int = 2):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"web-{self.port}.log"
        env = {**os.environ, **to_env(settings), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "medmaas.cli", "web", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", str(workers), "--no-access-log"],
            env=env, cwd=ROOT, stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115

        def healthy() -> bool:
            assert self.proc.poll() is None, f"web exited:\n{self.log()}"
            try:
                return requests.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(healthy, 90, 0.1, "the web server to answer /healthz")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def web(pg_settings, tmp_path_factory) -> WebServer:
    # 48 streams on one key and 10-minute sleep jobs: past the default fairness limits
    # (tests/integration/test_limits_pg.py tests those)
    settings = pg_settings.replace(sse_max_streams_per_key=100, sleep_max_s=600.0)
    server = WebServer(settings, tmp_path_factory.mktemp("web"))
    yield server
    server.stop()


@pytest.fixture
def tenant(pg_app) -> requests.Session:
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {create_tenant_key(pg_app)[1]}"
    return http


class Stream(threading.Thread):
    """Reads one SSE stream in the background, recording each event with its arrival time."""

    def __init__(self, url: str, session: requests.Session, headers: dict | None = None):
        super().__init__(daemon=True)
        self.url, self.session, self.headers = url, session, headers or {}
        self.status: int | None = None
        self.body = ""
        self.content_type = ""
        self.events: list[dict[str, Any]] = []  # {"id", "event", "data", "at" (wall clock)}
        self.comments = 0
        self.ended = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.session.get(self.url, headers=self.headers, stream=True, timeout=(10, 60)) as r:
                self.status, self.content_type = r.status_code, r.headers.get("Content-Type", "")
                if r.status_code != 200:
                    self.body = r.text
                    return
                current: dict[str, Any] = {}
                for line in r.iter_lines(decode_unicode=True):
                    if line is None:
                        continue
                    if line.startswith(":"):
                        self.comments += 1
                    elif line == "":
                        if "data" in current:
                            current["at"] = time.time()
                            current["data"] = json.loads(current["data"])
                            self.events.append(current)
                            if current.get("event") == "end":
                                return
                        current = {}
                    else:
                        name, _, value = line.partition(":")
                        current[name] = value[1:] if value.startswith(" ") else value
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended.set()

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == type_]

    def seqs(self) -> list[int]:
        return [int(e["id"]) for e in self.events if e.get("event") != "end"]


def submit(http: requests.Session, web: WebServer, spec: dict) -> dict:
    r = http.post(f"{web.url}/api/v1/jobs", json={"kind": "sleep", "spec": spec}, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()


def job(http: requests.Session, web: WebServer, job_id: int) -> dict:
    r = http.get(f"{web.url}/api/v1/jobs/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_state(http: requests.Session, web: WebServer, job_id: int, states: tuple[str, ...], timeout: float = 120):
    return wait_until(lambda: (lambda j: j if j["state"] in states else None)(job(http, web, job_id)), timeout, 0.1,
                      f"job {job_id} in {states}")


def open_stream(web: WebServer, http: requests.Session, job_id: int, **kw: Any) -> Stream:
    s = Stream(f"{web.url}/api/v1/jobs/{job_id}/stream", http, **kw)
    s.start()
    return s


def _ts(event: dict) -> float:
    return dt.datetime.fromisoformat(event["data"]["ts"]).timestamp()


# -- push latency --------------------------------------------------------------------------

def test_progress_events_are_pushed_as_the_worker_commits_them(web, tenant, processes) -> None:
    procs = processes()
    first = submit(tenant, web, {"seconds": 0, "steps": 1})  # the worker is warm before we measure
    procs.worker("cpu")
    wait_state(tenant, web, first["id"], TERMINAL)

    j = submit(tenant, web, {"seconds": 6, "steps": 20})  # a progress event every 0.3 s
    stream = open_stream(web, tenant, j["id"])
    assert stream.ended.wait(120), f"stream did not end\n{web.log()}"
    assert stream.error is None, stream.error
    assert stream.status == 200, stream.body
    assert stream.content_type.startswith("text/event-stream")
    progress = stream.of_type("progress")
    assert [e["data"]["data"]["step"] for e in progress] == list(range(1, 21))
    assert stream.of_type("end")[-1]["data"] == {"state": "succeeded"}
    assert stream.seqs() == list(range(1, len(stream.seqs()) + 1))
    # Arrival minus the event's own timestamp (stamped just before the worker's commit).
    # A 0.3-0.5 s poll would make the median ~0.2 s and the worst ~0.5 s.
    delays = sorted(e["at"] - _ts(e) for e in progress)
    median = statistics.median(delays)
    assert median < 0.1, f"median push delay {median:.3f}s: {[round(d, 3) for d in delays]}"
    assert delays[-1] < 1.0, f"worst push delay {delays[-1]:.3f}s: {[round(d, 3) for d in delays]}"


# -- many open streams do not tie up the server ---------------------------------------------

def test_many_open_streams_leave_the_api_responsive(web, tenant, processes) -> None:
    n_jobs, per_job = 4, 12  # 48 streams: three times the old server's 2 workers x 8 threads
    procs = processes()
    procs.worker("cpu", "--pool", "threads", "--concurrency", str(n_jobs))
    probe = submit(tenant, web, {"seconds": 0, "steps": 1})
    wait_state(tenant, web, probe["id"], TERMINAL)
    detail = f"{web.url}/api/v1/jobs/{probe['id']}"
    get_latencies(tenant, detail, 10)  # warm every worker's pool
    unloaded = get_latencies(tenant, detail, 60)

    jobs = [submit(tenant, web, {"seconds": 600, "steps": 1200}) for _ in range(n_jobs)]  # an event every 0.5 s
    streams: list[Stream] = []
    try:
        for j in jobs:
            wait_state(tenant, web, j["id"], ("running",), 60)
        for j in jobs:
            for _ in range(per_job):
                streams.append(open_stream(web, requests.Session(), j["id"],
                                           headers=dict(tenant.headers)))
        wait_until(lambda: all(s.of_type("progress") for s in streams), 60, 0.1,
                   "every stream to receive a progress event")
        counts_before = [len(s.events) for s in streams]
        loaded = get_latencies(tenant, detail, 60)
        # every stream is still live: it received more events while we measured
        wait_until(lambda: all(len(s.events) > c for s, c in zip(streams, counts_before, strict=False)), 30, 0.1,
                   "every stream to keep receiving events")
        assert all(s.error is None and s.status == 200 for s in streams)
    finally:
        for j in jobs:
            tenant.post(f"{web.url}/api/v1/jobs/{j['id']}/cancel", timeout=30)
    for s in streams:  # a cancelled job ends every stream on it with `end`
        assert s.ended.wait(60), "a stream did not end after its job was cancelled"
        assert s.of_type("end")[-1]["data"] == {"state": "cancelled"}, s.events[-3:]
    p50_unloaded, p50_loaded = statistics.median(unloaded), statistics.median(loaded)
    assert max(loaded) < 2.0, f"a GET took {max(loaded):.2f}s with {len(streams)} streams open"
    # The benchmark (bench/sse_load.py) holds 100 streams to <= 2x; this shared test machine
    # gets a little slack on top.
    assert p50_loaded <= max(2.5 * p50_unloaded, p50_unloaded + 0.02), (
        f"GET /jobs/{{id}} p50 {p50_unloaded * 1000:.1f} ms unloaded, {p50_loaded * 1000:.1f} ms with "
        f"{len(streams)} streams open")


# -- authentication, exactly as the Flask routes ---------------------------------------------

def test_stream_auth_matches_the_api(web, tenant, pg_app) -> None:
    mine = submit(tenant, web, {"seconds": 0, "steps": 1})
    url = f"{web.url}/api/v1/jobs/{mine['id']}/stream"

    anonymous = requests.get(url, timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "unauthorized"
    assert anonymous.json() == requests.get(f"{web.url}/api/v1/jobs/{mine['id']}", timeout=30).json()
    wrong = requests.get(url, headers={"Authorization": "Bearer mm_000000000000_nope"}, timeout=30)
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "unauthorized"

    other = requests.Session()
    other.headers["Authorization"] = f"Bearer {create_tenant_key(pg_app)[1]}"
    theirs = other.get(url, timeout=30)
    assert theirs.status_code == 404
    assert theirs.json()["error"]["code"] == "not_found"
    assert other.get(f"{web.url}/api/v1/jobs/987654321/stream", timeout=30).status_code == 404
    assert tenant.get(f"{url}?after=x", timeout=30).status_code == 400
    # other methods on the stream path are Flask's as before (the key is checked first)
    assert requests.post(url, timeout=30).status_code == 401
    assert tenant.post(url, timeout=30).status_code == 405


def _sign_in(web: WebServer, key: str) -> requests.Session:
    browser = requests.Session()
    page = browser.get(f"{web.url}/login", timeout=30)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token, page.text[:2000]
    r = browser.post(f"{web.url}/login", data={"api_key": key, "csrf_token": token.group(1)}, timeout=30,
                     allow_redirects=False)
    assert r.status_code in (302, 303), r.text[:500]
    return browser


def test_page_stream_uses_the_session_cookie(web, pg_app, processes) -> None:
    _tenant_id, key = create_tenant_key(pg_app)
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {key}"
    mine = submit(api, web, {"seconds": 0.5, "steps": 2})
    url = f"{web.url}/ui/api/jobs/{mine['id']}/stream"

    anonymous = requests.get(url, timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "unauthorized"
    assert requests.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code == 401  # cookie only

    browser = _sign_in(web, key)
    stranger = _sign_in(web, create_tenant_key(pg_app)[1])
    theirs = stranger.get(url, timeout=30)
    assert theirs.status_code == 404
    assert theirs.json()["error"]["code"] == "not_found"

    processes().worker("cpu")
    stream = Stream(url, browser)
    stream.start()
    assert stream.ended.wait(60), web.log()
    assert stream.status == 200
    assert stream.error is None
    assert stream.of_type("end")[-1]["data"] == {"state": "succeeded"}
    assert len(stream.of_type("progress")) == 2
    # the page twin keeps the pages' security headers
    head = browser.get(url, stream=True, timeout=30)
    assert head.headers.get("X-Content-Type-Options") == "nosniff"
    head.close()


# -- resume ----------------------------------------------------------------------------------

def test_stream_resumes_after_last_event_id(web, tenant, processes) -> None:
    j = submit(tenant, web, {"seconds": 0.3, "steps": 3})
    processes().worker("cpu")
    wait_state(tenant, web, j["id"], TERMINAL)
    full = open_stream(web, tenant, j["id"])
    assert full.ended.wait(30)
    seqs = full.seqs()
    assert seqs == list(range(1, len(seqs) + 1))
    assert len(seqs) >= 5

    resumed = open_stream(web, tenant, j["id"], headers={"Last-Event-ID": "3"})
    assert resumed.ended.wait(30)
    assert resumed.seqs() == seqs[3:]
    assert resumed.of_type("end")[-1]["id"] == str(seqs[-1])

    after = Stream(f"{web.url}/api/v1/jobs/{j['id']}/stream?after={seqs[-2]}", tenant)
    after.start()
    assert after.ended.wait(30)
    assert after.seqs() == seqs[-1:]


def test_a_live_stream_resumes_where_it_left_off(web, tenant, processes) -> None:
    """Reconnecting mid-job with the last id seen (what EventSource does after a drop) gives
    exactly the rest: no event lost, none repeated."""
    procs = processes()
    procs.worker("cpu")
    j = submit(tenant, web, {"seconds": 3, "steps": 10})
    first = open_stream(web, tenant, j["id"])
    wait_until(lambda: len(first.of_type("progress")) >= 3, 60, 0.05, "three progress events")
    last_id = first.events[-1]["id"]
    seen = first.seqs()
    second = open_stream(web, tenant, j["id"], headers={"Last-Event-ID": last_id})
    assert second.ended.wait(60)
    assert first.ended.wait(60)
    assert second.seqs()[0] == int(last_id) + 1
    assert sorted(set(seen) | set(second.seqs())) == first.seqs()
