"""Training and serving through the API and real worker subprocesses (PostgreSQL + Redis)."""
from __future__ import annotations

import base64
import io
import signal

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from app.sample_data import digits_npz, solubility_csv
from tests.conftest import ApiClient, wait_until

pytestmark = pytest.mark.integration


def upload_file(api: ApiClient, kind: str, path, **options: str) -> dict:  # noqa: ANN001
    with open(path, "rb") as fh:
        r = api.post("/api/v1/datasets", data={"kind": kind, "file": (fh, path.name), **options},
                     content_type="multipart/form-data")
    assert r.status_code == 201, r.get_json()
    return r.get_json()


@pytest.fixture()
def solubility(pg_api: ApiClient, tmp_path) -> dict:  # noqa: ANN001
    return upload_file(pg_api, "sequences", solubility_csv(tmp_path / "solubility.csv"), label_columns="solubility")


def png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_rnn_regression_on_solubility_beats_the_mean_and_serves(pg_api: ApiClient, solubility, processes) -> None:  # noqa: ANN001
    procs = processes()
    procs.worker("cpu,gpu")
    procs.worker("inference")
    spec = {"model_name": "solubility", "dataset_id": solubility["id"], "arch": "rnn", "task": "regression",
            "target": "solubility", "epochs": 12, "batch_size": 32, "lr": 3e-3, "seed": 1,
            "model": {"cell": "gru", "embedding_dim": 48, "hidden_size": 96}}
    job = pg_api.submit("train", spec)
    done = pg_api.wait(job["id"], timeout=600)
    assert done["state"] == "succeeded", (done["error"], procs.logs())
    test = done["result"]["metrics"]["test"]
    label_std = solubility["stats"]["labels"]["solubility"]["std"]  # RMSE of predicting the mean
    assert test["rmse"] < 0.75 * label_std and test["r2"] > 0.4, test
    metric_events = [e["data"] for e in pg_api.events(job["id"]) if e["type"] == "metric"]
    assert [m["epoch"] for m in metric_events] == list(range(1, 13))
    assert all({"train_loss", "val_loss", "val_rmse"} <= set(m) for m in metric_events)
    assert any("eta_s" in e["data"] for e in pg_api.events(job["id"]) if e["type"] == "progress")

    version = pg_api.get("/api/v1/models/solubility/versions/1").get_json()
    assert version["dataset_sha256"] == solubility["sha256"] and version["metrics"]["test"]["rmse"] == test["rmse"]
    weights = pg_api.get(version["artifacts"]["weights"])
    assert weights.status_code == 200 and load_safetensors(weights.data)  # plain tensors, no pickle
    assert pg_api.put("/api/v1/models/solubility/aliases/production", json={"version": 1}).status_code == 200

    r = pg_api.post("/api/v1/models/solubility/predict",
                    json={"inputs": ["CCO", "c1ccccc1", "definitely(not", "CCCCCCCCCCCCCCCC"], "alias": "production",
                          "timeout": 30})
    assert r.status_code == 200, r.get_json()
    preds = r.get_json()["predictions"]
    assert "error" in preds[2] and "SMILES" in preds[2]["error"]
    values = [p["value"] for i, p in enumerate(preds) if i != 2]
    assert all(np.isfinite(values))
    assert values[0] > values[2]  # ethanol dissolves far better than hexadecane


def test_cnn_classification_on_digits_and_image_predict(pg_api: ApiClient, processes, tmp_path) -> None:  # noqa: ANN001
    procs = processes()
    procs.worker("cpu,gpu")
    procs.worker("inference")
    ds = upload_file(pg_api, "images", digits_npz(tmp_path / "digits.npz"))
    job = pg_api.submit("train", {"model_name": "digits", "dataset_id": ds["id"], "arch": "cnn",
                                  "task": "classification", "epochs": 6, "batch_size": 64, "seed": 0})
    done = pg_api.wait(job["id"], timeout=600)
    assert done["state"] == "succeeded", (done["error"], procs.logs())
    assert done["result"]["metrics"]["test"]["accuracy"] > 0.85  # chance is 0.10

    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [np.clip(digits.images[i] * 255 / 16, 0, 255).astype(np.uint8) for i in range(10)]
    inputs = [{"image_base64": png_base64(img)} for img in images] + [{"image_base64": "bm90IGFuIGltYWdl"}]
    r = pg_api.post("/api/v1/models/digits/predict", json={"inputs": inputs, "timeout": 30})
    assert r.status_code == 200, r.get_json()
    preds = r.get_json()["predictions"]
    assert "error" in preds[-1]
    correct = sum(int(p["label"]) == int(digits.target[i]) for i, p in enumerate(preds[:-1]))
    assert correct >= 8


def test_sigkill_during_training_resumes_from_checkpoint(pg_api: ApiClient, solubility, processes) -> None:  # noqa: ANN001
    procs = processes()
    procs.beat()
    first = procs.worker("cpu,gpu")
    epochs = 6
    job = pg_api.submit("train", {"model_name": "resume", "dataset_id": solubility["id"], "arch": "rnn",
                                  "task": "regression", "target": "solubility", "epochs": epochs, "batch_size": 32})

    def epochs_seen() -> list[int]:
        return [e["data"]["epoch"] for e in pg_api.events(job["id"]) if e["type"] == "metric"]

    wait_until(lambda: len(epochs_seen()) >= 2, 300, what="two epochs")
    procs.kill(first, signal.SIGKILL)
    procs.worker("cpu,gpu")
    done = pg_api.wait(job["id"], timeout=600)
    assert done["state"] == "succeeded", (done["error"], procs.logs())
    assert done["attempts"] == 2 and done["result"]["epochs_trained"] == epochs
    events = pg_api.events(job["id"])
    second_start = [e["seq"] for e in events if e["type"] == "state" and e["data"]["to"] == "running"][1]
    first_run = [e["data"]["epoch"] for e in events if e["type"] == "metric" and e["seq"] < second_start]
    second_run = [e["data"]["epoch"] for e in events if e["type"] == "metric" and e["seq"] > second_start]
    assert second_run and second_run[0] > 1, "the second attempt must continue from the checkpoint"
    assert second_run[0] <= max(first_run) + 1 and second_run[-1] == epochs
    assert second_run == list(range(second_run[0], epochs + 1))
