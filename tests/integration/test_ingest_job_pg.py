"""Large uploads parsed by a real worker process (PostgreSQL, Redis): the 29 KB gzip that
expands to a 3.3M-row CSV answers 202 in well under a second and a worker parses it; a
worker SIGKILLed mid-parse is reaped, the job runs again and the dataset ends ready with the
figures of an uninterrupted parse and no partial files."""
from __future__ import annotations

import gzip
import io
import json
import signal

import pytest

from tests.conftest import ApiClient, wait_until
from tests.integration.test_cli_client import cli, key, server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration
N = 400_000  # rows of the upload a worker is killed while parsing


def upload(api: ApiClient, payload: bytes, filename: str):  # noqa: ANN201
    data = {"kind": "sequences", "file": (io.BytesIO(payload), filename)}
    return api.post("/api/v1/datasets", data=data, content_type="multipart/form-data")


def dataset(api: ApiClient, dataset_id: int) -> dict:
    return api.get(f"/api/v1/datasets/{dataset_id}").get_json()


def test_the_gzip_bomb_is_202_at_once_and_a_worker_parses_it(pg_api: ApiClient, processes) -> None:  # noqa: ANN001
    bomb = gzip.compress(b"smiles,y\n" + b"CCO,1\n" * 3_300_000, compresslevel=9)
    assert len(bomb) < 40_000
    r = upload(pg_api, bomb, "bomb.csv.gz")
    assert r.status_code == 202, r.get_json()
    ds = r.get_json()
    assert ds["status"] == "processing" and ds["rows"] == 0

    procs = processes()
    procs.worker()
    job = pg_api.wait(ds["job_id"], timeout=900)
    assert job["state"] == "succeeded", (job, procs.logs())
    done = dataset(pg_api, ds["id"])
    assert (done["status"], done["rows"], done["invalid_rows"]) == ("ready", 3_300_000, 0)
    assert done["schema"]["compressed"] is True and done["schema"]["label_columns"] == ["y"]


def test_a_worker_killed_mid_parse_is_replaced_and_the_dataset_ends_ready(
    pg_api: ApiClient, pg_settings, processes  # noqa: ANN001
) -> None:
    rows = [f"{smi},{i % 7}" for i, smi in enumerate(["CCO", "c1ccccc1O", "CC(=O)Nc1ccccc1", "CCN(CC)CC"] * (N // 4))]
    body = ("smiles,y\n" + "\n".join(rows) + "\n").encode()
    assert len(body) > pg_settings.ingest_inline_max_bytes
    payload = gzip.compress(body, compresslevel=6)
    r = upload(pg_api, payload, "big.csv.gz")
    assert r.status_code == 202, r.get_json()
    ds = r.get_json()

    procs = processes()
    procs.beat()  # reaps the lost lease and re-publishes the job
    first = procs.worker()
    wait_until(lambda: any(e["type"] == "progress" and e["data"]["message"].endswith(" rows read")
                           for e in pg_api.events(ds["job_id"])), 120, what="the parse to be under way")
    assert pg_api.job(ds["job_id"])["state"] == "running"
    procs.kill(first, signal.SIGKILL)
    assert dataset(pg_api, ds["id"])["status"] == "processing"
    procs.worker()
    job = pg_api.wait(ds["job_id"], timeout=600)
    assert job["state"] == "succeeded", (job, procs.logs())
    assert job["attempts"] == 2
    done = dataset(pg_api, ds["id"])
    assert (done["status"], done["rows"], done["invalid_rows"]) == ("ready", N, 0)
    assert done["stats"]["labels"]["y"]["class_counts"] == {str(k): len(range(k, N, 7)) for k in range(7)}
    partial = [p for p in pg_settings.artifacts.glob("tenant-*/datasets/*/*") if p.name.endswith((".tmp", "_rows.parquet"))]
    assert partial == []


def test_migration_0011_matches_the_dataset_model_on_postgresql(pg_settings) -> None:  # noqa: ANN001
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from app.db import Base, Database

    db = Database(pg_settings.sqlalchemy_url)
    try:
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
            statuses = conn.exec_driver_sql("SELECT DISTINCT status FROM datasets").scalars().all()
    finally:
        db.dispose()
    assert [d for d in diff if "datasets" in repr(d)] == []
    assert set(statuses) <= {"ready", "processing", "failed"}


def test_cli_upload_of_a_large_file_waits_for_the_worker_and_prints_the_report(
    cli, server, key, processes, tmp_path  # noqa: ANN001
) -> None:
    rows = [f"{smi},{i % 5}" for i, smi in enumerate(["CCO", "c1ccccc1O", "CC(=O)Nc1ccccc1", "C1CC("] * (N // 4))]
    big = tmp_path / "big.csv.gz"
    big.write_bytes(gzip.compress(("smiles,y\n" + "\n".join(rows) + "\n").encode(), compresslevel=6))
    procs = processes()
    procs.worker()
    assert cli("login", server.url, "--key", key).returncode == 0
    up = cli("datasets", "upload", str(big), "--kind", "sequences", "--json", timeout=900)
    assert up.returncode == 0, (up.stderr, procs.logs())
    ds = json.loads(up.stdout)
    assert (ds["status"], ds["rows"], ds["invalid_rows"]) == ("ready", N * 3 // 4, N // 4)
    assert ds["job_id"] and ds["invalid_samples"][0]["reason"].startswith("SMILES parse error")
    shown = cli("datasets", "show", str(ds["id"]))
    assert f"rows          {N * 3 // 4}" in shown.stdout and "status" not in shown.stdout
