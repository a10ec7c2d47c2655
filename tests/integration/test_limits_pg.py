"""Fairness on the real platform (PostgreSQL, Redis, worker and beat processes, the web server
as `medmaas web` runs it):

- a tenant at its limit of running jobs on a queue waits, with the reason on its job, while
  another tenant's job starts at once on the same worker pool; the waiting job starts when
  the slot frees (the beat's republish), without spending an attempt;
- open event streams are capped per API key across web processes, a closed connection frees
  its slot, and with 100 streams open the API keeps answering: GET /api/v1/jobs/{id} p50 is
  measured with none and with 100 open (printed; run with -s to see the figures).
"""
from __future__ import annotations

import datetime as dt
import socket
import statistics

import pytest
import requests

from tests.conftest import ApiClient, create_tenant_key, get_latencies, throwaway_pg_database, wait_until
from tests.integration.test_sse import Stream, WebServer, open_stream, submit, wait_state

pytestmark = pytest.mark.integration

TERMINAL = ("succeeded", "failed", "cancelled")


def _at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text)


@pytest.fixture()
def quiet_pg_app(pg_settings):  # noqa: ANN001, ANN201
    """An app on a database of its own: no queued job left by an earlier test (the beat would
    republish it) can take one of the worker's two slots."""
    from app.migrate import upgrade
    from tests.conftest import _make_app, close_app

    with throwaway_pg_database("medmaas_fair") as url:
        settings = pg_settings.replace(database_url=url, tenant_max_running_per_queue=1)
        upgrade(settings)
        app = _make_app(settings)
        yield app, settings
        close_app(app)


def test_a_tenant_at_its_running_limit_waits_while_another_tenant_runs(quiet_pg_app, processes) -> None:
    pg_app, settings = quiet_pg_app
    a = ApiClient(pg_app.test_client(), create_tenant_key(pg_app)[1])
    b = ApiClient(pg_app.test_client(), create_tenant_key(pg_app)[1])
    a1 = a.submit("sleep", {"seconds": 3, "steps": 3})
    a2 = a.submit("sleep", {"seconds": 3, "steps": 3})
    b1 = b.submit("sleep", {"seconds": 3, "steps": 3})
    procs = processes(settings)
    procs.worker("cpu", "--pool", "threads", "--concurrency", "2")  # one pool with room for two jobs
    procs.beat()

    seen: list[dict] = []

    def one_of_a_waits() -> dict | None:
        # Celery does not promise delivery order: either of a's jobs may be the one that waits.
        for job in (a1, a2):
            seen.append(a.job(job["id"]))
            if seen[-1]["message"].startswith("waiting"):
                return seen[-1]
        return None

    try:
        waiting = wait_until(one_of_a_waits, 240, 0.05, "one of tenant a's jobs to wait")  # includes the worker's start
    except AssertionError:
        raise AssertionError(f"{seen[-2:]}\n{procs.logs()}") from None
    assert waiting["state"] == "queued"
    assert waiting["message"] == "waiting: tenant at its limit of 1 running jobs on queue cpu"
    done = {j["id"]: client.wait(j["id"], timeout=120) for client, j in ((a, a1), (a, a2), (b, b1))}
    assert all(j["state"] == "succeeded" for j in done.values()), (done, procs.logs())
    second = done[waiting["id"]]
    first = done[a2["id"] if waiting["id"] == a1["id"] else a1["id"]]
    other = done[b1["id"]]
    # one after the other for tenant a ...
    assert _at(second["started_at"]) >= _at(first["finished_at"]), (first, second)
    # ... while tenant b's job ran alongside a's first one
    assert _at(other["started_at"]) < _at(first["finished_at"]), (first, other)
    assert second["attempts"] == 1  # waiting spends no attempt
    # picked up again soon after the slot freed (the beat ticks every 0.5 s here)
    gap = (_at(second["started_at"]) - _at(first["finished_at"])).total_seconds()
    print(f"\nwaiting job started {gap:.2f} s after its tenant's running job finished")
    assert gap < 10, gap


# -- request rate limits, counted in Redis ----------------------------------------------------


def test_rate_limits_are_counted_in_redis_across_web_processes(pg_settings) -> None:
    """Two apps stand for two web processes: a key's requests count once, wherever they land."""
    from tests.conftest import _make_app, close_app

    settings = pg_settings.replace(rate_limit="4 per minute")
    one, two = _make_app(settings), _make_app(settings)
    try:
        key = create_tenant_key(one)[1]
        a, b = ApiClient(one.test_client(), key), ApiClient(two.test_client(), key)
        assert [c.get("/api/v1/jobs").status_code for c in (a, b, a, b)] == [200] * 4
        over = b.get("/api/v1/jobs")
        assert over.status_code == 429, over.get_json()
        error = over.get_json()["error"]
        assert error["code"] == "too_many_requests" and error["details"]["limit"] == "4 per 1 minute"
        assert 1 <= int(over.headers["Retry-After"]) <= 120 and error["details"]["retry_after_s"] == int(
            over.headers["Retry-After"])
        assert ApiClient(one.test_client(), create_tenant_key(one)[1]).get("/api/v1/jobs").status_code == 200
    finally:
        close_app(one)
        close_app(two)


# -- event streams ------------------------------------------------------------------------------

STREAMS = 100


class RawStream:
    """An event stream opened on a plain socket, to be closed like a client that goes away."""

    def __init__(self, web: WebServer, key: str, job_id: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", web.port), timeout=30)
        self.sock.sendall(
            f"GET /api/v1/jobs/{job_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, head
            head += chunk
        self.status = int(head.split(b" ", 2)[1])
        self.head = head.decode("latin-1")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def capped_web(pg_settings, tmp_path_factory) -> WebServer:
    # A high request rate limit: this test measures streams, not the request limiter (which
    # still counts every request in Redis, as in production).
    settings = pg_settings.replace(sse_max_streams_per_key=STREAMS, rate_limit="100000 per minute")
    server = WebServer(settings, tmp_path_factory.mktemp("web-limits"))
    yield server
    server.stop()


def test_streams_are_capped_per_key_and_100_open_streams_leave_the_api_responsive(capped_web, pg_app,
                                                                                   processes) -> None:
    web = capped_web
    _tenant, key = create_tenant_key(pg_app)
    tenant = requests.Session()
    tenant.headers["Authorization"] = f"Bearer {key}"
    n_jobs = 4  # the tenant's default limit of running jobs per queue
    procs = processes()
    procs.worker("cpu", "--pool", "threads", "--concurrency", str(n_jobs))
    probe = submit(tenant, web, {"seconds": 0, "steps": 1})
    try:
        wait_state(tenant, web, probe["id"], TERMINAL, 240)  # the worker starting on a busy machine
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{procs.logs()}\n{web.log()}") from None
    detail = f"{web.url}/api/v1/jobs/{probe['id']}"
    get_latencies(tenant, detail, 10)  # warm every web process's pools
    unloaded = get_latencies(tenant, detail, 60)

    jobs = [submit(tenant, web, {"seconds": 60, "steps": 120}) for _ in range(n_jobs)]  # an event every 0.5 s
    streams: list[Stream] = []
    raw: list[RawStream] = []
    try:
        for j in jobs:
            wait_state(tenant, web, j["id"], ("running",), 60)
        for i in range(STREAMS - 1):
            s = open_stream(web, requests.Session(), jobs[i % n_jobs]["id"], headers=dict(tenant.headers))
            streams.append(s)
        raw.append(RawStream(web, key, jobs[0]["id"]))
        assert raw[0].status == 200, raw[0].head
        wait_until(lambda: all(s.of_type("progress") for s in streams), 60, 0.1,
                   "every stream to receive a progress event")
        loaded = get_latencies(tenant, detail, 60)
        health = get_latencies(requests.Session(), f"{web.url}/healthz", 20)
        assert all(s.error is None and s.status == 200 for s in streams)

        # one stream more than the key's cap: 429 with Retry-After and the error body
        over = tenant.get(f"{web.url}/api/v1/jobs/{jobs[1]['id']}/stream", timeout=30)
        assert over.status_code == 429, over.text
        assert over.json()["error"]["code"] == "too_many_requests"
        assert over.json()["error"]["details"]["limit"] == f"{STREAMS} open event streams"
        assert int(over.headers["Retry-After"]) >= 1
        # another key is not affected
        other = requests.Session()
        other.headers["Authorization"] = f"Bearer {create_tenant_key(pg_app)[1]}"
        theirs = submit(other, web, {"seconds": 0, "steps": 1})
        with other.get(f"{web.url}/api/v1/jobs/{theirs['id']}/stream", stream=True, timeout=30) as r:
            assert r.status_code == 200

        # a client that goes away frees its slot
        raw.pop().close()
        reopened = wait_until(
            lambda: (lambda r: r if r.status == 200 else r.close())(RawStream(web, key, jobs[2]["id"])),
            15, 0.2, "a slot to free after a client closed its stream")
        raw.append(reopened)
    finally:
        for r in raw:
            r.close()
        for j in jobs:
            tenant.post(f"{web.url}/api/v1/jobs/{j['id']}/cancel", timeout=30)
    for s in streams:
        assert s.ended.wait(60), "a stream did not end after its job was cancelled"

    p50_unloaded, p50_loaded = statistics.median(unloaded), statistics.median(loaded)
    print(f"\nGET /api/v1/jobs/{{id}} p50: {p50_unloaded * 1000:.1f} ms with no stream open, "
          f"{p50_loaded * 1000:.1f} ms with {STREAMS} open (max {max(loaded) * 1000:.1f} ms); "
          f"/healthz p50 {statistics.median(health) * 1000:.1f} ms with {STREAMS} open")
    assert max(loaded) < 2.0
    assert p50_loaded < 5 * p50_unloaded + 0.05, (p50_unloaded, p50_loaded)
