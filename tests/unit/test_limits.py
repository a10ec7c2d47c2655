"""Fairness (issue 11, item 6): request rate limits (429 with Retry-After), the queues each
kind may use, the `sleep` helper's limit, training spec limits, the per-tenant limit on
running jobs per queue (claim and republish), and the per-key cap on open event streams.
Service-free: SQLite, in-memory rate counters, fakeredis for the broker and stream slots."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from app import auth, dispatch, jobs, leases
from app.broker import create_celery
from app.config import Settings
from app.limits import StreamSlots
from app.models import Job, JobState
from tests.conftest import ApiClient, _make_app, close_app, create_tenant_key
from tests.unit.test_api_datasets_models import upload
from tests.unit.test_api_jobs import assert_error
from tests.unit.test_train_validation import SOLUBILITY_LIKE


@pytest.fixture()
def make_app(sqlite_settings: Settings) -> Iterator[Any]:
    apps = []

    def make(**changes: Any) -> Any:
        app = _make_app(sqlite_settings.replace(**changes))
        apps.append(app)
        return app

    yield make
    for app in apps:
        close_app(app)


def key_id(app: Any, key: str) -> int:
    with app.extensions["medmaas.db"].session() as s:
        return auth.verify(s, key).id


# -- request rate limits ------------------------------------------------------------------


def assert_too_many(resp: Any, limit: str) -> dict:
    error = assert_error(resp, 429, "too_many_requests")
    retry_after = int(resp.headers["Retry-After"])
    assert 1 <= retry_after <= 120  # within about one window of the limit
    assert error["details"] == {"limit": limit, "retry_after_s": retry_after}
    assert limit in error["message"]
    return error


def test_requests_over_the_limit_get_429_with_retry_after_per_key(make_app) -> None:  # noqa: ANN001
    app = make_app(rate_limit="5 per minute")
    client = app.test_client()
    a = ApiClient(client, create_tenant_key(app)[1])
    b = ApiClient(client, create_tenant_key(app)[1])
    for _ in range(5):
        assert a.get("/api/v1/jobs").status_code == 200
    assert_too_many(a.get("/api/v1/jobs"), "5 per 1 minute")
    assert_too_many(a.get("/api/v1/jobs/1"), "5 per 1 minute")  # one count over all routes
    assert b.get("/api/v1/jobs").status_code == 200  # another key has its own count
    # liveness, readiness and the API document are never counted
    for path in ("/healthz", "/api/v1/openapi.json"):
        assert client.get(path).status_code == 200
    assert client.get("/readyz").status_code in (200, 503)


def test_unauthenticated_requests_count_by_address(make_app) -> None:  # noqa: ANN001
    app = make_app(rate_limit="3 per minute")
    client = app.test_client()
    for _ in range(3):
        assert_error(client.get("/api/v1/jobs", headers={"Authorization": "Bearer mm_0123456789ab_wrong"}), 401)
    assert_too_many(client.get("/api/v1/jobs"), "3 per 1 minute")  # a refused key is no way around it
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "10.0.0.7"
    assert_error(other.get("/api/v1/jobs"), 401)  # another address has its own count
    # a valid key counts as itself, not as its address
    assert ApiClient(client, create_tenant_key(app)[1]).get("/api/v1/jobs").status_code == 200


def test_submits_have_a_stricter_limit(make_app) -> None:  # noqa: ANN001
    app = make_app(rate_limit="20 per minute", rate_limit_submit="2 per minute")
    api = ApiClient(app.test_client(), create_tenant_key(app)[1])
    for _ in range(2):
        api.submit("sleep", {"seconds": 0})
    assert_too_many(api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {}}), "2 per 1 minute")
    assert_too_many(api.post("/api/v1/models/m/predict", json={"inputs": ["C"]}), "2 per 1 minute")
    assert api.get("/api/v1/jobs").status_code == 200  # reads go on
    with app.extensions["medmaas.db"].session() as s:
        assert len(s.scalars(select(Job)).all()) == 2


def test_the_sign_in_form_is_limited_by_address(make_app) -> None:  # noqa: ANN001
    app = make_app(rate_limit_submit="2 per minute")
    browser = app.test_client()
    for _ in range(2):
        assert browser.post("/login", data={"api_key": "mm_0123456789ab_guess"}).status_code in (400, 401)
    resp = browser.post("/login", data={"api_key": "mm_0123456789ab_guess"})
    assert resp.status_code == 429
    assert int(resp.headers["Retry-After"]) >= 1


def test_a_web_sign_in_has_its_own_count(make_app) -> None:  # noqa: ANN001
    from tests.conftest import sign_in

    app = make_app(rate_limit="3 per minute")
    _tenant, key = create_tenant_key(app)
    browser, stranger = app.test_client(), app.test_client()  # the same address
    sign_in(app, browser, key_id(app, key))
    assert [browser.get("/jobs").status_code for _ in range(3)] == [200] * 3
    assert browser.get("/jobs").status_code == 429
    assert stranger.get("/login").status_code == 200  # the address's count is another


def test_limits_can_be_switched_off(make_app) -> None:  # noqa: ANN001
    app = make_app(rate_limit="2 per minute", rate_limit_enabled=False)
    api = ApiClient(app.test_client(), create_tenant_key(app)[1])
    assert all(api.get("/api/v1/jobs").status_code == 200 for _ in range(5))


def test_the_openapi_document_describes_429_on_every_operation(client) -> None:  # noqa: ANN001
    doc = client.get("/api/v1/openapi.json").get_json()
    operations = [(path, method, op) for path, item in doc["paths"].items() for method, op in item.items()
                  if method in ("get", "post", "put", "patch", "delete")]
    assert len(operations) > 10
    missing = [f"{m.upper()} {p}" for p, m, op in operations if "429" not in op["responses"]]
    assert missing == []
    response = doc["components"]["responses"]["TooManyRequests"]
    assert "Retry-After" in response["headers"]


# -- queues, sleep and training spec limits -------------------------------------------------


@pytest.mark.parametrize(("spec", "allowed"), [
    ({"seconds": 1, "queue": "inference"}, "cpu"),  # a long job must not hold the predictions' queue
    ({"seconds": 1, "queue": "gpu"}, "cpu"),
    ({"seconds": 1, "queue": "nowhere"}, "cpu"),
])
def test_a_kind_uses_only_its_queues(api: ApiClient, spec: dict, allowed: str) -> None:
    error = assert_error(api.post("/api/v1/jobs", json={"kind": "sleep", "spec": spec}), 422, "invalid_spec")
    [message] = error["details"]["spec"]["queue"]
    assert f"kind sleep runs on queue {allowed}" in message and repr(spec["queue"]) in message


def test_train_runs_on_cpu_or_gpu_never_inference(api: ApiClient) -> None:
    ds = upload(api, "sequences", "sol.csv", SOLUBILITY_LIKE, label_columns="solubility").get_json()
    spec = {"model_name": "m", "dataset_id": ds["id"], "arch": "rnn", "task": "regression", "target": "solubility",
            "epochs": 1}
    error = assert_error(api.post("/api/v1/jobs", json={"kind": "train", "spec": {**spec, "queue": "inference"}}),
                         422)
    assert "kind train runs on queue cpu or gpu" in error["details"]["spec"]["queue"][0]
    assert api.submit("train", {**spec, "queue": "cpu"})["queue"] == "cpu"


def test_predict_and_score_queues(sqlite_settings: Settings) -> None:
    from app.kinds import SpecError, get_kind

    predict, score = get_kind("predict"), get_kind("score")
    assert predict is not None and score is not None
    assert predict.route({"queue": None}, sqlite_settings) == "inference"
    with pytest.raises(SpecError) as err:
        predict.route({"queue": "cpu"}, sqlite_settings)
    assert "queue" in err.value.details["spec"]
    assert score.route({"queue": None, "device": "cuda"}, sqlite_settings) == "gpu"
    with pytest.raises(SpecError):
        score.route({"queue": "inference", "device": "auto"}, sqlite_settings)


def test_sleep_queues_setting_lets_an_operator_smoke_test_other_queues(make_app) -> None:  # noqa: ANN001
    app = make_app(sleep_queues="cpu,gpu,inference")
    api = ApiClient(app.test_client(), create_tenant_key(app)[1])
    assert api.submit("sleep", {"seconds": 0, "queue": "inference"})["queue"] == "inference"


def test_sleep_is_limited_to_seconds(api: ApiClient) -> None:
    error = assert_error(api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 7 * 24 * 3600}}), 422)
    [message] = error["details"]["spec"]["seconds"]
    assert "at most 60 seconds" in message
    assert api.submit("sleep", {"seconds": 60, "steps": 1})["state"] == "queued"


@pytest.fixture()
def limited(make_app) -> tuple[ApiClient, dict]:  # noqa: ANN001
    app = make_app(max_epochs=50, max_batch_size=256, max_max_len=512, max_epoch_rows=100)
    api = ApiClient(app.test_client(), create_tenant_key(app)[1])
    ds = upload(api, "sequences", "sol.csv", SOLUBILITY_LIKE, label_columns="solubility").get_json()
    return api, {"model_name": "m", "dataset_id": ds["id"], "arch": "rnn", "task": "regression",
                 "target": "solubility"}


@pytest.mark.parametrize(("change", "field", "limit"), [
    ({"epochs": 10_000}, "epochs", "at most 50"),
    ({"batch_size": 65_536}, "batch_size", "at most 256"),
    ({"max_len": 4096}, "max_len", "at most 512 tokens"),
])
def test_spec_limits_name_the_field_and_the_limit(limited, change: dict, field: str, limit: str) -> None:  # noqa: ANN001
    api, spec = limited
    error = assert_error(api.post("/api/v1/jobs", json={"kind": "train", "spec": {**spec, **change}}), 422,
                         "over_limit")
    assert list(error["details"]["spec"]) == [field]
    assert limit in error["details"]["spec"][field][0] and limit in error["message"]


def test_epochs_times_training_rows_is_bounded(limited) -> None:  # noqa: ANN001
    api, spec = limited
    # 40 rows, 80/10/10: 32 training rows; 4 epochs = 128 epoch-rows > 100, 3 = 96 fit
    error = assert_error(api.post("/api/v1/jobs", json={"kind": "train", "spec": {**spec, "epochs": 4}}), 422,
                         "over_limit")
    [message] = error["details"]["spec"]["epochs"]
    assert "4 epochs x 32 training rows = 128" in message and "budget of 100" in message
    assert "at most 3 epochs" in message
    assert api.submit("train", {**spec, "epochs": 3})["state"] == "queued"


def test_the_demo_and_the_walkthrough_fit_the_default_limits(api: ApiClient) -> None:
    ds = upload(api, "sequences", "sol.csv", SOLUBILITY_LIKE, label_columns="solubility").get_json()
    for extra in ({"epochs": 15, "batch_size": 32}, {"epochs": 5, "model": {"cell": "gru", "hidden_size": 64}}):
        spec = {"model_name": "sol", "dataset_id": ds["id"], "arch": "rnn", "task": "regression",
                "target": "solubility", **extra}
        assert api.submit("train", spec)["state"] == "queued"


# -- running jobs per tenant and queue --------------------------------------------------------


@pytest.fixture()
def db(app) -> Any:  # noqa: ANN001
    return app.extensions["medmaas.db"]


def queued(db: Any, tenant_id: int, n: int, queue: str = "cpu") -> list[int]:
    with db.session() as s:
        return [jobs.submit(s, tenant_id=tenant_id, kind="sleep", spec={"seconds": 0}, queue=queue)[0].id
                for _ in range(n)]


def test_a_tenant_at_its_limit_waits_while_others_start(app, db) -> None:  # noqa: ANN001
    a, b = create_tenant_key(app)[0], create_tenant_key(app)[0]
    a1, a2 = queued(db, a, 2)
    [a_gpu] = queued(db, a, 1, queue="gpu")
    [b1] = queued(db, b, 1)
    with db.session() as s:
        assert jobs.claim_within_limit(s, a1, "w1", 1) == 1
    with db.session() as s:
        waiting = jobs.claim_within_limit(s, a2, "w2", 1)
    assert waiting == jobs.Waiting("waiting: tenant at its limit of 1 running jobs on queue cpu")
    with db.session() as s:
        assert jobs.claim_within_limit(s, b1, "w2", 1) == 1  # another tenant starts at once
        assert jobs.claim_within_limit(s, a_gpu, "w3", 1) == 1  # the limit is per queue
        row = s.get(Job, a2)
        assert row.state == JobState.queued and row.message == waiting.message and row.published_at is None
        assert jobs.claim_within_limit(s, a2, "w2", 0) == 1  # 0: no limit


def test_a_waiting_job_is_published_again_once_a_slot_frees(app, db, fake_redis) -> None:  # noqa: ANN001
    settings = app.extensions["medmaas.settings"].replace(tenant_max_running_per_queue=1, requeue_grace_s=0.0)
    celery = create_celery(settings)
    a = create_tenant_key(app)[0]
    a1, a2, a3 = queued(db, a, 3)
    with db.session() as s:
        assert jobs.claim_within_limit(s, a1, "w", 1) == 1
        assert isinstance(jobs.claim_within_limit(s, a2, "w", 1), jobs.Waiting)
        assert isinstance(jobs.claim_within_limit(s, a3, "w", 1), jobs.Waiting)
        s.execute(Job.__table__.update().where(Job.id.in_([a2, a3])).values(priority=0))
        s.execute(Job.__table__.update().where(Job.id == a3).values(priority=5))
    fake_redis.client().delete("cpu")
    # while a1 runs, neither waiting job is sent to a worker (no busy loop of deliveries)
    assert dispatch.republish(celery, db, settings) == 0
    assert fake_redis.messages("cpu") == []
    with db.session() as s:
        assert jobs.succeed(s, a1, 1, {})
    # one slot freed: one job goes out, the higher priority first; the other keeps waiting
    assert dispatch.republish(celery, db, settings) == 1
    assert [m["args"] for m in fake_redis.messages("cpu")] == [[a3]]
    with db.session() as s:
        everything = [c.key for c in leases.to_publish(s, jobs.LEASE, 0.0)]
        assert [c.key for c in jobs.to_publish(s, 0.0, 0)] == everything == [(a2,), (a3,)]  # 0: no limit


def test_a_tenant_at_its_limit_does_not_crowd_out_the_others_republish(app, db) -> None:  # noqa: ANN001
    a, b = create_tenant_key(app)[0], create_tenant_key(app)[0]
    a_jobs = queued(db, a, 5)
    [b1] = queued(db, b, 1)
    with db.session() as s:
        assert jobs.claim_within_limit(s, a_jobs[0], "w", 1) == 1
        for job_id in a_jobs[1:]:
            assert isinstance(jobs.claim_within_limit(s, job_id, "w", 1), jobs.Waiting)
        s.execute(Job.__table__.update().where(Job.id == b1).values(published_at=None))  # b's message was lost
        # a's waiting jobs are left out by the query itself, before its row cap
        assert [c.key for c in leases.to_publish(s, jobs.LEASE, 0.0, limit=1)] == [(a_jobs[1],)]
        assert [c.key for c in jobs.to_publish(s, 0.0, 1)] == [(b1,)]


def test_the_worker_leaves_a_job_queued_while_its_tenant_is_at_the_limit(app, db) -> None:  # noqa: ANN001
    from workers.tasks import execute_job

    settings = app.extensions["medmaas.settings"].replace(tenant_max_running_per_queue=1)
    a = create_tenant_key(app)[0]
    a1, a2 = queued(db, a, 2)
    with db.session() as s:
        assert jobs.claim(s, a1, "elsewhere") == 1
    assert execute_job(db, settings, create_celery(settings), a2) == "waiting"
    with db.session() as s:
        job = s.get(Job, a2)
        assert job.state == JobState.queued and job.attempts == 0 and job.message.startswith("waiting:")


# -- open event streams per key -----------------------------------------------------------------


def test_stream_slots_count_release_and_expire(fake_redis) -> None:  # noqa: ANN001
    slots = StreamSlots(fake_redis.client(), max_per_key=2, ttl_s=60)
    first, second = slots.acquire("key:1"), slots.acquire("key:1")
    assert first and second and slots.acquire("key:1") is None
    assert slots.acquire("key:2")  # per key
    slots.release("key:1", first)
    third = slots.acquire("key:1")
    assert third and slots.held("key:1") == 2
    # a slot whose web process died without releasing it expires
    short = StreamSlots(fake_redis.client(), max_per_key=1, ttl_s=0.05)
    assert short.acquire("key:3") and short.acquire("key:3") is None
    import time

    time.sleep(0.1)
    assert short.acquire("key:3")
    assert StreamSlots(fake_redis.client(), max_per_key=0).acquire("key:1") == ""  # 0: not counted


class AsgiCall:
    """One GET through the ASGI app, as uvicorn would make it; `disconnect()` is the client
    going away."""

    def __init__(self, asgi: Any, path: str, headers: dict[str, str]) -> None:
        self.asgi, self.path, self.headers = asgi, path, headers
        self.status: int | None = None
        self.response_headers: dict[str, str] = {}
        self.body = b""
        self.gone = asyncio.Event()
        self.first_chunk = asyncio.Event()
        self.sent_request = False

    async def receive(self) -> dict:
        if not self.sent_request:
            self.sent_request = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.response_headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")
            if self.body:
                self.first_chunk.set()

    async def run(self) -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
            "path": self.path, "raw_path": self.path.encode(), "query_string": b"", "root_path": "",
            "headers": [(k.lower().encode(), v.encode()) for k, v in self.headers.items()],
            "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
        }
        await self.asgi(scope, self.receive, self.send)


def test_event_streams_are_capped_per_key_and_released_on_disconnect(make_app, fake_redis) -> None:  # noqa: ANN001
    from app.asgi import create_asgi_app

    app = make_app(sse_max_streams_per_key=2)
    asgi = create_asgi_app(app, wsgi_threads=2, stream_threads=2)
    _tenant, key = create_tenant_key(app)
    owner = f"key:{key_id(app, key)}"
    headers = {"Authorization": f"Bearer {key}"}
    api = ApiClient(app.test_client(), key)
    job = api.submit("sleep", {"seconds": 1})["id"]  # no worker: it stays queued, the stream stays open
    slots = StreamSlots(fake_redis.client(), 2)

    async def scenario() -> None:
        path = f"/api/v1/jobs/{job}/stream"
        first, second = AsgiCall(asgi, path, headers), AsgiCall(asgi, path, headers)
        tasks = [asyncio.create_task(c.run()) for c in (first, second)]
        await asyncio.wait_for(asyncio.gather(first.first_chunk.wait(), second.first_chunk.wait()), 30)
        assert first.status == second.status == 200 and slots.held(owner) == 2

        third = AsgiCall(asgi, path, headers)
        await asyncio.wait_for(third.run(), 30)
        assert third.status == 429 and third.response_headers["retry-after"] == "5"
        error = json.loads(third.body)["error"]
        assert error["code"] == "too_many_requests"
        assert error["details"] == {"limit": "2 open event streams", "retry_after_s": 5}

        first.gone.set()  # the client goes away: its slot is free at once
        await asyncio.wait_for(tasks[0], 30)
        assert slots.held(owner) == 1
        fourth = AsgiCall(asgi, path, headers)
        task = asyncio.create_task(fourth.run())
        await asyncio.wait_for(fourth.first_chunk.wait(), 30)
        assert fourth.status == 200
        for call in (second, fourth):
            call.gone.set()
        await asyncio.wait_for(asyncio.gather(tasks[1], task), 30)
        assert slots.held(owner) == 0

    asyncio.run(scenario())
    # a stream that ends by itself (the job is over) releases its slot too
    api.post(f"/api/v1/jobs/{job}/cancel")

    async def ended() -> None:
        call = AsgiCall(asgi, f"/api/v1/jobs/{job}/stream", headers)
        await asyncio.wait_for(call.run(), 30)
        assert call.status == 200 and b"event: end" in call.body

    asyncio.run(ended())
    assert slots.held(owner) == 0


def test_the_stream_owner_is_the_api_key(make_app, fake_redis) -> None:  # noqa: ANN001
    from app.api.jobs import STREAM_HANDOFF

    app = make_app()
    _tenant, key = create_tenant_key(app)
    job = ApiClient(app.test_client(), key).submit("sleep", {"seconds": 0})
    handoff: dict = {}
    resp = app.test_client().get(f"/api/v1/jobs/{job['id']}/stream", headers={"Authorization": f"Bearer {key}"},
                                 environ_base={STREAM_HANDOFF: handoff})
    assert resp.status_code == 200
    assert handoff["owner"] == f"key:{key_id(app, key)}" and handoff["job_id"] == job["id"]
