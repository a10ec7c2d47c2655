"""The online predict route behind the ASGI front (`medmaas web`, app/asgi.py OnlinePredict):
a waiting call holds no web thread, so the calls in flight (and the inference worker's
batches) are not capped by --threads; a call no worker answers runs as a job; the answer
and its audit row are the same as through Flask alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import redis
import requests
from sqlalchemy import select

from app import inference as online
from app.models import AuditEvent, Job
from tests.conftest import ROOT, to_env, wait_until
from tests.integration.test_inference_pg import stack, start_inference_worker  # noqa: F401  (fixture)

THREADS = 2
CALLS = 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_web(settings: Any, tmp_path: Any, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = open(tmp_path / f"web-{port}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "medmaas.cli", "web", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--threads", str(THREADS)],
        env={**os.environ, **to_env(settings), **env}, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(url + "/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return proc.poll() is not None

    wait_until(up, 90, what="medmaas web to listen")
    assert proc.poll() is None, (tmp_path / f"web-{port}.log").read_text()
    return proc, url


def test_calls_in_flight_are_not_capped_by_the_web_threads_and_an_unanswered_call_becomes_a_job(
    stack, tmp_path  # noqa: F811
) -> None:
    settings, tenant_id = stack["settings"], stack["tenant_id"]
    worker = start_inference_worker(stack)
    key = stack["api"].key
    web, url = start_web(settings, tmp_path, MEDMAAS_INFERENCE_WAIT_S="8")
    headers = {"Authorization": f"Bearer {key}"}
    try:
        warm = requests.post(f"{url}/api/v1/models/tiny/predict", json={"inputs": ["CCO"]}, headers=headers, timeout=30)
        assert warm.status_code == 200 and "job_id" not in warm.json(), warm.text

        # The worker stopped: every call waits in Redis; with a thread held per call only
        # THREADS of them could be pushed.
        worker.send_signal(signal.SIGSTOP)
        answers: list[requests.Response] = []

        def call(i: int) -> None:
            body = {"inputs": [["CCO", "c1ccccc1", "CC(=O)O", "CCN"][i % 4]], "timeout": 30}
            answers.append(requests.post(f"{url}/api/v1/models/tiny/predict", json=body, headers=headers, timeout=60))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(CALLS)]
        for t in threads:
            t.start()
        r = stack["redis"]
        # (the stopped worker's pending pop still takes one message off the list)
        wait_until(lambda: r.llen(online.requests_key(settings.inference_queue)) >= CALLS - 1, 5,
                   what=f"all {CALLS} calls pushed with {THREADS} web threads: {r.llen(online.requests_key(settings.inference_queue))}")
        worker.send_signal(signal.SIGCONT)
        for t in threads:
            t.join(60)
        assert len(answers) == CALLS
        assert all(a.status_code == 200 and "job_id" not in a.json() for a in answers), [a.text for a in answers]
        assert all(a.headers.get("X-Request-ID") for a in answers)  # Flask's headers kept

        # An invalid call is Flask's own 422, pushed nowhere.
        bad = requests.post(f"{url}/api/v1/models/tiny/predict", json={"inputs": []}, headers=headers, timeout=30)
        assert bad.status_code == 422 and "inputs" in bad.text

        # Every call's audit row: the refusal's from Flask, the answered calls' from the worker,
        # batched after it answered (a worker killed before its next flush would lose them).
        database = stack["app"].extensions["medmaas.db"]
        wait_until(lambda: _predict_rows(database, tenant_id) >= CALLS + 2, 15, what="every call's audit row")

        # No worker answers: the call runs as a job within the caller's timeout (the job path's
        # worker is the cpu queue's: none here, so it answers 202 with the job).
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        wait_until(lambda: not r.exists(online.queue_live_key(settings.inference_queue)), 10,
                   what="the dead consumer's liveness key to expire")
        slow = requests.post(f"{url}/api/v1/models/tiny/predict", json={"inputs": ["CCO"], "timeout": 1},
                             headers=headers, timeout=60)
        assert slow.status_code == 202, slow.text
        with database.session() as s:
            jobs = s.scalars(select(Job).where(Job.tenant_id == tenant_id)).all()
            assert [j.id for j in jobs] == [slow.json()["id"]]
        assert _predict_rows(database, tenant_id) == CALLS + 3  # warm-up, the calls, the refusal, the job
    finally:
        web.send_signal(signal.SIGTERM)
        web.wait(30)


def _predict_rows(database: Any, tenant_id: int) -> int:
    with database.session() as s:
        return len(s.scalars(select(AuditEvent).where(
            AuditEvent.tenant_id == tenant_id, AuditEvent.action == "model.predict")).all())
