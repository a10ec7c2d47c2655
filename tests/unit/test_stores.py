"""The stores (app.stores) on SQLite, without a request: tenant isolation (another tenant's
row is NotFound), paging, counts, events, cancel, submit (validation, idempotency,
publishing), uploads, the registry; and the one mapping of their errors to HTTP."""
from __future__ import annotations

import ast
import dataclasses
import io
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from app import auth
from app import jobs as state_machine
from app.artifacts import UploadTooLarge
from app.errors import as_api_error
from app.ingest import IngestError
from app.kinds import SpecError
from app.models import ApiKey, Dataset, Job, JobState, ModelVersion, Tenant
from app.stores import Conflict, Invalid, NotFound
from app.stores import datasets as datasets_store
from app.stores import jobs as jobs_store
from app.stores import models as models_store
from tests.conftest import sign_in

ROOT = Path(__file__).resolve().parents[2]
CSV = b"smiles,activity\nCCO,1.5\nnot_a_smiles,2.0\nc1ccccc1,0.3\n"


@pytest.fixture()
def db(app):  # noqa: ANN001, ANN201
    return app.extensions["medmaas.db"]


@pytest.fixture()
def settings(app):  # noqa: ANN001, ANN201
    return app.extensions["medmaas.settings"]


@pytest.fixture()
def session(db):  # noqa: ANN001, ANN201
    with db.sessionmaker() as s:
        yield s


@pytest.fixture()
def tenants(session) -> tuple[int, int]:  # noqa: ANN001
    a = auth.create_tenant(session, f"a-{uuid.uuid4().hex[:8]}")
    b = auth.create_tenant(session, f"b-{uuid.uuid4().hex[:8]}")
    session.commit()
    return a.id, b.id


@pytest.fixture()
def published(monkeypatch) -> list[tuple[int, str]]:  # noqa: ANN001
    """Records what submit publishes (instead of sending it to the broker)."""
    sent: list[tuple[int, str]] = []

    def publish_jobs(celery: Any, db: Any, items: Any, stamp: bool = True) -> int:
        sent.extend(items)
        return len(sent)

    monkeypatch.setattr(jobs_store.dispatch, "publish_jobs", publish_jobs)
    return sent


def submit(app, session, tenant_id: int, kind: str = "sleep", spec: dict | None = None, **kw: Any) -> Job:  # noqa: ANN001
    job, _created = jobs_store.submit(session, app.extensions["medmaas.celery"], app.extensions["medmaas.db"],
                                      app.extensions["medmaas.settings"], tenant_id, kind,
                                      {"seconds": 0} if spec is None else spec, **kw)
    return job


# -- jobs --------------------------------------------------------------------------------

def test_job_get_is_tenant_scoped(app, session, tenants, published) -> None:  # noqa: ANN001
    a, b = tenants
    job = submit(app, session, a)
    assert jobs_store.get(session, a, job.id).id == job.id
    with pytest.raises(NotFound, match=f"Job {job.id} not found"):
        jobs_store.get(session, b, job.id)
    with pytest.raises(NotFound):
        jobs_store.get(session, a, 999_999)


def test_job_list_filters_and_cursor_paging(app, session, tenants, published) -> None:  # noqa: ANN001
    a, b = tenants
    ids = [submit(app, session, a).id for _ in range(5)]
    submit(app, session, b)
    jobs_store.request_cancel(session, a, ids[0])
    seen, cursor, pages = [], None, 0
    while True:
        page = jobs_store.list_page(session, a, limit=2, cursor=cursor)
        seen += [j.id for j in page["items"]]
        pages += 1
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
    assert seen == sorted(ids, reverse=True) and pages == 3
    assert [j.id for j in jobs_store.list_page(session, a, state="cancelled")["items"]] == [ids[0]]
    assert len(jobs_store.list_page(session, a, kind="sleep", state="queued")["items"]) == 4
    assert jobs_store.list_page(session, a, kind="train")["items"] == []
    exact = jobs_store.list_page(session, a, limit=5)
    assert len(exact["items"]) == 5 and exact["next_cursor"] is None  # no empty last page


def test_state_counts_and_kinds_used(app, session, tenants, published) -> None:  # noqa: ANN001
    a, b = tenants
    assert jobs_store.state_counts(session, a) == {s.value: 0 for s in JobState}
    ids = [submit(app, session, a).id for _ in range(3)]
    submit(app, session, b)
    jobs_store.request_cancel(session, a, ids[1])
    counts = jobs_store.state_counts(session, a)
    assert counts["queued"] == 2 and counts["cancelled"] == 1 and sum(counts.values()) == 3
    assert jobs_store.kinds_used(session, a) == ["sleep"]
    assert jobs_store.kinds_used(session, b) == ["sleep"]


def test_events_after(app, db, session, tenants, published) -> None:  # noqa: ANN001
    a, b = tenants
    job = submit(app, session, a)
    with db.session() as s:
        attempt = state_machine.claim(s, job.id, "test-worker")
        state_machine.report_progress(s, job.id, attempt, 0.5, "half")
        state_machine.succeed(s, job.id, attempt, {"ok": True})
    session.expire_all()
    out = jobs_store.events_after(session, a, job.id, after=1)
    assert [e.seq for e in out["items"]] == [2, 3, 4] and out["last_seq"] == 4 and out["state"] == "succeeded"
    assert [e.seq for e in jobs_store.events_after(session, a, job.id, after=0, limit=2)["items"]] == [1, 2]
    assert jobs_store.events_after(session, a, job.id, after=4) == {"items": [], "last_seq": 4, "state": "succeeded"}
    with pytest.raises(NotFound):
        jobs_store.events_after(session, b, job.id)
    assert jobs_store.succeeded(session, a, job.id).result == {"ok": True}


def test_cancel_and_result_conflicts(app, session, tenants, published) -> None:  # noqa: ANN001
    a, b = tenants
    job = submit(app, session, a)
    with pytest.raises(Conflict) as not_ready:
        jobs_store.succeeded(session, a, job.id)
    assert not_ready.value.code == "not_ready"
    with pytest.raises(NotFound):
        jobs_store.request_cancel(session, b, job.id)
    assert jobs_store.get(session, a, job.id).state == JobState.queued  # B's attempt changed nothing
    cancelled, state = jobs_store.request_cancel(session, a, job.id)
    assert state == JobState.cancelled and cancelled.state == JobState.cancelled and cancelled.cancel_requested
    with pytest.raises(Conflict, match="already cancelled") as again:
        jobs_store.request_cancel(session, a, job.id)
    assert again.value.code == "conflict"


def test_submit_validates_commits_publishes_and_is_idempotent(app, db, session, tenants, published) -> None:  # noqa: ANN001
    a, b = tenants
    first = submit(app, session, a, idempotency_key="run-42")
    assert first.spec["steps"] == 10 and first.queue == "cpu"  # normalised by the kind's schema, routed
    with db.sessionmaker() as other:  # committed
        assert other.get(Job, first.id) is not None
    job, created = jobs_store.submit(session, None, db, app.extensions["medmaas.settings"], a, "sleep",
                                     {"seconds": 0}, idempotency_key="run-42")
    assert job.id == first.id and created is False
    theirs = submit(app, session, b, idempotency_key="run-42")
    assert theirs.id != first.id and theirs.tenant_id == b
    assert published == [(first.id, "cpu"), (theirs.id, "cpu")]  # the repeat published nothing


@pytest.mark.parametrize(("kind", "spec", "code"), [
    ("nope", {}, "unknown_kind"),
    ("sleep", {"seconds": "ten"}, "invalid_spec"),
    ("sleep", {"queue": "nowhere"}, "invalid_spec"),
    ("train", {"model_name": "m", "dataset_id": 99999, "arch": "rnn", "task": "regression", "target": "y"},
     "unknown_dataset"),  # the kind's own check
    ("predict", {"model": "ghost", "inputs": ["C"]}, "unknown_model"),
])
def test_submit_refuses_bad_specs_and_stores_nothing(app, session, tenants, published, kind, spec, code) -> None:  # noqa: ANN001
    a, _b = tenants
    with pytest.raises(SpecError) as err:
        submit(app, session, a, kind, spec)
    assert err.value.code == code
    assert session.scalar(select(func.count()).select_from(Job)) == 0 and published == []


# -- datasets ----------------------------------------------------------------------------

def upload(session, settings, tenant_id: int, payload: bytes = CSV, **kw: Any) -> Dataset:  # noqa: ANN001
    kw.setdefault("kind", "sequences")
    kw.setdefault("filename", "../acts 1.csv")
    kw.setdefault("options", {})
    return datasets_store.create_from_upload(session, settings, tenant_id, stream=io.BytesIO(payload), **kw)


def artifact_files(settings) -> list[Path]:  # noqa: ANN001
    return sorted(p for p in settings.artifacts.rglob("*") if p.is_file())


def test_dataset_upload_get_and_lists(session, settings, tenants) -> None:  # noqa: ANN001
    a, b = tenants
    ds = upload(session, settings, a, name="acts")
    assert ds.id and ds.name == "acts" and ds.filename == "acts_1.csv" and ds.rows == 2 and ds.invalid_rows == 1
    assert ds.bytes == len(CSV) and len(ds.sha256) == 64
    unnamed = upload(session, settings, a)
    assert unnamed.name == "acts_1.csv"
    assert datasets_store.get(session, a, ds.id).id == ds.id
    with pytest.raises(NotFound, match=f"Dataset {ds.id} not found"):
        datasets_store.get(session, b, ds.id)
    page = datasets_store.list_page(session, a, limit=1)
    assert [d.id for d in page["items"]] == [unnamed.id] and page["next_cursor"] == unnamed.id
    assert [d.id for d in datasets_store.list_page(session, a, cursor=page["next_cursor"])["items"]] == [ds.id]
    assert datasets_store.list_page(session, a, kind="images")["items"] == []
    assert datasets_store.list_page(session, b)["items"] == []
    assert [d.id for d in datasets_store.of_kinds(session, a)] == [unnamed.id, ds.id]
    assert datasets_store.of_kinds(session, a, kinds=("library",)) == []
    assert datasets_store.of_kinds(session, b) == []


def test_bad_uploads_raise_domain_errors_and_leave_nothing(session, settings, tenants) -> None:  # noqa: ANN001
    a, _b = tenants
    before = artifact_files(settings)
    with pytest.raises(Invalid) as empty:
        upload(session, settings, a, b"")
    assert empty.value.code == "empty_file"
    with pytest.raises(IngestError) as missing:
        upload(session, settings, a, b"name,activity\nethanol,1\n")
    assert missing.value.code == "missing_column"
    with pytest.raises(UploadTooLarge):
        upload(session, dataclasses.replace(settings, max_upload_bytes=10), a)
    assert artifact_files(settings) == before
    assert session.scalar(select(func.count()).select_from(Dataset)) == 0


def test_upload_options() -> None:
    assert datasets_store.upload_options({"kind": "sequences", "name": "x", "text_column": "smi"}) == {
        "text_column": "smi"}
    assert datasets_store.upload_options({"options": '{"a": 1}', "b": "2"}) == {"a": 1, "b": "2"}
    for bad in ("not json", "[1]"):
        with pytest.raises(Invalid, match="options must be a JSON object"):
            datasets_store.upload_options({"options": bad})


# -- models ------------------------------------------------------------------------------

def add_version(session, tenant_id: int, name: str, version: int, dataset_id: int | None = None) -> ModelVersion:  # noqa: ANN001
    mv = ModelVersion(tenant_id=tenant_id, name=name, version=version, arch="rnn", task="regression",
                      input_kind="sequences", spec={}, metrics={"rmse": 1.0 / version}, dataset_id=dataset_id,
                      artifact_uri=f"file:///nonexistent/{name}/{version}")
    session.add(mv)
    session.commit()
    return mv


def test_model_versions_summaries_and_detail(session, settings, tenants) -> None:  # noqa: ANN001
    a, b = tenants
    ds = upload(session, settings, a)
    for v in (1, 2, 3):
        add_version(session, a, "sol", v, dataset_id=ds.id if v < 3 else None)
    add_version(session, a, "alpha", 1)
    add_version(session, b, "sol", 1)
    assert models_store.version(session, a, "sol").version == 3
    assert models_store.version(session, a, "sol", 2).version == 2
    assert models_store.resolve_ref(session, a, "sol@1").version == 1
    with pytest.raises(NotFound, match="version 9"):
        models_store.version(session, a, "sol", 9)
    with pytest.raises(NotFound):
        models_store.version(session, b, "alpha")
    assert [(m["name"], m["latest_version"], m["versions"]) for m in models_store.summaries(session, a)] == [
        ("alpha", 1, 1), ("sol", 3, 3)]
    with_latest = models_store.summaries(session, a, with_latest=True)
    assert [m["latest"].version for m in with_latest] == [1, 3]
    detail = models_store.detail(session, a, "sol")
    assert [v.version for v in detail["versions"]] == [3, 2, 1] and detail["aliases"] == {}
    with pytest.raises(NotFound, match="Model 'alpha' not found"):
        models_store.detail(session, b, "alpha")
    assert [mv.version for mv in models_store.trained_on(session, a, ds.id)] == [2, 1]
    assert models_store.trained_on(session, b, ds.id) == []


def test_aliases(session, tenants) -> None:  # noqa: ANN001
    a, b = tenants
    for v in (1, 2):
        add_version(session, a, "sol", v)
    assert models_store.set_alias(session, a, "sol", "production", 1)["aliases"] == {"production": 1}
    assert models_store.set_alias(session, a, "sol", "production", 2)["aliases"] == {"production": 2}
    assert models_store.version(session, a, "sol", alias="production").version == 2
    assert models_store.references(session, a) == ["sol", "sol@production", "sol@2"]
    for bad in ("1x", "has space", "x" * 65, ""):
        with pytest.raises(Invalid, match="Invalid alias"):
            models_store.set_alias(session, a, "sol", bad, 1)
    with pytest.raises(NotFound):
        models_store.set_alias(session, a, "sol", "staging", 7)
    with pytest.raises(NotFound):
        models_store.set_alias(session, b, "sol", "staging", 1)
    with pytest.raises(NotFound, match="has no alias"):
        models_store.version(session, b, "sol", alias="production")


def test_bundle_file(session, settings, tenants) -> None:  # noqa: ANN001
    a, b = tenants
    bundle_dir = settings.artifacts / "models" / "sol-1"
    bundle_dir.mkdir(parents=True)
    (bundle_dir / "config.json").write_text("{}")
    mv = add_version(session, a, "sol", 1)
    mv.artifact_uri = bundle_dir.as_uri()
    session.commit()
    found = models_store.bundle_file(session, settings, a, "sol", 1, "config")
    assert found.path == bundle_dir / "config.json" and found.download_name == "sol-v1-config.json"
    with pytest.raises(NotFound, match="model.safetensors is missing"):
        models_store.bundle_file(session, settings, a, "sol", 1, "weights")
    with pytest.raises(NotFound, match="No file 'nope'"):
        models_store.bundle_file(session, settings, a, "sol", 1, "nope")
    with pytest.raises(NotFound):
        models_store.bundle_file(session, settings, b, "sol", 1, "config")


# -- errors: one mapping to the API's error body ------------------------------------------

def test_domain_errors_map_to_one_error_body() -> None:
    cases = [
        (NotFound("Job 1 not found"), 404, "not_found"),
        (Conflict("Job 1 already succeeded"), 409, "conflict"),
        (Conflict("not yet", "not_ready"), 409, "not_ready"),
        (Invalid("The uploaded file is empty", "empty_file"), 422, "empty_file"),
        (SpecError("Unknown job kind 'x'", "unknown_kind"), 422, "unknown_kind"),
        (UploadTooLarge(10), 413, "payload_too_large"),
        (IngestError("archive_too_large", "too big", http_status=413), 413, "archive_too_large"),
    ]
    for exc, status, code in cases:
        err = as_api_error(exc)
        assert (err.status, err.code, err.message) == (status, code, str(exc))


def test_pages_render_store_errors_as_pages_and_the_json_twins_as_the_error_body(app, client, session,  # noqa: ANN001
                                                                                  tenants, published) -> None:
    a, b = tenants
    job = submit(app, session, a)
    auth.create_key(session, session.get(Tenant, b))
    session.commit()
    key_id = session.scalar(select(ApiKey.id).where(ApiKey.tenant_id == b))
    sign_in(app, client, key_id)
    page = client.get(f"/jobs/{job.id}")
    assert page.status_code == 404 and page.mimetype == "text/html"
    twin = client.get(f"/ui/api/jobs/{job.id}")
    assert twin.status_code == 404 and twin.get_json()["error"] == {
        "code": "not_found", "message": f"Job {job.id} not found", "details": None}
    assert client.get(f"/datasets/{job.id}").status_code == 404
    assert client.get("/models/ghost/versions/1/files/weights").status_code == 404


# -- layers ------------------------------------------------------------------------------

def test_stores_import_the_core_only() -> None:
    """No app.api, app.web, Flask or workers in a store (each function gets its session and
    tenant explicitly), and no view calls another view."""
    forbidden = ("app.api", "app.web", "app.factory", "flask", "werkzeug", "workers", "medmaas")
    for path in sorted((ROOT / "app" / "stores").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden)]
            assert not bad, f"{path.name} imports {bad}"
    for rel in ("app/web/jobs.py", "app/web/library.py", "app/api/models.py"):
        text = (ROOT / rel).read_text()
        assert "inspect.unwrap" not in text and "_undecorated" not in text, rel
