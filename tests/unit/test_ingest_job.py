"""Large uploads are parsed by an `ingest` job, not in the request (issue 11, item 6): a small
upload answers 201 parsed; a large or gzip one answers 202 `processing` with its job in time
bounded by the bytes received (a 29 KB gzip that expands to 3.3M rows: well under a second),
and the job (run in process here) makes it ready with the same figures as an inline parse, or
failed in one sentence. A bad header is still a 4xx at submit; training on a dataset being
parsed is 409, on a failed one 422; erasure waits for the job; with encryption on, image
ingest keeps its plaintext scratch outside the artifact root."""
from __future__ import annotations

import gzip
import io
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import func, select

from app import artifacts
from app.crypto import HEADER_SIZE, is_encrypted, new_master_key
from app.ingest import images as image_ingest
from app.ingest import preview, textio
from app.models import Dataset, Job
from app.stores import datasets as datasets_store
from medmaas import commands
from medmaas.client import Client
from tests.conftest import ApiClient, wait_until
from tests.unit.test_deid import patient_zip
from workers.tasks import execute_job

INLINE_MAX = 64 * 1024
SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "CCCC", "C1CCCCC1", "CC(C)O", "OCCO", "CCOC", "NCCN"]


@pytest.fixture()
def sqlite_settings(sqlite_settings):  # noqa: ANN001, ANN201
    return sqlite_settings.replace(ingest_inline_max_bytes=INLINE_MAX)


def csv_rows(n: int, bad_every: int = 0) -> bytes:
    lines = ["smiles,solubility,activity"]
    for i in range(n):
        smi = "C1CC(" if bad_every and i % bad_every == 1 else SMILES[i % len(SMILES)]
        lines.append(f"{smi},{(i % 97) / 10:.1f},{i % 3}")
    return ("\n".join(lines) + "\n").encode()


def upload(api: ApiClient, payload: bytes, filename: str, kind: str = "sequences", **options: str):  # noqa: ANN201
    data = {"kind": kind, "file": (io.BytesIO(payload), filename), **options}
    return api.post("/api/v1/datasets", data=data, content_type="multipart/form-data")


def run_job(app, job_id: int) -> str:  # noqa: ANN001
    return execute_job(app.extensions["medmaas.db"], app.extensions["medmaas.settings"], None, job_id)


def counts(app) -> tuple[int, int, list[Path]]:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        datasets = s.scalar(select(func.count()).select_from(Dataset))
        jobs = s.scalar(select(func.count()).select_from(Job))
    root = app.extensions["medmaas.settings"].artifacts
    return datasets, jobs, sorted(p for p in root.rglob("*") if p.is_file())


def processing(api: ApiClient, payload: bytes, filename: str, **options: str) -> dict:
    r = upload(api, payload, filename, **options)
    assert r.status_code == 202, r.get_json()
    ds = r.get_json()
    assert ds["status"] == "processing" and ds["job_id"] and ds["rows"] == 0
    assert r.headers["Location"] == f"/api/v1/datasets/{ds['id']}"
    return ds


def test_a_small_upload_is_parsed_in_the_request(api: ApiClient, app) -> None:  # noqa: ANN001
    r = upload(api, csv_rows(100), "small.csv", label_columns="solubility")
    assert r.status_code == 201, r.get_json()
    ds = r.get_json()
    assert (ds["status"], ds["job_id"], ds["error"], ds["rows"]) == ("ready", None, None, 100)
    assert counts(app)[1] == 0  # no job


def test_a_large_upload_is_202_then_the_job_makes_it_ready_with_the_inline_figures(
    api: ApiClient, app, fake_redis  # noqa: ANN001
) -> None:
    payload = csv_rows(20_000, bad_every=500)
    assert len(payload) > INLINE_MAX
    ds = processing(api, payload, "big.csv", label_columns="solubility,activity")
    job = api.job(ds["job_id"])
    assert (job["kind"], job["state"], job["spec"]) == ("ingest", "queued", {"dataset_id": ds["id"]})
    assert [m["args"][0] for m in fake_redis.messages("cpu")] == [ds["job_id"]]  # published

    assert run_job(app, ds["job_id"]) == "succeeded"
    done = api.get(f"/api/v1/datasets/{ds['id']}").get_json()
    assert (done["status"], done["error"]) == ("ready", None)
    assert api.job(ds["job_id"])["result"]["rows"] == done["rows"] == 20_000 - 40

    # the same bytes parsed in the request give the same report
    settings = app.extensions["medmaas.settings"].replace(ingest_inline_max_bytes=10 * INLINE_MAX)
    with app.extensions["medmaas.db"].session() as s:
        inline = datasets_store.create_from_upload(
            s, settings, done_tenant(app, ds["id"]), kind="sequences", stream=io.BytesIO(payload),
            filename="big.csv", options={"label_columns": "solubility,activity"},
        )
        for field in ("rows", "invalid_rows", "invalid_samples", "schema", "stats"):
            assert done[field] == getattr(inline, field), field
    train = api.post("/api/v1/jobs", json={"kind": "train", "spec": {
        "model_name": "m", "dataset_id": ds["id"], "arch": "rnn", "task": "regression", "target": "solubility"}})
    assert train.status_code == 202, train.get_json()


def done_tenant(app, dataset_id: int) -> int:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        return s.scalar(select(Dataset.tenant_id).where(Dataset.id == dataset_id))


def test_a_29_kb_gzip_that_expands_to_3_3m_rows_is_not_expanded_in_the_request(
    api: ApiClient, app, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    body = b"smiles,y\n" + b"CCO,1\n" * 3_300_000
    bomb = gzip.compress(body, compresslevel=9)
    assert len(bomb) < 40_000 and len(body) > 19_000_000
    expanded_in_request: list[int] = []

    def counting_open(path: str, compressed: bool) -> io.BufferedIOBase:
        fp = textio.open_binary(path, compressed)
        read = fp.read

        def counted(n: int = -1) -> bytes:
            chunk = read(n)
            expanded_in_request.append(len(chunk))
            return chunk

        fp.read = counted  # type: ignore[method-assign]
        return fp

    monkeypatch.setattr(preview, "open_binary", counting_open)
    ds = processing(api, bomb, "bomb.csv.gz")  # 202, no rows parsed: a worker job does that
    assert ds["bytes"] == len(bomb)
    limit = app.extensions["medmaas.settings"].ingest_inline_max_bytes
    assert 0 < sum(expanded_in_request) <= limit + 1 < len(body) // 4


def test_a_small_gzip_is_still_parsed_in_the_request(api: ApiClient) -> None:
    r = upload(api, gzip.compress(csv_rows(50)), "small.csv.gz", label_columns="solubility")
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["rows"] == 50


@pytest.mark.parametrize(
    ("payload", "filename", "options", "code"),
    [
        (b"name,y\n" + b"CCO,1\n" * 20_000, "big.csv", {}, "missing_column"),  # no smiles column
        (csv_rows(20_000), "big.csv", {"label_columns": "nope"}, "missing_column"),
        (csv_rows(20_000), "big.csv", {"colour": "red"}, "unknown_option"),
        (gzip.compress(b"smiles,smiles\n" + b"CCO,1\n" * 200_000), "big.csv.gz", {}, "invalid_header"),
        (bytes(range(256)) * 1000, "big.csv", {}, "invalid_file"),
    ],
)
def test_what_the_first_rows_show_is_refused_at_submit_leaving_nothing(
    api: ApiClient, app, payload: bytes, filename: str, options: dict, code: str  # noqa: ANN001
) -> None:
    before = counts(app)
    r = upload(api, payload, filename, **options)
    assert r.status_code == 422, r.get_json()
    assert r.get_json()["error"]["code"] == code
    assert counts(app) == before


def test_corrupt_data_found_by_the_worker_fails_the_dataset_in_one_sentence(api: ApiClient, app) -> None:  # noqa: ANN001
    whole = gzip.compress(csv_rows(40_000), compresslevel=1)
    ds = processing(api, whole[: len(whole) * 3 // 4], "cut.csv.gz")  # truncated far past what submit reads
    assert run_job(app, ds["job_id"]) == "failed"
    failed = api.get(f"/api/v1/datasets/{ds['id']}").get_json()
    assert failed["status"] == "failed"
    assert failed["error"].startswith("the gzip stream is corrupt or truncated")
    assert failed["error"].endswith(".") and "\n" not in failed["error"] and "Traceback" not in failed["error"]
    assert failed["error"].rstrip(".") in api.job(ds["job_id"])["error"]

    train = api.post("/api/v1/jobs", json={"kind": "train", "spec": {
        "model_name": "m", "dataset_id": ds["id"], "arch": "rnn", "task": "regression", "target": "solubility"}})
    assert train.status_code == 422
    assert train.get_json()["error"]["code"] == "dataset_failed"
    assert "dataset_id" in train.get_json()["error"]["details"]["spec"]


def test_train_on_a_processing_dataset_is_409_and_deleting_it_waits_for_the_job(api: ApiClient, app) -> None:  # noqa: ANN001
    ds = processing(api, csv_rows(20_000), "big.csv", label_columns="solubility")
    train = api.post("/api/v1/jobs", json={"kind": "train", "spec": {
        "model_name": "m", "dataset_id": ds["id"], "arch": "rnn", "task": "regression", "target": "solubility"}})
    assert train.status_code == 409, train.get_json()
    err = train.get_json()["error"]
    assert err["code"] == "dataset_processing" and "dataset_id" in err["details"]["spec"]

    r = api.client.delete(f"/api/v1/datasets/{ds['id']}", headers=api.headers)
    assert r.status_code == 409 and r.get_json()["error"]["details"]["job_ids"] == [ds["job_id"]]
    assert run_job(app, ds["job_id"]) == "succeeded"
    assert api.client.delete(f"/api/v1/datasets/{ds['id']}", headers=api.headers).status_code == 204


def test_ingest_jobs_cannot_be_submitted_and_a_cancelled_one_fails_its_dataset(api: ApiClient) -> None:
    ds = processing(api, csv_rows(20_000), "big.csv", label_columns="solubility")
    r = api.post("/api/v1/jobs", json={"kind": "ingest", "spec": {"dataset_id": ds["id"]}})
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "unknown_kind"

    assert api.post(f"/api/v1/jobs/{ds['job_id']}/cancel").status_code in (200, 202)
    shown = api.get(f"/api/v1/datasets/{ds['id']}").get_json()
    assert (shown["status"], shown["error"]) == ("failed", "its ingest job was cancelled.")


def test_with_encryption_image_scratch_stays_outside_the_artifact_root(sqlite_settings, client) -> None:  # noqa: ANN001
    from app import create_app
    from tests.conftest import close_app, create_tenant_key

    settings = sqlite_settings.replace(encryption_key=new_master_key())
    app = create_app(settings)
    try:
        api = ApiClient(app.test_client(), create_tenant_key(app)[1])
        root = settings.artifacts
        seen: list[list[Path]] = []
        decode = image_ingest._decode

        def watching(*args, **kw):  # noqa: ANN002, ANN003, ANN202
            seen.append(sorted(p for p in root.rglob("*") if p.is_file()))
            return decode(*args, **kw)

        image_ingest._decode = watching
        try:
            payload, _, _ = patient_zip()
            r = upload(api, payload, "scans.zip", kind="images")
        finally:
            image_ingest._decode = decode
        assert r.status_code == 201, r.get_json()
        assert seen  # pixels were decoded while we watched
        for files in [*seen, sorted(p for p in root.rglob("*") if p.is_file())]:
            for path in files:
                assert "_extract-" not in str(path) and not path.name.endswith(".u8"), path
                if path.name.endswith(".tmp"):
                    continue  # being written by open_write: encrypted as it goes
                with open(path, "rb") as fh:
                    assert is_encrypted(fh.read(HEADER_SIZE)), path
        assert not list((settings.home / "scratch").iterdir())  # removed afterwards
    finally:
        close_app(app)
        artifacts.configure(settings.replace(encryption_key=""))


class ToApp(requests.Session):
    """A requests.Session answered by the Flask app in process. Before the client follows a
    job, the queued ingest jobs run here (no worker, no broker)."""

    def __init__(self, app) -> None:  # noqa: ANN001
        super().__init__()
        self.app, self.flask = app, app.test_client()

    def request(self, method: str, url: str, *args: Any, **kw: Any) -> requests.Response:  # type: ignore[override]
        path = "/" + url.split("://", 1)[1].split("/", 1)[1]
        if "/jobs/" in path:
            with self.app.extensions["medmaas.db"].session() as s:
                queued = s.scalars(select(Job.id).where(Job.kind == "ingest", Job.state == "queued")).all()
            for job_id in queued:
                run_job(self.app, job_id)
        data = kw.get("data")
        if data is not None and hasattr(data, "read"):
            data = b"".join(iter(data))
        headers = {**self.headers, **(kw.get("headers") or {})}
        got = self.flask.open(path, method=method, data=data, json=kw.get("json"), headers=headers,
                              query_string=kw.get("params") or {})
        resp = requests.Response()
        resp.status_code, resp.url, resp._content = got.status_code, url, got.get_data()
        resp.headers.update(dict(got.headers))
        resp.raw = io.BytesIO(resp._content)
        return resp


@pytest.mark.parametrize("wait", [True, False])
def test_cli_upload_waits_for_a_processing_dataset_unless_told_not_to(
    app, api: ApiClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wait: bool  # noqa: ANN001
) -> None:
    big = tmp_path / "big.csv"
    big.write_bytes(csv_rows(20_000, bad_every=500))
    client = Client("http://medmaas.test", api.key, session=ToApp(app))
    monkeypatch.setattr(commands, "get_client", lambda: client)
    args = ["datasets", "upload", str(big), "--kind", "sequences", "--option", "label_columns=solubility"]
    out = CliRunner().invoke(commands.client, [*args, "--json"] + ([] if wait else ["--no-wait"]),
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    ds = json.loads(out.output)
    if wait:
        assert (ds["status"], ds["rows"], ds["invalid_rows"]) == ("ready", 19_960, 40)
        shown = CliRunner().invoke(commands.client, ["datasets", "show", str(ds["id"])], catch_exceptions=False)
        assert "rows          19960" in shown.output and "status" not in shown.output
    else:
        assert (ds["status"], ds["rows"]) == ("processing", 0)
        shown = CliRunner().invoke(commands.client, ["datasets", "show", str(ds["id"])], catch_exceptions=False)
        assert f"status        processing (job {ds['job_id']}" in shown.output


def test_cli_upload_of_a_file_the_worker_cannot_read_exits_1_with_the_sentence(
    app, api: ApiClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path  # noqa: ANN001
) -> None:
    whole = gzip.compress(csv_rows(40_000), compresslevel=1)
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(whole[: len(whole) * 3 // 4])
    client = Client("http://medmaas.test", api.key, session=ToApp(app))
    monkeypatch.setattr(commands, "get_client", lambda: client)
    out = CliRunner().invoke(commands.client, ["datasets", "upload", str(cut), "--kind", "sequences"],
                             catch_exceptions=False)
    assert out.exit_code == 1
    assert "status        failed: the gzip stream is corrupt or truncated" in out.output


def test_the_dataset_page_shows_processing_then_the_report_or_the_failure(app, client) -> None:  # noqa: ANN001
    from app.models import ApiKey
    from tests.conftest import create_tenant_key, sign_in

    tid, _ = create_tenant_key(app)
    with app.extensions["medmaas.db"].session() as s:
        key_id = s.scalar(select(ApiKey.id).where(ApiKey.tenant_id == tid))
    sign_in(app, client, key_id)
    form = {"csrf_token": "token", "kind": "sequences", "name": "big", "options": "label_columns=solubility",
            "file": (io.BytesIO(csv_rows(20_000)), "big.csv")}
    r = client.post("/datasets", data=form, content_type="multipart/form-data", follow_redirects=True)
    assert r.status_code == 200
    page = r.get_data(as_text=True)
    with app.extensions["medmaas.db"].session() as s:
        ds = s.scalars(select(Dataset).where(Dataset.tenant_id == tid)).one()
    assert f"job #{ds.job_id} is reading it" in page
    assert 'id="ds-status"' in page and "Processing…" in page and 'http-equiv="refresh"' in page
    assert f'href="/jobs/{ds.job_id}"' in page and "Train on this dataset" not in page

    assert run_job(app, ds.job_id) == "succeeded"
    page = client.get(f"/datasets/{ds.id}").get_data(as_text=True)
    assert 'id="ds-status"' not in page and 'http-equiv="refresh"' not in page
    assert '<dd id="ds-rows">20000</dd>' in page and "Train on this dataset" in page

    whole = gzip.compress(csv_rows(40_000), compresslevel=1)
    form["file"] = (io.BytesIO(whole[: len(whole) * 3 // 4]), "cut.csv.gz")
    client.post("/datasets", data=form, content_type="multipart/form-data")
    with app.extensions["medmaas.db"].session() as s:
        cut = s.scalars(select(Dataset).where(Dataset.tenant_id == tid).order_by(Dataset.id.desc())).first()
    assert run_job(app, cut.job_id) == "failed"
    page = client.get(f"/datasets/{cut.id}").get_data(as_text=True)
    assert "The upload could not be read: the gzip stream is corrupt or truncated" in page


def test_the_job_reports_rows_read_and_a_cancel_stops_it_mid_parse(api: ApiClient, app) -> None:  # noqa: ANN001
    ds = processing(api, csv_rows(60_000), "big.csv", label_columns="solubility")
    assert run_job(app, ds["job_id"]) == "succeeded"
    steps = [e["data"] for e in api.events(ds["job_id"]) if e["type"] == "progress"]
    assert steps[-1]["progress"] == 1.0 and steps[-1]["message"] == f"dataset {ds['id']} is ready: 60,000 rows"
    read = [(int(s["message"].split()[0].replace(",", "")), s["progress"]) for s in steps
            if s["message"].endswith(" rows read")]
    assert read and all(rows in (20_000, 40_000) for rows, _ in read), steps
    assert all(abs(fraction - rows / 60_000) < 0.02 for rows, fraction in read), read  # bytes read / file size

    ds = processing(api, csv_rows(400_000), "bigger.csv", label_columns="solubility")
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(run_job(app, ds["job_id"])))
    worker.start()
    wait_until(lambda: any(e["type"] == "progress" and "rows read" in e["data"]["message"]
                           for e in api.events(ds["job_id"])), 60, what="the parse to start")
    assert api.post(f"/api/v1/jobs/{ds['job_id']}/cancel").status_code in (200, 202)
    worker.join(60)
    assert outcome == ["cancelled"]
    shown = api.get(f"/api/v1/datasets/{ds['id']}").get_json()
    assert (shown["status"], shown["error"]) == ("failed", "its ingest job was cancelled.")


def test_scratch_is_private_and_what_a_killed_process_left_is_swept_after_a_day(sqlite_settings) -> None:  # noqa: ANN001
    root = sqlite_settings.home.resolve() / "scratch"
    root.mkdir(parents=True)
    old, recent = root / "ingest-old", root / "ingest-recent"
    for d in (old, recent):
        d.mkdir()
        (d / "_images.u8").write_bytes(b"\0" * 10)
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(old, (two_days_ago, two_days_ago))
    with datasets_store.scratch(sqlite_settings) as tmp:
        assert Path(tmp).parent == root and (os.stat(tmp).st_mode & 0o777) == 0o700
        assert not Path(tmp).is_relative_to(sqlite_settings.artifacts)
    assert not Path(tmp).exists() and not old.exists() and recent.exists()


def test_migration_0011_makes_existing_datasets_ready_and_downgrades(tmp_path: Path) -> None:
    from alembic import command
    from sqlalchemy import create_engine, text

    from app.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'm.db'}"
    command.upgrade(alembic_config(url), "0010")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (id, name, created_at) VALUES (1, 'lab', '2026-01-01 00:00:00')"))
        conn.execute(text(
            "INSERT INTO datasets (id, tenant_id, name, kind, filename, bytes, sha256, rows, invalid_rows,"
            " invalid_samples, schema, stats, options, uri, data_uri, created_at) VALUES (1, 1, 'old', 'sequences',"
            " 'a.csv', 10, 'x', 5, 0, '[]', '{}', '{}', '{}', 'file:///a', 'file:///b', '2026-01-01 00:00:00')"))
    command.upgrade(alembic_config(url), "0011")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT status, error, job_id, rows FROM datasets")).one() == ("ready", None, None, 5)
    command.downgrade(alembic_config(url), "0010")
    with engine.connect() as conn:
        assert conn.execute(text("SELECT rows FROM datasets")).scalar() == 5
    engine.dispose()


def test_watching_an_ingest_job_ends_with_the_dataset_it_made() -> None:
    job = {"id": 9, "kind": "ingest", "result": {"dataset_id": 4, "status": "ready", "rows": 19960, "invalid_rows": 40}}
    assert commands.result_summary(job) == ["Dataset 4 ready: 19960 rows, 40 invalid"]
