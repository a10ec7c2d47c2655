"""Online predictions on PostgreSQL + Redis with a real inference worker (issue 13): answered
without a job, recorded (usage, audit, /metrics) off the request path; a worker SIGKILLed
mid-batch costs its caller only a retry through the job path, within the caller's timeout."""

from __future__ import annotations

import threading
import time
from datetime import UTC
from typing import Any

import pytest
import redis
from sqlalchemy import select

from app import inference as online
from app.models import AuditEvent, Job
from tests.conftest import (
    ApiClient,
    close_app,
    create_tenant_key,
    seed_tiny_model_and_library,
    usage_quantities,
    wait_until,
)

SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "CCCl", "OCC(O)CO", "CC(C)O", "C1CCCCC1", "CCOC(=O)C", "c1ccncc1"]


@pytest.fixture
def stack(pg_settings, processes):
    """An app and an inference worker on the session's PostgreSQL and Redis, and a tenant
    with the tiny model."""
    from tests.conftest import _make_app

    settings = pg_settings
    app = _make_app(settings)
    tenant_id, key = create_tenant_key(app)
    seed_tiny_model_and_library(app.extensions["medmaas.db"], settings.artifacts, tenant_id, SMILES * 5)
    procs = processes(settings)
    client = redis.Redis.from_url(settings.broker_url)
    try:
        yield {
            "app": app,
            "api": ApiClient(app.test_client(), key),
            "tenant_id": tenant_id,
            "procs": procs,
            "redis": client,
            "settings": settings,
        }
    finally:
        client.close()
        close_app(app)


def start_inference_worker(stack: dict[str, Any]) -> Any:
    before = set(stack["redis"].scan_iter(match=online.consumer_live_key("*")))
    proc = stack["procs"].worker("inference")
    wait_until(
        lambda: set(stack["redis"].scan_iter(match=online.consumer_live_key("*"))) - before,
        90,
        what="the inference consumer to announce itself",
    )
    return proc


def held_calls(client: redis.Redis) -> list[str]:
    out = []
    for key in client.scan_iter(match=online.state_key("*")):
        value = client.get(key)
        if value is not None and value.decode().startswith(online.HELD):
            out.append(value.decode())
    return out


def test_online_predict_is_answered_without_a_job_and_recorded_off_the_request_path(stack) -> None:
    api, tenant_id = stack["api"], stack["tenant_id"]
    start_inference_worker(stack)
    r = api.post("/api/v1/models/tiny/predict", json={"inputs": ["CCO", "not a smiles(", "c1ccccc1"]})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert "job_id" not in body
    assert [("value" in p, "error" in p) for p in body["predictions"]] == [(True, False), (False, True), (True, False)]
    assert api.post("/api/v1/models/absent/predict", json={"inputs": ["CCO"]}).status_code == 404
    database = stack["app"].extensions["medmaas.db"]
    with database.session() as s:
        assert s.scalars(select(Job).where(Job.tenant_id == tenant_id)).all() == []
    wait_until(
        lambda: usage_quantities(database, tenant_id).get(("predict_inputs", "tiny", 1)) == 3,
        10,
        what="the worker's batched usage row",
    )
    assert usage_quantities(database, tenant_id)[("predict_calls", "tiny", 1)] == 1
    with database.session() as s:
        rows = s.scalars(
            select(AuditEvent).where(AuditEvent.tenant_id == tenant_id, AuditEvent.action == "model.predict")
        ).all()
    assert sorted((r.status, r.object_id) for r in rows) == [(200, "tiny@1"), (404, "absent")]
    metrics = stack["app"].test_client().get("/metrics", environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert 'medmaas_predict_latency_seconds_count{model="tiny@1"}' in metrics.get_data(as_text=True)


def test_over_the_online_limits_the_call_becomes_a_job(stack) -> None:
    api = stack["api"]
    start_inference_worker(stack)
    many = [SMILES[i % len(SMILES)] for i in range(stack["settings"].inference_max_inputs + 1)]
    r = api.post("/api/v1/models/tiny/predict", json={"inputs": many, "timeout": 30})
    assert r.status_code in (200, 202), r.get_json()
    body = r.get_json()
    job_id = body.get("job_id") or body.get("id")
    assert job_id
    assert api.wait(job_id)["state"] == "succeeded"


def test_a_worker_killed_mid_batch_leaves_its_caller_a_job_within_the_timeout(stack) -> None:
    api, tenant_id, procs = stack["api"], stack["tenant_id"], stack["procs"]
    worker = start_inference_worker(stack)
    api.post("/api/v1/models/tiny/predict", json={"inputs": ["CCO"]})  # loaded and warm
    database = stack["app"].extensions["medmaas.db"]
    wait_until(
        lambda: usage_quantities(database, tenant_id).get(("predict_inputs", "tiny", 1)) == 1,
        10,
        what="the warm-up call's usage",
    )  # flushed before the kill: records pending then are lost
    slow = [SMILES[i % len(SMILES)] for i in range(300)]  # 300 x 33 random-SMILES views: seconds
    timeout = 25.0
    answer: dict[str, Any] = {}

    def call() -> None:
        t0 = time.monotonic()
        r = api.post("/api/v1/models/tiny/predict", json={"inputs": slow, "tta": 32, "timeout": timeout})
        answer.update(status=r.status_code, body=r.get_json(), seconds=time.monotonic() - t0)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: held_calls(stack["redis"]), 20, 0.02, what="the worker to take the call")
    procs.kill(worker)  # SIGKILL mid-batch
    killed_at = time.time()
    procs.worker("inference")  # the job the caller falls back to needs a worker
    caller.join(timeout + 10)
    assert answer, "the caller got no answer"
    assert answer["seconds"] < timeout + 3, answer["seconds"]
    job_id = answer["body"].get("job_id") if answer["status"] == 200 else answer["body"].get("id")
    assert answer["status"] in (200, 202), answer
    assert job_id, answer
    with database.session() as s:
        created = s.get(Job, job_id).created_at
    fallback_s = created.replace(tzinfo=created.tzinfo or UTC).timestamp() - killed_at
    assert fallback_s < online.CONSUMER_TTL_S + 2.0, fallback_s  # noticed by the consumer's expired key
    assert api.wait(job_id, timeout=120)["state"] == "succeeded"
    # the killed batch recorded nothing: its 300 inputs are counted once, by the job
    wait_until(
        lambda: usage_quantities(database, tenant_id).get(("predict_inputs", "tiny", 1)) == 301,
        10,
        what="usage of the warm-up call and the job",
    )
    time.sleep(0.5)
    assert usage_quantities(database, tenant_id)[("predict_inputs", "tiny", 1)] == 301
