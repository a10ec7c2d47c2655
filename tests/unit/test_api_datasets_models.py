"""Datasets and registry API: validation at upload, nothing stored for bad input."""
from __future__ import annotations

import io
import zipfile

import numpy as np
from sqlalchemy import func, select

from app.models import Dataset, Job
from app.sample_data import digits_npz
from tests.conftest import ApiClient, create_tenant_key
from tests.unit.test_api_jobs import assert_error


def upload(api: ApiClient, kind: str, name: str, payload: bytes, **options: str):  # noqa: ANN201
    data = {"kind": kind, "file": (io.BytesIO(payload), name), **options}
    return api.post("/api/v1/datasets", data=data, content_type="multipart/form-data")


def stored(app) -> tuple[int, int, list]:  # noqa: ANN001
    settings = app.extensions["medmaas.settings"]
    with app.extensions["medmaas.db"].session() as s:
        datasets = s.scalar(select(func.count()).select_from(Dataset))
        jobs = s.scalar(select(func.count()).select_from(Job))
    files = sorted(p for p in settings.artifacts.rglob("*") if p.is_file())
    return datasets, jobs, files


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_sequences_upload_reports_invalid_rows(api: ApiClient) -> None:
    csv = b"smiles,activity\nCCO,1.5\nnot_a_smiles,2.0\nc1ccccc1,0.3\n,1.0\nC1CC,4\n"
    r = upload(api, "sequences", "acts.csv", csv)
    assert r.status_code == 201, r.get_json()
    ds = r.get_json()
    assert ds["rows"] == 2 and ds["invalid_rows"] == 3
    reasons = " ".join(s["reason"] for s in ds["invalid_samples"])
    assert "SMILES" in reasons
    assert len(ds["sha256"]) == 64 and ds["bytes"] == len(csv)
    assert ds["schema"]["label_types"] == {"activity": "float"}
    assert api.get(f"/api/v1/datasets/{ds['id']}").get_json()["id"] == ds["id"]
    assert [d["id"] for d in api.get("/api/v1/datasets").get_json()["items"]] == [ds["id"]]


def test_images_npz_upload(api: ApiClient, tmp_path) -> None:  # noqa: ANN001
    path = digits_npz(tmp_path / "digits.npz")
    r = upload(api, "images", "digits.npz", path.read_bytes())
    assert r.status_code == 201, r.get_json()
    ds = r.get_json()
    assert ds["rows"] == 1797 and ds["schema"]["classes"] == 10 and ds["schema"]["shape"][:2] == [8, 8]


def test_bad_uploads_are_refused_and_leave_nothing(api: ApiClient, app, tmp_path) -> None:  # noqa: ANN001
    before = stored(app)
    assert_error(upload(api, "images", "broken.npz", b"PK\x03\x04 this is not an npz"), 422)
    assert_error(upload(api, "sequences", "x.csv", b"name,activity\nethanol,1\n"), 422, "missing_column")
    evil = zip_bytes({"cats/../../evil.png": b"x", "cats/ok.png": b"y"})
    err = assert_error(upload(api, "images", "evil.zip", evil), 422)
    assert ".." in err["message"] or "path" in err["message"].lower()
    # ~1000-fold compression trips the ratio check (over 200-fold for members over 1 MiB); a
    # bigger bomb tests nothing more and costs seconds of compression
    bomb = zip_bytes({"a/big.png": b"\0" * (16 * 1024 * 1024)})
    assert upload(api, "images", "bomb.zip", bomb).status_code in (413, 422)
    assert_error(upload(api, "sequences", "empty.csv", b""), 422)
    assert_error(upload(api, "bogus", "x.csv", b"smiles\nCCO\n"), 422)
    obj = io.BytesIO()
    np.savez(obj, train_images=np.array([object()], dtype=object), train_labels=np.zeros(1))
    assert_error(upload(api, "images", "pickled.npz", obj.getvalue()), 422)
    assert stored(app) == before
    assert not list((tmp_path / "evil.png").parent.glob("evil.png"))


def test_upload_cap_is_413(app, client) -> None:  # noqa: ANN001
    app.config["MAX_CONTENT_LENGTH"] = 1024
    api = ApiClient(client, create_tenant_key(app)[1])
    assert_error(upload(api, "sequences", "big.csv", b"smiles\n" + b"CCO\n" * 1000), 413)


def test_train_spec_problems_are_422_and_store_no_job(api: ApiClient, app) -> None:  # noqa: ANN001
    ds = upload(api, "sequences", "acts.csv", b"smiles,activity,label\nCCO,1.5,a\nc1ccccc1,0.3,b\n").get_json()
    before = stored(app)
    base = {"model_name": "m", "dataset_id": ds["id"], "arch": "rnn", "task": "regression", "target": "activity"}
    cases = [
        ({**base, "dataset_id": 99999}, "unknown_dataset"),
        ({**base, "target": "label"}, "invalid_labels"),  # regression on a categorical column
        ({**base, "target": "nope"}, "invalid_spec"),
        ({**base, "arch": "cnn"}, "invalid_spec"),  # CNNs train on images
        ({**base, "epochs": "many"}, "invalid_spec"),
        ({**base, "model": {"hidden_sise": 3}}, "invalid_spec"),
        ({**base, "model_name": "../etc"}, "invalid_spec"),
    ]
    for spec, code in cases:
        assert_error(api.post("/api/v1/jobs", json={"kind": "train", "spec": spec}), 422, code)
    other = ApiClient(api.client, create_tenant_key(app)[1])
    assert_error(other.post("/api/v1/jobs", json={"kind": "train", "spec": base}), 422, "unknown_dataset")
    assert_error(other.get(f"/api/v1/datasets/{ds['id']}"), 404)
    assert stored(app) == before


def test_predict_and_registry_on_missing_model_are_404(api: ApiClient) -> None:
    assert_error(api.post("/api/v1/models/ghost/predict", json={"inputs": ["CCO"]}), 404)
    assert_error(api.get("/api/v1/models/ghost"), 404)
    assert_error(api.get("/api/v1/models/ghost/versions/1"), 404)
    assert_error(api.put("/api/v1/models/ghost/aliases/prod", json={"version": 1}), 404)
    assert_error(api.post("/api/v1/models/ghost/predict", json={"inputs": []}), 422)
    assert_error(api.post("/api/v1/jobs", json={"kind": "predict", "spec": {"model": "ghost", "inputs": ["C"]}}), 422,
                 "unknown_model")
    assert api.get("/api/v1/models").get_json() == {"items": []}
