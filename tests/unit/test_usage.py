"""Usage metering (issue 11, item 6): counters add up atomically, bytes stored is a measured
gauge, jobs record CPU / GPU seconds when they end, predict jobs their calls and inputs, score
shards their rows; GET /api/v1/usage (JSON and CSV), the usage page and `medmaas usage` show
a tenant only its own usage."""

from __future__ import annotations

import csv
import gzip
import io
import os
import subprocess
import sys
import threading
import time
from datetime import date, timedelta

import psutil
import pytest
from click.testing import CliRunner
from sqlalchemy import delete, select

from app import auth, jobs
from app.artifacts import ArtifactStore, job_dir
from app.config import from_env
from app.db import Database
from app.kinds import SubmitContext, get_kind
from app.models import Dataset, Job, JobEvent, KeyRole, ModelVersion, Usage, UsageMetric
from app.sample_data import moses_library
from app.stores import usage as usage_store
from app.stores.usage import Quantity
from tests.conftest import (
    ApiClient,
    create_tenant_key,
    seed_tiny_model_and_library,
    sign_in,
    usage_quantities as quantities,
    use_template,
)
from workers import metering
from workers.scoring import canon, runner, shards
from workers.tasks import execute_job

M = UsageMetric
DAY1, DAY2, DAY3 = date(2026, 11, 1), date(2026, 11, 2), date(2026, 11, 3)


@pytest.fixture()
def db(app) -> Database:  # noqa: ANN001
    return app.extensions["medmaas.db"]


# -- recording -----------------------------------------------------------------------------------


def test_counters_add_up_per_day_metric_and_model_version(app, db) -> None:  # noqa: ANN001
    tid, _ = create_tenant_key(app)
    with db.session() as s:
        usage_store.add(
            s,
            tid,
            [
                Quantity(M.predict_calls, 1, "sol", 2),
                Quantity(M.predict_inputs, 3, "sol", 2),
                Quantity(M.predict_calls, 1, "sol", 2),
            ],
            day=DAY1,
        )  # duplicates in one call
        usage_store.add(
            s,
            tid,
            [Quantity(M.predict_calls, 1, "sol", 2), Quantity(M.cpu_seconds, 0.25), Quantity(M.gpu_seconds, 0.0)],
            day=DAY1,
        )  # zero: no row
        usage_store.add(s, tid, [Quantity(M.predict_calls, 5, "sol", 3)], day=DAY2)
    with db.session() as s:
        rows = {(r.day, r.metric.value, r.model, r.version): r.quantity for r in s.scalars(select(Usage))}
    assert rows == {
        (DAY1, "predict_calls", "sol", 2): 3.0,
        (DAY1, "predict_inputs", "sol", 2): 3.0,
        (DAY1, "cpu_seconds", "", 0): 0.25,
        (DAY2, "predict_calls", "sol", 3): 5.0,
    }
    with db.session() as s, pytest.raises(ValueError, match="gauges"):
        usage_store.add(s, tid, [Quantity(M.bytes_stored, 10)])


def test_concurrent_increments_are_not_lost(app, db) -> None:  # noqa: ANN001
    tid, _ = create_tenant_key(app)
    threads_n, per_thread = 6, 20

    def work() -> None:
        for _ in range(per_thread):
            with db.session() as s:
                usage_store.add(
                    s, tid, [Quantity(M.predict_calls, 1, "sol", 1), Quantity(M.predict_inputs, 2, "sol", 1)]
                )

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = quantities(db, tid)
    assert got[("predict_calls", "sol", 1)] == threads_n * per_thread
    assert got[("predict_inputs", "sol", 1)] == 2 * threads_n * per_thread


def test_meter_counts_this_process_and_its_child_processes(moses_rows) -> None:  # noqa: ANN001
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    with metering.metered() as meter:
        t0 = time.process_time()
        while time.process_time() - t0 < 0.3:  # this process
            pass
        subprocess.run([sys.executable, "-c", burn], check=True)  # a child that ended
        reading = meter.stop()
    assert reading.cpu_s >= 0.3 + 0.3 - 0.02, reading
    assert reading.gpu_s == 0.0 and reading.wall_s >= 0.3

    # the scoring pool's RDKit children, still running when the unit ends
    pool = canon.get_pool(2)
    canon.canonicalise(moses_rows[:10], pool=pool)  # children started (their start-up is not measured below)

    def children_cpu() -> float:
        return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pool.pids())

    with metering.metered() as meter:
        own, kids = time.process_time(), children_cpu()
        canon.canonicalise(moses_rows * 4, pool=pool)
        own, kids = time.process_time() - own, children_cpu() - kids
        reading = meter.stop()
    assert kids > 0.1  # the work ran in the children
    assert reading.cpu_s >= own + kids - 0.02, (reading, own, kids)


def test_ledger_splits_cpu_between_units_running_at_once() -> None:
    ledger = metering.CpuLedger()
    a = ledger.start()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.2:
        pass
    b = ledger.start()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.2:
        pass
    share_a = ledger.stop(a)
    share_b = ledger.stop(b)
    assert share_a > share_b > 0.05  # a ran alone first, then both shared the second 0.2 s
    assert 0.35 <= share_a + share_b <= 0.6


def sleep_job(db: Database, tenant_id: int, seconds: float = 0.3, fail: bool = False) -> int:
    kind = get_kind("sleep")
    spec = kind.schema().load({"seconds": seconds, "steps": 2, **({"fail": True} if fail else {})})
    with db.session() as s:
        job, _ = jobs.submit(s, tenant_id=tenant_id, kind="sleep", spec=spec, queue="cpu")
        return job.id


def test_a_job_records_its_cpu_seconds_and_no_gpu_seconds_when_it_ends(app, db) -> None:  # noqa: ANN001
    settings = app.extensions["medmaas.settings"]
    tid, _ = create_tenant_key(app)
    ok, failed = sleep_job(db, tid), sleep_job(db, tid, fail=True)
    assert execute_job(db, settings, None, ok) == "succeeded"
    assert execute_job(db, settings, None, failed) == "failed"  # a failed job used the CPU too
    with db.session() as s:
        wall = sum(s.get(Job, j).duration_s for j in (ok, failed))
    got = quantities(db, tid)
    # a sleeping job uses little CPU, but some (its heartbeats, progress writes), never more
    # than its wall time on every core
    assert 0 < got[("cpu_seconds", "", 0)] <= wall * (os.cpu_count() or 1)
    assert ("gpu_seconds", "", 0) not in got
    assert execute_job(db, settings, None, ok) == "skipped"  # a duplicate delivery meters nothing
    assert quantities(db, tid) == got


def test_a_metering_failure_never_undoes_the_job_it_meters(app, db, monkeypatch) -> None:  # noqa: ANN001
    settings = app.extensions["medmaas.settings"]
    tid, _ = create_tenant_key(app)
    job_id = sleep_job(db, tid, seconds=0.0)

    def broken(*_args, **_kwargs) -> None:  # noqa: ANN002, ANN003
        raise RuntimeError("usage table unavailable")

    monkeypatch.setattr(usage_store, "upsert_rows", broken)  # SQLite: the usage's own statement
    monkeypatch.setattr(usage_store, "after_params", broken)  # PostgreSQL: part of the outcome's
    assert execute_job(db, settings, None, job_id) == "succeeded"
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.state.value == "succeeded" and job.progress == 1.0
        types = list(s.scalars(select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))
    assert types.count("progress") == 2 and types[-1] == "state"  # the last report kept, written once
    assert quantities(db, tid) == {}


# -- predict and score jobs (tiny untrained RNN, in process) ---------------------------------------


@pytest.fixture(scope="module")
def moses_rows() -> list[str]:
    with gzip.open(moses_library(), "rt") as fh:
        next(fh)
        return [next(fh).strip() for _ in range(300)]


@pytest.fixture()
def lab(tmp_path, moses_rows, sqlite_template):  # noqa: ANN001, ANN201
    """(settings, db, tenant id, library dataset id) with model "tiny" v1 (an untrained RNN)."""
    settings = from_env(
        {},
        home=tmp_path / "home",
        score_shard_rows=100,
        score_batch_size=64,
        heartbeat_interval_s=0.2,
        heartbeat_timeout_s=2.0,
    )
    use_template(settings, sqlite_template)
    database = Database(settings.sqlalchemy_url)
    with database.session() as s:
        tenant = auth.create_tenant(s, "lab").id
    ds_id = seed_tiny_model_and_library(database, settings.artifacts, tenant, moses_rows)
    yield settings, database, tenant, ds_id
    database.dispose()


def submit(lab, kind_name: str, spec: dict) -> int:  # noqa: ANN001
    settings, database, tenant, _ = lab
    kind = get_kind(kind_name)
    with database.session() as s:
        full = kind.check(kind.schema().load(spec), SubmitContext(s, tenant, settings))
        job, _ = jobs.submit(s, tenant_id=tenant, kind=kind_name, spec=full, queue="cpu")
        return job.id


def test_a_predict_job_meters_one_call_with_its_inputs_for_its_model_version(lab) -> None:  # noqa: ANN001
    settings, database, tenant, _ = lab
    job_id = submit(lab, "predict", {"model": "tiny@1", "inputs": ["CCO", "c1ccccc1", "not-a-molecule"]})
    assert execute_job(database, settings, None, job_id) == "succeeded"
    job_id = submit(lab, "predict", {"model": "tiny@1", "inputs": ["CCN"]})
    assert execute_job(database, settings, None, job_id) == "succeeded"
    got = quantities(database, tenant)
    assert got[("predict_calls", "tiny", 1)] == 2
    assert got[("predict_inputs", "tiny", 1)] == 4  # an invalid input was still an input
    assert got.get(("cpu_seconds", "tiny", 1), 0) > 0  # model loading and inference


def test_score_jobs_and_shard_tasks_meter_rows_scored_and_cpu_per_model_version(lab) -> None:  # noqa: ANN001
    settings, database, tenant, ds_id = lab
    job_id = submit(lab, "score", {"model": "tiny@1", "library_id": ds_id})
    assert execute_job(database, settings, None, job_id) == "succeeded"
    got = quantities(database, tenant)
    assert got[("rows_scored", "tiny", 1)] == 300
    parent_cpu = got[("cpu_seconds", "tiny", 1)]
    assert parent_cpu > 0

    # a shard scored by another worker's shard task (not the parent) meters its rows and CPU
    second = submit(lab, "score", {"model": "tiny@1", "library_id": ds_id})
    with database.session() as s:
        jobs.claim(s, second, "parent")
    score_env, _ = runner.load_env(database, settings, second, prepare=True)
    with database.session() as s:
        shards.create_shards(s, second, runner._blocks(score_env, 300))
    assert runner.run_shard_task(database, settings, None, second, 1, "other") == "done"
    assert runner.run_shard_task(database, settings, None, second, 1, "other") == "skipped"  # duplicate delivery
    got = quantities(database, tenant)
    assert got[("rows_scored", "tiny", 1)] == 400
    assert got[("cpu_seconds", "tiny", 1)] > parent_cpu


# -- bytes stored ---------------------------------------------------------------------------------


def test_storage_counts_datasets_model_bundles_and_results_but_not_scratch(lab) -> None:  # noqa: ANN001
    settings, database, tenant, ds_id = lab
    job_id = sleep_job(database, tenant)
    results = job_dir(settings, tenant, job_id)
    (results / "scratch").mkdir(parents=True)
    (results / "scores.csv").write_bytes(b"x" * 1000)
    (results / "scratch" / "part.parquet").write_bytes(b"x" * 5000)  # transient: not stored
    orphan = job_dir(settings, tenant, 999_999)  # a directory no job of the tenant owns
    orphan.mkdir(parents=True)
    (orphan / "f").write_bytes(b"x" * 7000)
    with database.session() as s:
        lib_bytes = s.get(Dataset, ds_id).bytes
        bundle = ArtifactStore(settings.artifacts).path(s.scalars(select(ModelVersion.artifact_uri)).one())
    bundle_bytes = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    with database.session() as s:
        total = usage_store.snapshot_storage(s, settings, tenant, day=DAY1)
    assert total == lib_bytes + bundle_bytes + 1000
    with database.session() as s:
        rows = {(r.model, r.version): r.quantity for r in s.scalars(select(Usage).where(Usage.day == DAY1))}
    assert rows == {("", 0): lib_bytes + 1000, ("tiny", 1): bundle_bytes}
    # a deleted version leaves the day's snapshot when measured again
    with database.session() as s:
        s.execute(delete(ModelVersion))
    with database.session() as s:
        assert usage_store.snapshot_storage(s, settings, tenant, day=DAY1) == lib_bytes + 1000
        assert [r.model for r in s.scalars(select(Usage).where(Usage.day == DAY1))] == [""]


def test_the_maintenance_tick_measures_every_tenant_once_per_interval(lab) -> None:  # noqa: ANN001
    settings, database, tenant, _ = lab
    with database.session() as s:
        other = auth.create_tenant(s, "other").id
    snapshots = metering.StorageSnapshots(interval_s=3600)
    assert snapshots.maybe_run(database, settings) == 2
    assert snapshots.maybe_run(database, settings) == 0  # not due again yet
    with database.session() as s:
        tenants = set(s.scalars(select(Usage.tenant_id).where(Usage.metric == M.bytes_stored)))
    assert tenants == {tenant, other}


# -- reports: API, CSV, page, CLI -----------------------------------------------------------------


def seed(db: Database, tenant_id: int) -> None:
    with db.session() as s:
        usage_store.add(
            s,
            tenant_id,
            [
                Quantity(M.cpu_seconds, 1.25, "sol", 1),
                Quantity(M.predict_calls, 2, "sol", 1),
                Quantity(M.predict_inputs, 7, "sol", 1),
                Quantity(M.cpu_seconds, 0.5),
            ],
            day=DAY1,
        )
        usage_store.add(
            s,
            tenant_id,
            [Quantity(M.rows_scored, 1000, "=cmd|' /C calc'!A0", 2), Quantity(M.gpu_seconds, 3.0, "sol", 1)],
            day=DAY2,
        )
        for day, by_model in ((DAY1, {("", 0): 100, ("sol", 1): 50}), (DAY2, {("", 0): 300})):
            for (model, version), n in by_model.items():
                s.add(
                    Usage(tenant_id=tenant_id, day=day, metric=M.bytes_stored, model=model, version=version, quantity=n)
                )


def test_api_reports_per_day_model_and_metric_for_the_tenant_only(app, client, db) -> None:  # noqa: ANN001
    tid, key = create_tenant_key(app)
    other_tid, other_key = create_tenant_key(app)
    seed(db, tid)
    with db.session() as s:
        usage_store.add(s, other_tid, [Quantity(M.cpu_seconds, 99.0, "sol", 1)], day=DAY1)
    api = ApiClient(client, key)
    q = "from=2026-11-01&to=2026-11-03"

    r = api.get(f"/api/v1/usage?{q}")
    assert r.status_code == 200
    body = r.get_json()
    assert (body["from"], body["to"], body["group_by"]) == ("2026-11-01", "2026-11-03", "day")
    assert body["rows"] == [
        {"day": "2026-11-01", "metric": "bytes_stored", "quantity": 150},
        {"day": "2026-11-01", "metric": "cpu_seconds", "quantity": 1.75},
        {"day": "2026-11-01", "metric": "predict_calls", "quantity": 2},
        {"day": "2026-11-01", "metric": "predict_inputs", "quantity": 7},
        {"day": "2026-11-02", "metric": "bytes_stored", "quantity": 300},
        {"day": "2026-11-02", "metric": "gpu_seconds", "quantity": 3.0},
        {"day": "2026-11-02", "metric": "rows_scored", "quantity": 1000},
    ]
    # bytes stored over a range is the last measurement in it (day 2), not a sum over days
    assert body["totals"] == {
        "cpu_seconds": 1.75,
        "gpu_seconds": 3.0,
        "predict_calls": 2,
        "predict_inputs": 7,
        "rows_scored": 1000,
        "bytes_stored": 300,
    }

    by_model = api.get(f"/api/v1/usage?{q}&group_by=model").get_json()["rows"]
    assert by_model == [
        {"model": None, "version": None, "metric": "bytes_stored", "quantity": 300},
        {"model": None, "version": None, "metric": "cpu_seconds", "quantity": 0.5},
        {"model": "=cmd|' /C calc'!A0", "version": 2, "metric": "rows_scored", "quantity": 1000},
        {"model": "sol", "version": 1, "metric": "cpu_seconds", "quantity": 1.25},
        {"model": "sol", "version": 1, "metric": "gpu_seconds", "quantity": 3.0},
        {"model": "sol", "version": 1, "metric": "predict_calls", "quantity": 2},
        {"model": "sol", "version": 1, "metric": "predict_inputs", "quantity": 7},
    ]
    by_metric = api.get(f"/api/v1/usage?{q}&group_by=metric").get_json()["rows"]
    assert {r["metric"]: r["quantity"] for r in by_metric} == body["totals"]
    day2 = api.get("/api/v1/usage?from=2026-11-02&to=2026-11-02&group_by=metric").get_json()["totals"]
    assert day2["cpu_seconds"] == 0 and day2["rows_scored"] == 1000

    theirs = ApiClient(client, other_key).get(f"/api/v1/usage?{q}").get_json()
    assert theirs["rows"] == [{"day": "2026-11-01", "metric": "cpu_seconds", "quantity": 99.0}]


def test_api_csv_has_a_header_row_and_escapes_formulas(app, client, db) -> None:  # noqa: ANN001
    tid, key = create_tenant_key(app)
    seed(db, tid)
    api = ApiClient(client, key)
    r = api.get("/api/v1/usage?from=2026-11-01&to=2026-11-03&group_by=model&format=csv")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    assert "attachment" in r.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(r.get_data(as_text=True))))
    assert rows[0] == ["model", "version", "metric", "quantity"]
    assert ["'=cmd|' /C calc'!A0", "2", "rows_scored", "1000"] in rows
    assert ["", "", "bytes_stored", "300"] in rows and len(rows) == 8
    day = list(
        csv.reader(
            io.StringIO(api.get("/api/v1/usage?from=2026-11-01&to=2026-11-03&format=csv").get_data(as_text=True))
        )
    )
    assert day[0] == ["day", "metric", "quantity"] and day[1] == ["2026-11-01", "bytes_stored", "150"]


def test_api_refuses_bad_ranges_and_options_with_the_error_body(app, client) -> None:  # noqa: ANN001
    _, key = create_tenant_key(app)
    api = ApiClient(client, key)
    for query, status in (
        ("from=2026-11-05&to=2026-11-01", 422),
        ("from=2024-01-01&to=2026-11-01", 422),
        ("from=yesterday", 422),
        ("group_by=week", 422),
        ("format=xml", 422),
    ):
        r = api.get(f"/api/v1/usage?{query}")
        assert r.status_code == status, (query, r.get_json())
        assert set(r.get_json()["error"]) == {"code", "message", "details"}
    assert client.get("/api/v1/usage").status_code == 401
    # the calendar's edges are ranges like any other, not server errors
    first = api.get("/api/v1/usage?to=0001-01-05").get_json()
    assert (first["from"], first["to"]) == ("0001-01-01", "0001-01-05")
    assert api.get("/api/v1/usage?from=9999-12-31&to=9999-12-31").status_code == 200


def test_a_viewer_key_reads_usage_and_today_includes_bytes_stored(app, client, db) -> None:  # noqa: ANN001
    tid, _ = create_tenant_key(app)
    with db.session() as s:
        _, viewer = auth.new_key(s, tid, "v", KeyRole.viewer, None)
        s.add(
            Dataset(
                tenant_id=tid,
                name="d",
                kind="sequences",
                filename="d.csv",
                bytes=1234,
                sha256="0" * 64,
                rows=1,
                schema={},
                stats={},
                options={},
                uri="file:///nowhere/d.csv",
            )
        )
    r = ApiClient(client, viewer).get("/api/v1/usage?group_by=metric")  # default range: the last 30 days
    assert r.status_code == 200
    body = r.get_json()
    assert date.fromisoformat(body["to"]) - date.fromisoformat(body["from"]) == timedelta(days=29)
    assert body["totals"]["bytes_stored"] == 1234  # measured when the range includes today


def test_openapi_documents_the_report_and_csv(client) -> None:  # noqa: ANN001
    doc = client.get("/api/v1/openapi.json").get_json()
    op = doc["paths"]["/api/v1/usage"]["get"]
    assert {p["name"] for p in op["parameters"]} == {"from", "to", "group_by", "format"}
    content = op["responses"]["200"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/UsageReport"}
    assert "text/csv" in content
    report = doc["components"]["schemas"]["UsageReport"]
    assert set(report["required"]) == {"from", "to", "group_by", "rows", "totals"}
    totals = doc["components"]["schemas"]["UsageTotals"]
    assert set(totals["required"]) == {m.value for m in UsageMetric}


def test_usage_page_shows_days_models_totals_and_csv_links(app, client, db) -> None:  # noqa: ANN001
    tid, _ = create_tenant_key(app)
    seed(db, tid)
    with db.session() as s:
        key, _ = auth.new_key(s, tid, "page", KeyRole.viewer, None)
        key_id = key.id
    sign_in(app, client, key_id)
    r = client.get("/usage?from=2026-11-01&to=2026-11-03")
    assert r.status_code == 200
    html = r.get_data(as_text=True)
    assert 'id="usage-days"' in html and 'id="usage-models"' in html
    assert "2026-11-01" in html and "2026-11-02" in html and "sol</a> v1" in html
    assert 'data-metric="rows_scored">1,000<' in html and 'data-metric="bytes_stored">300 B<' in html
    assert "/usage.csv?" in html and "group_by=model" in html
    assert client.get("/", follow_redirects=True).get_data(as_text=True).count('href="/usage"') == 1  # nav link
    r = client.get("/usage.csv?from=2026-11-01&to=2026-11-03&group_by=day")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    assert r.get_data(as_text=True).splitlines()[0] == "day,metric,quantity"
    assert client.get("/usage?from=nope").status_code == 400
    assert client.get("/usage?from=2026-11-05&to=2026-11-01").status_code == 400
    assert client.get("/usage.csv?group_by=week").status_code == 400
    assert client.get("/usage.csv?from=2026-11-05&to=2026-11-01").status_code == 400


def test_usage_page_needs_a_signed_in_browser(client) -> None:  # noqa: ANN001
    r = client.get("/usage")
    assert r.status_code == 302 and "/login" in r.headers["Location"]


def test_cli_usage_for_a_tenant(app, db, monkeypatch) -> None:  # noqa: ANN001
    from medmaas.cli import main

    with db.session() as s:
        tid = auth.create_tenant(s, "cli-usage").id
    seed(db, tid)
    monkeypatch.setenv("MEDMAAS_DATABASE_URL", str(db.engine.url))
    runner_ = CliRunner()
    res = runner_.invoke(
        main, ["usage", "--tenant", "cli-usage", "--from", "2026-11-01", "--to", "2026-11-03", "--group-by", "model"]
    )
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == "model\tversion\tmetric\tquantity" and "sol\t1\tpredict_inputs\t7" in lines
    assert lines[-1].startswith("totals 2026-11-01 to 2026-11-03: cpu_seconds 1.75")
    res = runner_.invoke(
        main, ["usage", "--tenant", "cli-usage", "--from", "2026-11-01", "--to", "2026-11-03", "--csv"]
    )
    assert res.exit_code == 0 and res.output.splitlines()[0] == "day,metric,quantity"
    assert runner_.invoke(main, ["usage", "--tenant", "nobody"]).exit_code != 0
    res = runner_.invoke(main, ["usage", "--tenant", "cli-usage", "--from", "2026-11-05", "--to", "2026-11-01"])
    assert res.exit_code != 0 and "after" in res.output
