"""Jobs API behaviour without a worker: auth, tenants, validation, idempotency, cancel."""
from __future__ import annotations

from sqlalchemy import func, select

from app.models import Job
from tests.conftest import ApiClient, create_tenant_key


def job_count(app) -> int:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        return s.scalar(select(func.count()).select_from(Job))


def assert_error(resp, status: int, code: str | None = None) -> dict:  # noqa: ANN001
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"]), body
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def test_submit_returns_202_with_queued_job_and_first_event(api: ApiClient) -> None:
    r = api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0.1}})
    assert r.status_code == 202
    job = r.get_json()
    assert job["state"] == "queued" and job["kind"] == "sleep" and job["queue"] == "cpu"
    assert job["spec"]["seconds"] == 0.1 and job["spec"]["steps"] == 10  # defaults filled in
    events = api.events(job["id"])
    assert [(e["seq"], e["type"], e["data"]["to"]) for e in events] == [(1, "state", "queued")]


def test_missing_or_bad_key_is_401(client, app) -> None:  # noqa: ANN001
    assert_error(client.get("/api/v1/jobs"), 401, "unauthorized")
    assert_error(client.get("/api/v1/jobs", headers={"Authorization": "Bearer nope"}), 401)
    assert_error(client.get("/api/v1/jobs", headers={"Authorization": "Bearer mm_0123456789ab_wrong"}), 401)
    _tid, key = create_tenant_key(app)
    assert_error(client.get("/api/v1/jobs", headers={"Authorization": f"Basic {key}"}), 401)
    assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_keys_are_stored_hashed(app) -> None:  # noqa: ANN001
    from app.models import ApiKey

    _tid, key = create_tenant_key(app)
    with app.extensions["medmaas.db"].session() as s:
        stored = s.scalars(select(ApiKey)).all()
    assert len(key) > 40 and all(key not in (k.key_hash, k.prefix) for k in stored)


def test_tenants_never_see_each_other(client, app) -> None:  # noqa: ANN001
    a = ApiClient(client, create_tenant_key(app)[1])
    b = ApiClient(client, create_tenant_key(app)[1])
    job = a.submit("sleep", {"seconds": 0})
    for path in ("", "/events", "/stream", "/result"):
        assert_error(b.get(f"/api/v1/jobs/{job['id']}{path}"), 404, "not_found")
    assert_error(b.post(f"/api/v1/jobs/{job['id']}/cancel"), 404)
    assert b.get("/api/v1/jobs").get_json()["items"] == []
    assert [j["id"] for j in a.get("/api/v1/jobs").get_json()["items"]] == [job["id"]]
    assert a.job(job["id"])["state"] == "queued"  # B's cancel attempt changed nothing


def test_bad_input_gets_clear_4xx_and_writes_nothing(api: ApiClient, app) -> None:  # noqa: ANN001
    before = job_count(app)
    err = assert_error(api.post("/api/v1/jobs", data="{not json", content_type="application/json"), 400)
    assert "JSON" in err["message"]
    assert_error(api.post("/api/v1/jobs", json={"kind": "nope", "spec": {}}), 422, "unknown_kind")
    err = assert_error(api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": "ten"}}), 422, "invalid_spec")
    assert "seconds" in err["details"]["spec"]
    assert_error(api.post("/api/v1/jobs", json={"kind": 5, "spec": []}), 422)
    assert_error(api.post("/api/v1/jobs", json={"spec": {}}), 422)
    assert_error(api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": -1}}), 422)
    assert_error(api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"queue": "nowhere"}}), 422)
    assert_error(api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"bogus": 1}}), 422)
    big = {"kind": "sleep", "spec": {"seconds": 0}, "pad": "x" * (2 * 1024 * 1024)}
    assert_error(api.post("/api/v1/jobs", json=big), 413, "payload_too_large")
    assert_error(api.get("/api/v1/jobs?state=bogus"), 422)
    assert_error(api.get("/api/v1/jobs?limit=0"), 422)
    assert_error(api.get("/api/v1/jobs/999999"), 404)
    assert job_count(app) == before


def test_idempotency_key_returns_the_same_job(api: ApiClient, app) -> None:  # noqa: ANN001
    headers = {"Idempotency-Key": "run-42"}
    first = api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}}, headers=headers)
    second = api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}}, headers=headers)
    assert first.status_code == 202 and second.status_code == 200
    assert first.get_json()["id"] == second.get_json()["id"]
    other_tenant = ApiClient(api.client, create_tenant_key(app)[1])
    third = other_tenant.post("/api/v1/jobs", json={"kind": "sleep", "spec": {}}, headers=headers)
    assert third.status_code == 202 and third.get_json()["id"] != first.get_json()["id"]


def test_cancel_queued_job_is_immediate_and_final(api: ApiClient) -> None:
    job = api.submit("sleep", {"seconds": 5})
    r = api.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.get_json()["state"] == "cancelled"
    assert_error(api.post(f"/api/v1/jobs/{job['id']}/cancel"), 409, "conflict")
    assert [e["data"]["to"] for e in api.events(job["id"]) if e["type"] == "state"] == ["queued", "cancelled"]


def test_list_filters_and_cursor_paging(api: ApiClient) -> None:
    ids = [api.submit("sleep", {"seconds": 0})["id"] for _ in range(5)]
    api.post(f"/api/v1/jobs/{ids[0]}/cancel")
    page1 = api.get("/api/v1/jobs?limit=2").get_json()
    page2 = api.get(f"/api/v1/jobs?limit=2&cursor={page1['next_cursor']}").get_json()
    page3 = api.get(f"/api/v1/jobs?limit=2&cursor={page2['next_cursor']}").get_json()
    seen = [j["id"] for p in (page1, page2, page3) for j in p["items"]]
    assert seen == sorted(ids, reverse=True) and page3["next_cursor"] is None
    cancelled = api.get("/api/v1/jobs?state=cancelled").get_json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    assert len(api.get("/api/v1/jobs?kind=sleep&state=queued").get_json()["items"]) == 4


def test_events_after_and_sse_stream(api: ApiClient, app) -> None:  # noqa: ANN001
    from app import jobs

    job = api.submit("sleep", {"seconds": 0})
    db = app.extensions["medmaas.db"]
    with db.session() as s:
        attempt = jobs.claim(s, job["id"], "test-worker")
        jobs.report_progress(s, job["id"], attempt, 0.5, "half")
        jobs.succeed(s, job["id"], attempt, {"ok": True})
    events = api.events(job["id"], after=1)
    assert [e["seq"] for e in events] == [2, 3, 4]
    r = api.get(f"/api/v1/jobs/{job['id']}/stream?after=2")
    assert r.mimetype == "text/event-stream"
    body = r.get_data(as_text=True)
    assert "id: 3\nevent: progress" in body and "id: 4\nevent: state" in body and "event: end" in body
    assert "id: 2\n" not in body
    assert api.get(f"/api/v1/jobs/{job['id']}/result").get_json() == {"ok": True}


def test_openapi_is_generated_from_the_schemas(client) -> None:  # noqa: ANN001
    spec = client.get("/api/v1/openapi.json").get_json()
    assert "/api/v1/jobs" in spec["paths"] and "post" in spec["paths"]["/api/v1/jobs"]
    assert "JobSubmit" in spec["components"]["schemas"]


def test_health_ready_and_metrics(client, api: ApiClient) -> None:  # noqa: ANN001
    api.submit("sleep", {"seconds": 0})
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"] == {"database": "ok", "broker": "ok"}
    text = client.get("/metrics").get_data(as_text=True)
    assert 'medmaas_jobs{state="queued"}' in text and "medmaas_queue_depth" in text
    assert "medmaas_job_duration_seconds_bucket" in text


def test_submit_publishes_the_job_id_to_its_queue_once(api: ApiClient, fake_redis) -> None:  # noqa: ANN001
    from app.broker import RUN_JOB
    from app.dispatch import job_id_from_task_id

    headers = {"Idempotency-Key": "once"}
    job = api.submit("sleep", {"seconds": 0}, headers=headers)
    api.submit("sleep", {"seconds": 0}, headers=headers)  # the same job: not published again
    messages = fake_redis.messages("cpu")
    assert [(m["task"], m["args"], job_id_from_task_id(m["id"])) for m in messages] == [
        (RUN_JOB, [job["id"]], job["id"])]
    assert messages[0]["envelope"]["properties"]["delivery_info"]["routing_key"] == "cpu"
    assert fake_redis.messages("gpu") == []


def test_submit_with_the_broker_down_is_durable_and_republished(api: ApiClient, app, fake_redis) -> None:  # noqa: ANN001
    import time
    from datetime import timedelta

    from sqlalchemy import update

    from app import dispatch
    from app.models import utcnow

    fake_redis.down()
    started = time.monotonic()
    job = api.submit("sleep", {"seconds": 0})  # 202: the row is committed before publishing
    assert time.monotonic() - started < 5
    assert api.job(job["id"])["state"] == "queued"
    fake_redis.up()
    assert fake_redis.messages("cpu") == []
    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    celery = app.extensions["medmaas.celery"]
    assert dispatch.republish(celery, db, settings) == 0  # still inside its grace period
    with db.session() as s:  # the grace period passes (no sleeping: backdate the stamp)
        s.execute(update(Job).where(Job.id == job["id"]).values(published_at=utcnow() - timedelta(hours=1)))
    assert dispatch.republish(celery, db, settings) == 1
    assert [m["args"] for m in fake_redis.messages("cpu")] == [[job["id"]]]
    assert dispatch.republish(celery, db, settings) == 0  # the broker holds it now


def test_job_detail_answers_exactly_what_job_schema_dumps(api: ApiClient, app) -> None:  # noqa: ANN001
    """GET /jobs/{id} serialises a Core row itself (app.api.jobs.job_json); every field, null or
    set, must read as JobSchema().dump of the ORM job would."""
    from datetime import timedelta

    from sqlalchemy import update

    from app.api.jobs import JobSchema
    from app.models import JobState, utcnow

    plain = api.submit("sleep", {"seconds": 0})
    full = api.submit("sleep", {"seconds": 0.5, "steps": 2})
    t0 = utcnow()
    with app.extensions["medmaas.db"].session() as s:
        s.execute(update(Job).where(Job.id == full["id"]).values(
            state=JobState.succeeded, attempts=2, progress=1, message="succeeded", error=None,
            result={"slept_s": 0.5, "nested": {"a": [1, 2.5, None]}}, started_at=t0,
            finished_at=t0 + timedelta(seconds=1, microseconds=7), heartbeat_at=t0, worker="host:1",
            cancel_requested=True, idempotency_key="k-1", duration_s=1.000007, tags=["a", "b"], cloned_from=plain["id"]))
    with app.extensions["medmaas.db"].session() as s:
        for job_id in (plain["id"], full["id"]):
            expected = JobSchema().dump(s.get(Job, job_id))
            r = api.get(f"/api/v1/jobs/{job_id}")
            assert r.status_code == 200 and r.mimetype == "application/json"
            assert r.get_json() == expected
