"""Downloading a version's ONNX export: API (roles, 404 across tenants, audit, OpenAPI), the
model page's ONNX section and `medmaas models export NAME[@VERSION]`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import requests
from click.testing import CliRunner
from sqlalchemy import select

from app import auth
from app.models import AuditEvent, KeyRole, ModelVersion
from app.stores import models as models_store
from medmaas import commands
from medmaas.client import Client
from tests.conftest import flush_read_audit, sign_in
from tests.unit.test_api_jobs import assert_error
from tests.unit.test_encryption import encrypted_app  # noqa: F401  (a fixture)
from tests.unit.test_erasure import FlaskSession, Tenant
from workers.ml.bundle import bundle_config, save_bundle
from workers.ml.data import load_sequence_frame
from workers.ml.models import build_model
from workers.ml.onnx_export import export_bundle
from workers.ml.training import seed_everything

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "ClCCBr", "CCN(CC)CC", "c1ccncc1", "C1CCCCC1", "O=C(O)CCl"] * 3


def exported_version(lab: Tenant, name: str, version: int, *, export: bool = True) -> tuple[Path, dict[str, Any]]:
    """Register a real RNN bundle as `name` v`version`, exported (metrics.onnx) when asked."""
    data = load_sequence_frame(pd.DataFrame({"smiles": SMILES, "y": np.linspace(0, 1, len(SMILES))}),
                               target_columns="y", task="regression")  # fmt: skip
    seed_everything(0)
    model = build_model("rnn", {"vocab_size": data.tokenizer.vocab_size, "num_outputs": 1, "hidden_size": 8,
                                "embedding_dim": 4, "bidirectional": True})  # fmt: skip
    bundle = lab.store.new_dir(lab.id, f"models/{name}")
    save_bundle(bundle, model, bundle_config(model, data))
    metrics: dict[str, Any] = {"test": {"rmse": 0.3}}
    if export:
        metrics["onnx"] = export_bundle(bundle, data, model)
    lab.add_version(name, version, bundle=bundle)
    with lab.app.extensions["medmaas.db"].session() as s:
        mv = s.scalar(select(ModelVersion).where(ModelVersion.tenant_id == lab.id, ModelVersion.name == name,
                                                 ModelVersion.version == version))  # fmt: skip
        mv.metrics = metrics
    return bundle, metrics


@pytest.fixture
def lab(app, client) -> Tenant:
    return Tenant(app, client, "lab")


@pytest.fixture
def other(app, client) -> Tenant:
    return Tenant(app, client, "other")


def test_viewer_downloads_the_onnx_file_and_it_runs(app, lab: Tenant) -> None:
    bundle, metrics = exported_version(lab, "sol", 1)
    r = lab.viewer.get("/api/v1/models/sol/versions/1/onnx")
    assert r.status_code == 200, r.get_json()
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert "sol-v1.onnx" in r.headers["Content-Disposition"]
    assert r.data == (bundle / "model.onnx").read_bytes()
    s = ort.InferenceSession(r.data, providers=["CPUExecutionProvider"])
    assert [i.name for i in s.get_inputs()] == ["ids", "lengths"]
    flush_read_audit(app)
    with app.extensions["medmaas.db"].session() as s:  # the download is in the audit trail
        row = s.scalars(select(AuditEvent).where(AuditEvent.tenant_id == lab.id).order_by(AuditEvent.id.desc())).first()
        assert (row.object_type, row.object_id, row.status) == ("model", "sol@1", 200)
        assert row.action == "model.onnx.download"
    detail = lab.viewer.get("/api/v1/models/sol/versions/1").get_json()
    assert detail["metrics"]["onnx"]["opset"] == metrics["onnx"]["opset"] == 17
    assert detail["metrics"]["onnx"]["max_abs_diff"] <= 1e-4


def test_no_key_401_other_tenant_404(lab: Tenant, other: Tenant, client) -> None:
    exported_version(lab, "sol", 1)
    assert client.get("/api/v1/models/sol/versions/1/onnx").status_code == 401
    assert_error(other.api.get("/api/v1/models/sol/versions/1/onnx"), 404, "not_found")
    assert_error(other.viewer.get("/api/v1/models/sol/versions/1/onnx"), 404, "not_found")
    assert_error(lab.api.get("/api/v1/models/sol/versions/2/onnx"), 404, "not_found")
    assert_error(lab.api.get("/api/v1/models/nope/versions/1/onnx"), 404, "not_found")


def test_versions_without_an_export_say_why(lab: Tenant) -> None:
    exported_version(lab, "old", 1, export=False)  # registered before exports existed
    body = assert_error(lab.api.get("/api/v1/models/old/versions/1/onnx"), 404, "onnx_not_exported")
    assert "python -m workers.ml.onnx_export backfill --model old --version 1" in body["message"]
    _bundle, _ = exported_version(lab, "bad", 1, export=False)
    with lab.app.extensions["medmaas.db"].session() as s:
        mv = s.scalar(select(ModelVersion).where(ModelVersion.tenant_id == lab.id, ModelVersion.name == "bad"))
        mv.metrics = {"onnx": {"opset": 17, "error": "ONNX Runtime differs from PyTorch by 0.2"}}
    body = assert_error(lab.api.get("/api/v1/models/bad/versions/1/onnx"), 404, "onnx_not_exported")
    assert "failed its check" in body["message"]
    assert "0.2" in body["message"]
    lab.add_version("lm", 1)
    with lab.app.extensions["medmaas.db"].session() as s:
        mv = s.scalar(select(ModelVersion).where(ModelVersion.tenant_id == lab.id, ModelVersion.name == "lm"))
        mv.task = "language_model"
    body = assert_error(lab.api.get("/api/v1/models/lm/versions/1/onnx"), 404, "onnx_not_exported")
    assert "language model" in body["message"]


def test_route_is_in_the_openapi_document(client) -> None:
    doc = client.get("/api/v1/openapi.json").get_json()
    op = doc["paths"]["/api/v1/models/{name}/versions/{version}/onnx"]["get"]
    assert "application/octet-stream" in op["responses"]["200"]["content"]
    assert "ids" in op["responses"]["200"]["description"]
    assert "404" in op["responses"]


def test_model_page_shows_the_export_and_serves_the_file(app, client, lab: Tenant, other: Tenant) -> None:
    exported_version(lab, "sol", 1, export=False)
    bundle, metrics = exported_version(lab, "sol", 2)
    with app.extensions["medmaas.db"].session() as s:
        key, _ = auth.new_key(s, lab.id, "web", KeyRole.viewer)
        key_id = key.id
    sign_in(app, client, key_id)
    page = client.get("/models/sol").get_data(as_text=True)
    assert 'id="onnx"' in page
    assert 'id="onnx-io"' in page
    assert "/models/sol/versions/2/onnx" in page
    assert "backfill --model sol --version 1" in page
    assert f"{metrics['onnx']['max_abs_diff']:.1e}" in page
    got = client.get("/models/sol/versions/2/onnx")
    assert got.status_code == 200
    assert got.data == (bundle / "model.onnx").read_bytes()
    flush_read_audit(app)
    with app.extensions["medmaas.db"].session() as s:
        row = s.scalars(select(AuditEvent).where(AuditEvent.tenant_id == lab.id).order_by(AuditEvent.id.desc())).first()
        assert (row.action, row.object_id, row.status) == ("model.onnx.download", "sol@2", 200)
    assert client.get("/models/sol/versions/1/onnx").status_code == 404
    exported_version(other, "theirs", 1)
    assert client.get("/models/theirs/versions/1/onnx").status_code == 404


class StreamingFlaskSession(FlaskSession):
    def request(self, *args: Any, **kw: Any) -> requests.Response:  # type: ignore[override]
        resp = super().request(*args, **kw)
        resp._content_consumed = True  # iter_content then yields the test client's body
        return resp


def test_cli_models_export(app, client, lab: Tenant, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    session = StreamingFlaskSession(client)
    monkeypatch.setattr(
        commands, "get_client", lambda: Client("http://medmaas.test", lab.viewer_secret, session=session)
    )

    def export(*args: str) -> Any:
        return CliRunner().invoke(commands.client, ["models", "export", *args], catch_exceptions=False)

    bundle, _ = exported_version(lab, "sol", 1)
    exported_version(lab, "sol", 2)
    with app.extensions["medmaas.db"].session() as s:
        models_store.set_alias(s, lab.id, "sol", "production", 1)
    for ref, version in (("sol@1", 1), ("sol@production", 1), ("sol", 2)):
        out = tmp_path / f"{ref.replace('@', '_')}.onnx"
        result = export(ref, "-o", str(out))
        assert result.exit_code == 0, result.output
        assert f"sol v{version}" in result.output
        assert "opset 17" in result.output
        ort.InferenceSession(out.read_bytes(), providers=["CPUExecutionProvider"])
    assert (tmp_path / "sol_1.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
    exported_version(lab, "old", 1, export=False)
    result = export("old", "-o", str(tmp_path / "x.onnx"))
    assert result.exit_code == 3
    assert "registered before ONNX export" in result.output
    result = export("sol@staging", "-o", str(tmp_path / "x.onnx"))
    assert result.exit_code == 3
    assert "no version or alias 'staging'" in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_a_trained_version_is_exported_at_registration_and_backfill_recreates_it(app, api) -> None:
    """The train worker's registration exports and checks the version on its validation split;
    for a version without an export, the worker-side backfill rebuilds that split from the
    dataset and writes the same record."""
    from app.artifacts import ArtifactStore
    from tests.unit.test_api_datasets_models import upload
    from tests.unit.test_pretrain import csv_bytes
    from workers.ml.bundle import read_bundle_config
    from workers.ml.onnx_export import backfill
    from workers.ml.predict import Predictor
    from workers.tasks import execute_job

    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    ds = upload(api, "sequences", "mols.csv", csv_bytes(), label_columns="y").get_json()
    spec = {"model_name": "mols", "dataset_id": ds["id"], "arch": "rnn", "task": "regression", "target": "y",
            "epochs": 1, "batch_size": 16, "seed": 4, "explain_faithfulness": False,
            "model": {"cell": "lstm", "bidirectional": True, "embedding_dim": 8, "hidden_size": 16}}  # fmt: skip
    job = api.submit("train", spec)
    assert execute_job(db, settings, None, job["id"]) == "succeeded"
    detail = api.get("/api/v1/models/mols/versions/1").get_json()
    onnx = detail["metrics"]["onnx"]
    assert onnx["checked_on"] == "val"
    assert onnx["rows_checked"] > 0
    assert onnx["max_abs_diff"] <= 1e-4
    assert onnx["opset"] == 17
    bundle = ArtifactStore.from_settings(settings).path(
        db.sessionmaker().scalar(select(ModelVersion.artifact_uri).where(ModelVersion.job_id == job["id"]))
    )
    assert read_bundle_config(bundle)["metrics"]["onnx"] == onnx
    assert api.get("/api/v1/models/mols/versions/1/onnx").data == (bundle / "model.onnx").read_bytes()
    # the CPU default scores with ONNX Runtime, within 1e-4 of PyTorch
    smiles = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "CCN(CC)CC"]
    by_onnx, by_torch = (Predictor.from_bundle(bundle, "cpu", backend=b) for b in ("auto", "torch"))
    assert by_onnx.backend == "onnx"
    np.testing.assert_allclose(by_onnx.score_smiles(smiles)[0], by_torch.score_smiles(smiles)[0], atol=1e-4, rtol=0)

    (bundle / "model.onnx").unlink()  # as a version registered before exports
    with db.session() as s:
        mv = s.scalar(select(ModelVersion).where(ModelVersion.job_id == job["id"]))
        mv.metrics = {k: v for k, v in mv.metrics.items() if k != "onnx"}
    assert_error(api.get("/api/v1/models/mols/versions/1/onnx"), 404, "onnx_not_exported")
    done = backfill(settings, model="mols")
    assert [label for label, _ in done] == [f"tenant {mv.tenant_id} mols v1"]
    again = done[0][1]
    assert again["checked_on"] == "val"
    assert again["rows_checked"] == onnx["rows_checked"]
    assert again["max_abs_diff"] <= 1e-4
    assert api.get("/api/v1/models/mols/versions/1").get_json()["metrics"]["onnx"] == again
    assert api.get("/api/v1/models/mols/versions/1/onnx").status_code == 200
    assert backfill(settings, model="mols") == []  # nothing left to do


def test_under_encryption_at_rest_the_export_is_sealed_on_disk_and_plain_to_users(encrypted_app) -> None:  # noqa: F811
    from app.artifacts import configure
    from workers.ml.predict import Predictor

    app = encrypted_app
    configure(app.extensions["medmaas.settings"])  # as a worker does before it writes artifacts
    lab = Tenant(app, app.test_client(), "sealed")
    bundle, metrics = exported_version(lab, "sol", 1)
    assert metrics["onnx"]["max_abs_diff"] <= 1e-4
    on_disk = (bundle / "model.onnx").read_bytes()
    downloaded = lab.viewer.get("/api/v1/models/sol/versions/1/onnx").data
    assert on_disk != downloaded  # sealed at rest
    assert ort.InferenceSession(downloaded, providers=["CPUExecutionProvider"]).get_inputs()[0].name == "ids"
    assert Predictor.from_bundle(bundle, "cpu").backend == "onnx"  # the worker reads it through the store
