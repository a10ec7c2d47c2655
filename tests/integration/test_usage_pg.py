"""Usage metering on PostgreSQL with a real Celery worker process: a sleep job records its CPU
seconds, a predict call one call with its inputs for the model version, a score job its rows;
concurrent increments from many connections lose nothing; migration 0008 matches the model."""

from __future__ import annotations

import gzip
import itertools
import os
import threading

import pytest

from app import auth
from app.db import Database
from app.models import Job, UsageMetric
from app.sample_data import moses_library
from app.stores import usage as usage_store
from app.stores.usage import Quantity
from tests.conftest import ApiClient, seed_tiny_model_and_library, wait_until
from tests.conftest import usage_quantities as totals

pytestmark = pytest.mark.integration

LIBRARY_ROWS = 400


def test_migration_0008_matches_the_usage_model(pg_settings) -> None:  # noqa: ANN001
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from app.db import Base

    db = Database(pg_settings.sqlalchemy_url)
    try:
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        db.dispose()
    assert [d for d in diff if "usage" in repr(d)] == []


def test_concurrent_increments_from_many_connections_are_not_lost(pg_app) -> None:  # noqa: ANN001
    db = pg_app.extensions["medmaas.db"]
    with db.session() as s:
        tenant = auth.create_tenant(s, "usage-race").id
    n_threads, per_thread = 8, 40
    start = threading.Barrier(n_threads)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            start.wait()
            for k in range(per_thread):
                with db.session() as s:  # each a transaction touching the same rows, in varying order
                    qs = [
                        Quantity(UsageMetric.predict_calls, 1, "sol", 1),
                        Quantity(UsageMetric.rows_scored, 10, "sol", 1),
                        Quantity(UsageMetric.cpu_seconds, 0.5),
                    ]
                    usage_store.add(s, tenant, qs[::-1] if (i + k) % 2 else qs)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = totals(db, tenant)
    n = n_threads * per_thread
    assert got == {("predict_calls", "sol", 1): n, ("rows_scored", "sol", 1): 10 * n, ("cpu_seconds", "", 0): 0.5 * n}


@pytest.fixture()
def lab(pg_app, pg_settings):  # noqa: ANN001, ANN201
    """(api client, tenant id, library dataset id): model "tiny" v1 (an untrained RNN) and a
    library of LIBRARY_ROWS MOSES molecules, registered for a fresh tenant."""
    db = pg_app.extensions["medmaas.db"]
    with db.session() as s:
        tenant = auth.create_tenant(s, "usage-lab")
        tenant_id, key = tenant.id, auth.create_key(s, tenant)
    with gzip.open(moses_library(), "rt") as fh:
        next(fh)
        smiles = [line.strip() for line in itertools.islice(fh, LIBRARY_ROWS)]
    ds_id = seed_tiny_model_and_library(db, pg_settings.artifacts, tenant_id, smiles)
    return ApiClient(pg_app.test_client(), key), tenant_id, ds_id


def test_a_worker_meters_sleep_predict_and_score_jobs(pg_app, lab, processes) -> None:  # noqa: ANN001
    api, tenant, library_id = lab
    db = pg_app.extensions["medmaas.db"]
    procs = processes()
    procs.worker("cpu,inference")

    sleep = api.submit("sleep", {"seconds": 1.0, "steps": 4})
    assert api.wait(sleep["id"], timeout=120)["state"] == "succeeded", procs.logs()
    got = totals(db, tenant)
    with db.session() as s:
        wall = s.get(Job, sleep["id"]).duration_s
    # sleeping uses little CPU, but some (heartbeats, progress writes); never more than wall x cores
    assert 0 < got[("cpu_seconds", "", 0)] <= wall * (os.cpu_count() or 1)
    assert ("gpu_seconds", "", 0) not in got  # a CPU worker

    r = api.post(
        "/api/v1/models/tiny/predict",
        json={"inputs": ["CCO", "c1ccccc1", "not-a-molecule"], "version": 1, "timeout": 90},
    )
    assert r.status_code == 200, (r.get_json(), procs.logs())
    # an online call's usage is written by the inference worker in batches, just after the answer
    got = wait_until(lambda: (t := totals(db, tenant)).get(("predict_calls", "tiny", 1)) == 1 and t, 10,
                     what="the inference worker's batched usage row")
    assert got[("predict_calls", "tiny", 1)] == 1 and got[("predict_inputs", "tiny", 1)] == 3
    predict_cpu = got[("cpu_seconds", "tiny", 1)]
    assert predict_cpu > 0

    score = api.submit("score", {"model": "tiny@1", "library_id": library_id})
    assert api.wait(score["id"], timeout=180)["state"] == "succeeded", procs.logs()
    got = totals(db, tenant)
    assert got[("rows_scored", "tiny", 1)] == LIBRARY_ROWS
    assert got[("cpu_seconds", "tiny", 1)] > predict_cpu  # the score job's CPU, with its RDKit children

    body = api.get("/api/v1/usage?group_by=model").get_json()
    tiny = {r["metric"]: r["quantity"] for r in body["rows"] if r["model"] == "tiny" and r["version"] == 1}
    assert tiny["predict_calls"] == 1 and tiny["predict_inputs"] == 3 and tiny["rows_scored"] == LIBRARY_ROWS
    assert tiny["bytes_stored"] > 0  # the bundle, measured for today
    assert body["totals"]["bytes_stored"] >= tiny["bytes_stored"] + LIBRARY_ROWS  # + the library and score file
