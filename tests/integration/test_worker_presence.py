"""Worker presence with real Redis and a real worker subprocess: device cuda is accepted
only while a worker serves the gpu queue; a job that fails on the worker reports one
sentence, and its traceback stays with the operator."""
from __future__ import annotations

import signal

import pytest
import redis

from app import workers_registry
from app.artifacts import job_dir
from app.models import Job
from app.sample_data import solubility_csv
from tests.conftest import ApiClient, wait_until
from tests.integration.test_training_e2e import upload_file

pytestmark = pytest.mark.integration


def test_cuda_needs_a_live_gpu_worker(pg_api: ApiClient, pg_app, pg_settings, processes, tmp_path) -> None:  # noqa: ANN001
    ds = upload_file(pg_api, "sequences", solubility_csv(tmp_path / "solubility.csv"), label_columns="solubility")
    spec = {"model_name": "gpu-check", "dataset_id": ds["id"], "arch": "rnn", "task": "regression",
            "target": "solubility", "epochs": 1, "device": "cuda"}
    client = redis.Redis.from_url(pg_settings.broker_url)
    # Workers that earlier tests in this session SIGKILLed stay announced until their keys
    # expire (TTL_S): start from no GPU worker at all.
    for key in client.scan_iter(match=f"{workers_registry.PREFIX}*"):
        client.delete(key)

    r = pg_api.post("/api/v1/jobs", json={"kind": "train", "spec": spec})
    assert r.status_code == 422, r.get_json()
    assert "no GPU worker is connected" in r.get_json()["error"]["details"]["spec"]["device"][0]

    procs = processes()
    worker = procs.worker("gpu")
    wait_until(lambda: "gpu" in workers_registry.live_queues(client), 120, what="the gpu worker to announce itself")
    job = pg_api.submit("train", spec)
    assert job["queue"] == "gpu"
    done = pg_api.wait(job["id"], timeout=300)
    if done["state"] == "failed":  # a machine without CUDA: one sentence, no traceback
        error = done["error"]
        assert error.startswith("Training failed: ") and "\n" not in error and "Traceback" not in error, error
        assert "CUDA" in error, error
        events = pg_api.events(job["id"])
        assert not any("Traceback" in str(e["data"]) for e in events)
        with pg_app.extensions["medmaas.db"].session() as s:
            tenant_id = s.get(Job, job["id"]).tenant_id
        operator_log = job_dir(pg_settings, tenant_id, job["id"]) / "worker-error.log"
        assert "Traceback (most recent call last)" in operator_log.read_text()
        assert "Traceback" in procs.logs()  # and in the worker's log
    else:
        assert done["state"] == "succeeded", (done, procs.logs())

    procs.kill(worker, signal.SIGTERM)  # a clean stop withdraws the keys at once
    assert "gpu" not in workers_registry.live_queues(client)
    r = pg_api.post("/api/v1/jobs", json={"kind": "train", "spec": spec})
    assert r.status_code == 422 and "device" in r.get_json()["error"]["details"]["spec"]

