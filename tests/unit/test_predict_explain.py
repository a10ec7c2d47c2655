"""Trust in an online prediction (issue 12): POST /models/{name}/predict with `explain` returns
atom weights and a drawing per item, an invalid SMILES keeps its error while the rest of the
batch is explained, models that cannot be explained are a 422 naming `explain`, a calibrated
ensemble with a domain reference carries spread, interval and domain keys, and the CLI writes
the drawings. SQLite + fakeredis; predict jobs run in a thread of this process."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests
import torch
from click.testing import CliRunner
from sqlalchemy import select

from app.artifacts import ArtifactStore
from app.models import Job, JobState, ModelVersion
from medmaas import commands
from medmaas.client import Client
from tests.conftest import ApiClient, create_tenant_key
from tests.unit.test_api_jobs import assert_error
from workers.tasks import execute_job

SVG = "{http://www.w3.org/2000/svg}svg"
TRAIN = ["CCO", "c1ccccc1O", "CCN", "ClCCBr", "CC(=O)O", "c1ccncc1", "CCOC(=O)C", "CC(C)O", "OCCO", "CCCCN"]


# -- models ---------------------------------------------------------------------------------------


def tiny_bundle(directory: Path, *, members: int = 1, trust: bool = False) -> Path:
    """An untrained RNN over TRAIN (an Ensemble when members > 1). trust=True packages it as
    training does (workers.ml.quality.package): conformal calibration on the validation
    split and a Morgan domain reference of the training molecules."""
    from workers.ml.bundle import bundle_config, save_bundle
    from workers.ml.data import load_sequence_frame
    from workers.ml.models import build_model
    from workers.ml.quality import package

    y = np.linspace(0, 1, len(TRAIN))
    split = {"train": 0.6, "val": 0.2, "test": 0.2}
    frame = pd.DataFrame({"smiles": TRAIN, "y": y})
    data = load_sequence_frame(frame, target_columns="y", task="regression", max_len=64, split=split)
    torch.manual_seed(0)
    assert data.tokenizer is not None
    params = {"vocab_size": data.tokenizer.vocab_size, "num_outputs": 1, "hidden_size": 8, "embedding_dim": 4}
    model = build_model("rnn", params, members=members)
    config = bundle_config(model, data)
    if not trust:
        return save_bundle(directory, model, config)
    packaged = package(model, data, "cpu")
    assert packaged.calibration is not None, packaged.metrics
    assert packaged.domain is not None, packaged.metrics
    config = {**config, "calibration": packaged.calibration, "domain": packaged.domain}
    return save_bundle(directory, model, config, reference=packaged.reference)


def register(
    app,
    tenant_id: int,
    name: str = "tiny",
    *,
    input_kind: str = "smiles",
    task: str = "regression",
    bundle: Path | None = None,
    params: dict[str, Any] | None = None,
) -> None:
    """A ModelVersion v1 for `name`; without a bundle its files do not exist (enough for the
    submit-time checks)."""
    store = ArtifactStore(app.extensions["medmaas.settings"].artifacts)
    uri = store.url(bundle) if bundle is not None else f"file:///nowhere/{name}"
    with app.extensions["medmaas.db"].session() as s:
        s.add(
            ModelVersion(
                tenant_id=tenant_id,
                name=name,
                version=1,
                arch="rnn",
                task=task,
                input_kind=input_kind,
                spec={"max_len": 64, "model": params or {}},
                artifact_uri=uri,
            )
        )
        s.commit()


def model_dir(app, tenant_id: int, name: str) -> Path:
    return ArtifactStore(app.extensions["medmaas.settings"].artifacts).tenant_dir(tenant_id, "models", name)


@contextmanager
def inference_worker(app) -> Iterator[None]:
    """Run every queued job in a thread of this process, as an inference worker would."""
    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            with db.session() as s:
                queued = s.scalars(select(Job.id).where(Job.state == JobState.queued)).all()
            for job_id in queued:
                execute_job(db, settings, None, job_id)
            stop.wait(0.05)

    thread = threading.Thread(target=loop, name="test-inference-worker", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)


@pytest.fixture
def tenant(app) -> tuple[int, ApiClient]:
    tid, key = create_tenant_key(app)
    return tid, ApiClient(app.test_client(), key)


@pytest.fixture
def tiny(app, tenant) -> ApiClient:
    tid, api = tenant
    register(app, tid, bundle=tiny_bundle(model_dir(app, tid, "tiny")))
    return api


def predict(app, api: ApiClient, body: dict[str, Any], name: str = "tiny") -> dict[str, Any]:
    with inference_worker(app):
        r = api.post(f"/api/v1/models/{name}/predict", json={"timeout": 60, **body})
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def assert_svg(text: str) -> None:
    root = ET.fromstring(text)  # well-formed, standalone XML
    assert root.tag == SVG
    assert not text.startswith("<?xml")
    assert "<script" not in text.lower()


# -- explain ---------------------------------------------------------------------------------------


def test_explain_returns_atom_weights_and_an_svg_per_molecule(app, tiny) -> None:
    answer = predict(app, tiny, {"inputs": ["CCO", "c1ccccc1O"], "explain": True})
    assert answer["model"] == "tiny"
    assert answer["outputs"] == ["y"]
    for item, atoms in zip(answer["predictions"], (3, 7), strict=True):
        explanation = item["explanation"]
        assert explanation["method"] == "integrated_gradients"
        assert explanation["steps"] == 32
        assert explanation["output"] == "y"
        assert "outputs" not in explanation
        weights = explanation["atom_weights"]
        assert sorted(weights, key=int) == [str(i) for i in range(atoms)]
        assert max(abs(w) for w in weights.values()) == pytest.approx(1.0, abs=1e-3)
        assert_svg(explanation["svg"])
        assert isinstance(item["value"], float)

    png = predict(app, tiny, {"inputs": ["CCN"], "explain": True, "explain_format": "png", "explain_steps": 8})
    explanation = png["predictions"][0]["explanation"]
    assert explanation["steps"] == 8
    assert "svg" not in explanation
    assert base64.b64decode(explanation["png_base64"]).startswith(b"\x89PNG\r\n\x1a\n")


def test_an_invalid_smiles_keeps_its_error_and_the_rest_is_explained(app, tiny) -> None:
    items = predict(app, tiny, {"inputs": ["CCO", "C1CC(", "c1ccccc1O"], "explain": True})["predictions"]
    assert "error" in items[1]
    assert "explanation" not in items[1]
    assert "syntax" in items[1]["error"]
    for i in (0, 2):
        assert "error" not in items[i]
        assert_svg(items[i]["explanation"]["svg"])


def test_a_plain_predict_is_unchanged_without_options(app, tiny) -> None:
    item = predict(app, tiny, {"inputs": ["CCO"]})["predictions"][0]
    assert "explanation" not in item
    assert "interval" not in item
    assert "domain" not in item
    assert item["smiles"] == "CCO"
    assert isinstance(item["value"], float)


# -- what cannot be honoured is a 422 naming the field ---------------------------------------------


def test_explain_of_a_model_that_cannot_be_explained_is_422_naming_explain(app, tenant) -> None:
    tid, api = tenant
    register(app, tid, "codes", input_kind="tokens")
    register(app, tid, "lm", task="language_model")
    err = assert_error(
        api.post("/api/v1/models/codes/predict", json={"inputs": ["I10 E11"], "explain": True}), 422, "not_explainable"
    )
    assert "codes v1" in err["message"]
    assert list(err["details"]["json"]) == ["explain"]
    err = assert_error(
        api.post(
            "/api/v1/jobs", json={"kind": "predict", "spec": {"model": "codes", "inputs": ["I10"], "explain": True}}
        ),
        422,
        "not_explainable",
    )
    assert list(err["details"]["spec"]) == ["explain"]

    err = assert_error(
        api.post("/api/v1/models/lm/predict", json={"inputs": ["CCO"], "explain": True}), 422, "language_model"
    )
    assert "init_from" in err["message"]
    assert list(err["details"]["json"]) == ["explain"]
    err = assert_error(api.post("/api/v1/models/lm/predict", json={"inputs": ["CCO"]}), 422, "language_model")
    assert "fine-tune it with init_from" in err["message"]
    assert list(err["details"]["json"]) == ["model"]


def test_options_a_model_cannot_honour_are_422_naming_the_option(app, tenant) -> None:
    tid, api = tenant
    register(app, tid)
    register(app, tid, "codes", input_kind="tokens")
    register(app, tid, "nodrop", params={"dropout": 0.0})
    cases = [
        ("nodrop", {"uncertainty": "mc_dropout"}, "uncertainty"),
        ("tiny", {"explain_steps": 300}, "explain_steps"),
        ("tiny", {"coverage": 1.5}, "coverage"),
        ("tiny", {"uncertainty": "bayes"}, "uncertainty"),
        ("tiny", {"explain": "yes"}, "explain"),
        ("tiny", {"prediction_sets": True}, "prediction_sets"),  # a regression model
        ("tiny", {"explain": True, "explain_method": "gradcam"}, "explain_method"),
        ("codes", {"tta": 4}, "tta"),
        ("tiny", {"explain": True, "inputs": ["C"] * 101}, "inputs"),
    ]
    for name, body, field in cases:
        r = api.post(f"/api/v1/models/{name}/predict", json={"inputs": ["CCO"], **body})
        assert r.status_code == 422, (body, r.get_json())
        assert field in r.get_json()["error"]["details"]["json"], (body, r.get_json())


def test_openapi_documents_the_options(app, tenant) -> None:
    _tid, api = tenant
    doc = api.get("/api/v1/openapi.json").get_json()
    body = doc["paths"]["/api/v1/models/{name}/predict"]["post"]["requestBody"]["content"]["application/json"]
    ref = body["schema"]["$ref"].rsplit("/", 1)[-1]
    props = doc["components"]["schemas"][ref]["properties"]
    assert {
        "explain",
        "explain_method",
        "explain_steps",
        "explain_format",
        "coverage",
        "uncertainty",
        "tta",
        "prediction_sets",
    } <= set(props)
    assert props["explain_steps"]["maximum"] == 256
    assert props["coverage"]["minimum"] == 0.5
    op = doc["paths"]["/api/v1/jobs/{job_id}/files/explain/{rank}.svg"]["get"]
    assert "image/svg+xml" in op["responses"]["200"]["content"]
    assert {"404", "409"} <= set(op["responses"])


# -- uncertainty, interval, domain -----------------------------------------------------------------


def test_a_calibrated_ensemble_with_a_domain_reference_carries_spread_interval_and_domain(app, tenant) -> None:
    tid, api = tenant
    register(app, tid, "trusted", bundle=tiny_bundle(model_dir(app, tid, "trusted"), members=2, trust=True))
    inputs = [*TRAIN, "C1CC(", "[Na+].[Cl-]"]
    items = predict(app, api, {"inputs": inputs, "coverage": 0.8}, name="trusted")["predictions"]
    for item in items[: len(TRAIN)]:
        assert item["uncertainty"]["method"] == "ensemble"
        assert item["uncertainty"]["samples"] == 2
        assert item["uncertainty"]["std"]["y"] >= 0
        lo, hi = item["interval"]["values"]["y"]
        assert item["interval"]["coverage"] == 0.8
        assert lo <= item["value"] <= hi
        assert set(item["domain"]) == {"nn_similarity", "in_domain", "threshold"}
        assert item["domain"]["in_domain"] == (item["domain"]["nn_similarity"] >= item["domain"]["threshold"])
    similarity = [item["domain"]["nn_similarity"] for item in items[: len(TRAIN)]]
    assert max(similarity) == pytest.approx(1.0)  # the training molecules are their own neighbours
    assert "error" in items[-2]
    assert items[-1]["domain"]["nn_similarity"] < 0.5  # nothing like salt in TRAIN
    assert items[-1]["domain"]["in_domain"] is False


# -- the CLI ---------------------------------------------------------------------------------------


class FlaskSession(requests.Session):
    """A requests.Session answered by the Flask test client (the client commands end to end)."""

    def __init__(self, flask_client: Any) -> None:
        super().__init__()
        self.flask_client = flask_client

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        path = "/" + url.split("://", 1)[1].split("/", 1)[1]
        headers = {**self.headers, **(kwargs.get("headers") or {})}
        r = self.flask_client.open(
            path, method=method, json=kwargs.get("json"), query_string=kwargs.get("params"), headers=headers
        )
        resp = requests.Response()
        resp.status_code, resp.url, resp._content = r.status_code, url, r.get_data()
        resp.headers.update(dict(r.headers))
        resp.raw = io.BytesIO(resp._content)
        return resp


def test_cli_predict_explain_writes_one_svg_per_input_and_prints_the_columns(
    app, tenant, monkeypatch, tmp_path
) -> None:
    tid, api = tenant
    register(app, tid, "trusted", bundle=tiny_bundle(model_dir(app, tid, "trusted"), members=2, trust=True))
    session = FlaskSession(app.test_client())
    monkeypatch.setattr(commands, "get_client", lambda: Client("http://medmaas.test", api.key, session=session))
    out = tmp_path / "drawings"
    with inference_worker(app):
        res = CliRunner().invoke(
            commands.client,
            [
                "predict",
                "trusted",
                "CCO",
                "C1CC(",
                "c1ccccc1O",
                "--explain",
                "-o",
                str(out),
                "--timeout",
                "60",
                "--json",
            ],
            catch_exceptions=False,
        )
        assert res.exit_code == 0, res.output
        table = CliRunner().invoke(
            commands.client,
            ["predict", "trusted", "CCO", "C1CC(", "--coverage", "0.8", "--table", "--timeout", "60"],
            catch_exceptions=False,
            env={"COLUMNS": "200"},
        )
    assert sorted(p.name for p in out.iterdir()) == ["1.svg", "3.svg"]  # input 2 is not a molecule
    assert_svg((out / "1.svg").read_text())
    answer = json.loads(res.stdout[res.stdout.index("{") :])
    first = answer["predictions"][0]["explanation"]
    assert first["file"] == str(out / "1.svg")
    assert "svg" not in first
    assert first["atom_weights"]
    assert table.exit_code == 0, table.output
    for column in ("spread", "80% interval", "domain", "error"):
        assert column in table.output, table.output
    assert "±" in table.output
    assert re.search(r"\b(in|OUT) \(0?\.?\d", table.output), table.output  # in / out of domain (similarity)


# -- images ----------------------------------------------------------------------------------------


def test_image_explanations_are_heat_maps_over_the_image_as_png() -> None:
    from PIL import Image

    from workers.kinds.predict import explain_options, predict_inputs
    from workers.ml.bundle import bundle_config
    from workers.ml.data import load_image_npz
    from workers.ml.models import build_model
    from workers.ml.predict import Predictor

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 10, 10, 3), dtype=np.uint8)
    data = load_image_npz({"train_images": images, "train_labels": rng.integers(0, 2, 20)})
    torch.manual_seed(0)
    model = build_model("cnn", {"in_channels": 3, "image_size": [10, 10], "num_outputs": 2, "channels": [4]})
    predictor = Predictor(model, bundle_config(model, data))
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")
    inputs = [{"image_base64": base64.b64encode(buf.getvalue()).decode()}, {"image_base64": "bm90IGFuIGltYWdl"}]
    for method, name in (("gradcam", "grad_cam"), ("ig", "integrated_gradients")):
        explain = explain_options({"explain": True, "explain_method": method, "explain_steps": 8}, "image")
        out = predict_inputs(predictor, inputs, explain=explain)
        explanation = out[0]["explanation"]
        assert explanation["method"] == name
        assert explanation["output"] == f"p_{out[0]['label']}"
        assert explanation["heatmap_shape"] == [10, 10]
        assert base64.b64decode(explanation["png_base64"]).startswith(b"\x89PNG\r\n\x1a\n")
        assert ("steps" in explanation) == (method == "ig")
        assert out[1]["error"].startswith("unreadable image")
        assert "explanation" not in out[1]


def test_an_image_model_refuses_svg_and_tta(app, tenant) -> None:
    tid, api = tenant
    register(app, tid, "xray", input_kind="image", task="classification")
    image = {"image_base64": "iVBORw0KGgo="}
    for body, field in (({"explain": True, "explain_format": "svg"}, "explain_format"), ({"tta": 2}, "tta")):
        r = api.post("/api/v1/models/xray/predict", json={"inputs": [image], **body})
        assert r.status_code == 422, r.get_json()
        assert field in r.get_json()["error"]["details"]["json"], r.get_json()


# -- classifiers, and threads sharing one model ------------------------------------------------------


def test_a_classifier_explains_each_molecule_for_its_predicted_class() -> None:
    from workers.kinds.predict import explain_options, predict_inputs
    from workers.ml.bundle import bundle_config
    from workers.ml.data import load_sequence_frame
    from workers.ml.models import build_model
    from workers.ml.predict import Predictor

    frame = pd.DataFrame({"smiles": TRAIN, "label": ["a", "b", "c", "a", "b"] * 2})
    data = load_sequence_frame(frame, target_columns="label", task="classification", max_len=64)
    torch.manual_seed(1)
    assert data.tokenizer is not None
    model = build_model("rnn", {"vocab_size": data.tokenizer.vocab_size, "num_outputs": 3, "hidden_size": 8})
    predictor = Predictor(model, bundle_config(model, data))
    explain = explain_options({"explain": True, "explain_steps": 8}, "smiles")
    out = predict_inputs(predictor, TRAIN[:6], explain=explain)
    for item in out:
        assert item["explanation"]["output"] == f"p_{item['label']}"
        assert "outputs" not in item["explanation"]  # the predicted class only
        assert_svg(item["explanation"]["svg"])


def test_explanations_run_alone_and_predictions_together() -> None:
    from workers.kinds.predict import SharedOrAlone

    guard, events = SharedOrAlone(), []
    entered = threading.Event()
    release = threading.Event()

    def hold_shared() -> None:
        with guard.shared():
            events.append("shared in")
            entered.set()
            release.wait(10)
            events.append("shared out")

    def go_alone() -> None:
        with guard.alone():
            events.append("alone")

    holder = threading.Thread(target=hold_shared)
    holder.start()
    entered.wait(10)
    with guard.shared():  # another prediction does not wait for the first
        events.append("second shared")
    lone = threading.Thread(target=go_alone)
    lone.start()
    lone.join(0.2)
    assert lone.is_alive()  # waits for the prediction in progress
    release.set()
    holder.join(10)
    lone.join(10)
    assert events == ["shared in", "second shared", "shared out", "alone"]
