"""The job engine end to end: real PostgreSQL, real Redis, Celery worker subprocesses."""
from __future__ import annotations

import signal
import time

import pytest
import redis

from tests.conftest import ApiClient, wait_until

pytestmark = pytest.mark.integration


def state_transitions(api: ApiClient, job_id: int) -> list[str]:
    return [e["data"]["to"] for e in api.events(job_id) if e["type"] == "state"]


def test_submit_runs_on_a_worker_with_ordered_events(pg_api: ApiClient, processes) -> None:  # noqa: ANN001
    procs = processes()
    procs.worker()
    job = pg_api.submit("sleep", {"seconds": 0.6, "steps": 3})
    done = pg_api.wait(job["id"], timeout=60)
    assert done["state"] == "succeeded", procs.logs()
    assert done["attempts"] == 1 and done["progress"] == 1.0 and done["result"]["steps"] == 3
    events = pg_api.events(job["id"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [(e["type"], e["data"].get("to") or e["data"].get("progress")) for e in events] == [
        ("state", "queued"), ("state", "running"),
        ("progress", pytest.approx(1 / 3)), ("progress", pytest.approx(2 / 3)), ("progress", 1.0),
        ("state", "succeeded"),
    ]


def test_sigkilled_worker_job_is_reaped_and_finished_by_another(pg_api: ApiClient, processes) -> None:  # noqa: ANN001
    procs = processes()
    procs.beat()
    first = procs.worker()
    job = pg_api.submit("sleep", {"seconds": 4, "steps": 8})
    wait_until(lambda: pg_api.job(job["id"])["progress"] >= 0.25, 60, what="job to make progress")
    procs.kill(first, signal.SIGKILL)
    procs.worker()
    done = pg_api.wait(job["id"], timeout=90)
    assert done["state"] == "succeeded", procs.logs()
    assert done["attempts"] == 2 and done["result"]["attempt"] == 2
    transitions = state_transitions(pg_api, job["id"])
    assert transitions == ["queued", "running", "queued", "running", "succeeded"]
    lost = [e for e in pg_api.events(job["id"]) if e["type"] == "state" and e["data"].get("reason") == "worker lost"]
    assert len(lost) == 1


def test_redis_flushall_loses_nothing_and_runs_nothing_twice(pg_api: ApiClient, pg_settings, processes) -> None:  # noqa: ANN001
    ids = [pg_api.submit("sleep", {"seconds": 0.05, "steps": 1})["id"] for _ in range(20)]
    broker = redis.Redis.from_url(pg_settings.broker_url)
    assert broker.llen("cpu") >= 20
    broker.flushall()
    assert broker.llen("cpu") == 0
    procs = processes()
    procs.beat()
    procs.worker()
    for job_id in ids:
        done = pg_api.wait(job_id, timeout=120)
        assert done["state"] == "succeeded", procs.logs()
        assert done["attempts"] == 1
        assert state_transitions(pg_api, job_id) == ["queued", "running", "succeeded"]


def test_cancel_running_job_stops_within_seconds(pg_api: ApiClient, processes) -> None:  # noqa: ANN001
    procs = processes()
    procs.worker()
    job = pg_api.submit("sleep", {"seconds": 60, "steps": 60})
    wait_until(lambda: pg_api.job(job["id"])["state"] == "running", 60, what="job to start")
    asked = time.monotonic()
    r = pg_api.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 202 and r.get_json()["cancel_requested"] is True
    done = pg_api.wait(job["id"], timeout=10)
    assert done["state"] == "cancelled" and time.monotonic() - asked < 5
    # the worker is free again
    nxt = pg_api.submit("sleep", {"seconds": 0})
    assert pg_api.wait(nxt["id"], timeout=30)["state"] == "succeeded"


def test_failing_job_records_error(pg_api: ApiClient, processes) -> None:  # noqa: ANN001
    processes().worker()
    job = pg_api.submit("sleep", {"seconds": 0, "steps": 1, "fail": True})
    done = pg_api.wait(job["id"], timeout=60)
    assert done["state"] == "failed" and "sleep job asked to fail" in done["error"]


def test_submit_with_broker_down_is_durable(pg_app, pg_settings, processes) -> None:  # noqa: ANN001
    from app import create_app
    from medmaas.standalone import free_port
    from tests.conftest import create_tenant_key

    down = create_app(pg_settings.replace(broker_url=f"redis://127.0.0.1:{free_port()}/0"))
    api = ApiClient(down.test_client(), create_tenant_key(down)[1])
    started = time.monotonic()
    r = api.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}})
    assert r.status_code == 202 and time.monotonic() - started < 10
    job_id = r.get_json()["id"]
    assert api.job(job_id)["state"] == "queued"
    procs = processes()
    procs.beat()
    procs.worker()
    assert api.wait(job_id, timeout=60)["state"] == "succeeded", procs.logs()
    down.extensions["medmaas.db"].dispose()
