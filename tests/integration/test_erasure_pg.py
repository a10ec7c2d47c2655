"""Erasure on PostgreSQL with real worker processes: a trained version that served online
predictions is deleted, its files leave the disk and the next predict is a 404 (the
inference worker's cached weights are not served; a retrained version 1 is a new model);
deletions racing submits never leave a job pointing at a deleted object."""

from __future__ import annotations

import shutil
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.artifacts import ArtifactStore, job_dir
from app.models import Dataset, Job, ModelVersion
from app.sample_data import solubility_csv
from tests.conftest import ApiClient, create_tenant_key

pytestmark = pytest.mark.integration


def upload_solubility(api: ApiClient, tmp_path: Path) -> dict:
    path = solubility_csv(tmp_path / "solubility.csv")
    with open(path, "rb") as fh:
        r = api.post(
            "/api/v1/datasets",
            data={"kind": "sequences", "file": (fh, path.name), "label_columns": "solubility"},
            content_type="multipart/form-data",
        )
    assert r.status_code == 201, r.get_json()
    return r.get_json()


def train(api: ApiClient, dataset_id: int, seed: int, hidden: int) -> dict:
    spec = {
        "model_name": "sol",
        "dataset_id": dataset_id,
        "arch": "rnn",
        "task": "regression",
        "target": "solubility",
        "epochs": 1,
        "batch_size": 64,
        "seed": seed,
        "model": {"cell": "gru", "embedding_dim": 8, "hidden_size": hidden},
    }
    return api.submit("train", spec)


def bundle_of(pg_app, tenant_id: int, name: str, version: int) -> Path:
    with pg_app.extensions["medmaas.db"].session() as s:
        uri = s.scalar(
            select(ModelVersion.artifact_uri).where(
                ModelVersion.tenant_id == tenant_id, ModelVersion.name == name, ModelVersion.version == version
            )
        )
    return ArtifactStore(pg_app.extensions["medmaas.settings"].artifacts).path(uri)


def test_a_deleted_version_stops_serving_and_leaves_the_disk(pg_app, processes, tmp_path) -> None:
    tenant_id, key = create_tenant_key(pg_app)
    api = ApiClient(pg_app.test_client(), key)
    procs = processes()
    procs.worker("cpu,gpu")
    procs.worker("inference")
    ds = upload_solubility(api, tmp_path)
    job = train(api, ds["id"], seed=1, hidden=16)
    done = api.wait(job["id"], timeout=300)
    assert done["state"] == "succeeded", (done["error"], procs.logs())
    bundle = bundle_of(pg_app, tenant_id, "sol", 1)
    assert (bundle / "model.safetensors").is_file()

    inputs = {"inputs": ["CCO", "c1ccccc1"], "version": 1, "timeout": 60}
    first = api.post("/api/v1/models/sol/predict", json=inputs)
    assert first.status_code == 200, (first.get_json(), procs.logs())
    again = api.post("/api/v1/models/sol/predict", json=inputs)  # served from the worker's model cache
    assert again.get_json()["predictions"] == first.get_json()["predictions"]

    assert api._call("delete", "/api/v1/models/sol/versions/1").status_code == 204
    assert not bundle.exists() and not bundle.parent.exists()
    r = api.post("/api/v1/models/sol/predict", json=inputs)
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found", r.get_json()
    r = api.post("/api/v1/jobs", json={"kind": "predict", "spec": {"model": "sol@1", "inputs": ["CCO"]}})
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "unknown_model"

    # Version numbers restart from the highest left, so the next training is version 1 again:
    # a different model in a new directory, which the worker loads instead of its cached copy.
    retrained = api.wait(train(api, ds["id"], seed=7, hidden=24)["id"], timeout=300)
    assert retrained["state"] == "succeeded" and retrained["result"]["version"] == 1
    assert bundle_of(pg_app, tenant_id, "sol", 1) != bundle
    fresh = api.post("/api/v1/models/sol/predict", json=inputs)
    assert fresh.status_code == 200, fresh.get_json()
    assert fresh.get_json()["predictions"] != first.get_json()["predictions"]

    # The first training job's checkpoint directory goes with the job.
    directory = job_dir(pg_app.extensions["medmaas.settings"], tenant_id, job["id"])
    assert directory.exists()
    assert api._call("delete", f"/api/v1/jobs/{job['id']}").status_code == 204
    assert not directory.exists()
    assert api._call("delete", f"/api/v1/datasets/{ds['id']}").status_code == 204
    assert api.get("/api/v1/models/sol/versions/1").get_json()["dataset_id"] is None
    after = api.post("/api/v1/models/sol/predict", json=inputs)  # the model outlives its training data
    assert after.status_code == 200
    assert after.get_json()["predictions"] == fresh.get_json()["predictions"]


ROUNDS = 25


def race(
    rounds: int, setup: Callable[[int], Any], submit: Callable[[Any], Any], delete: Callable[[Any], Any]
) -> list[tuple[int, int]]:
    """(submit status, delete status) per round, each pair started together."""

    def run(start: threading.Barrier, call: Callable[[Any], Any], target: Any, results: dict, name: str) -> None:
        start.wait()
        results[name] = call(target).status_code

    outcomes = []
    for i in range(rounds):
        target, results, start = setup(i), {}, threading.Barrier(2)
        threads = [
            threading.Thread(target=run, args=(start, call, target, results, name))
            for name, call in (("submit", submit), ("delete", delete))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        outcomes.append((results["submit"], results["delete"]))
    return outcomes


def dangling_jobs(pg_app, tenant_id: int) -> list[int]:
    with pg_app.extensions["medmaas.db"].session() as s:
        datasets = set(s.scalars(select(Dataset.id)))
        versions = set(s.scalars(select(ModelVersion.id)))
        jobs = s.execute(select(Job.id, Job.spec).where(Job.tenant_id == tenant_id)).all()
    return [
        job_id
        for job_id, spec in jobs
        if ("dataset_id" in spec and spec["dataset_id"] not in datasets)
        or ("model_version_id" in spec and spec["model_version_id"] not in versions)
    ]


def test_deletions_racing_submits_never_leave_a_job_pointing_at_a_deleted_object(pg_app, tmp_path) -> None:
    tenant_id, key = create_tenant_key(pg_app)
    settings = pg_app.extensions["medmaas.settings"]
    store = ArtifactStore(settings.artifacts)
    ds = upload_solubility(ApiClient(pg_app.test_client(), key), tmp_path)
    with pg_app.extensions["medmaas.db"].session() as s:
        template = s.get(Dataset, ds["id"])
        s.expunge(template)
    source = store.path(template.uri).parent

    def clone_dataset(_i: int) -> int:
        """A copy of the uploaded dataset (row and files), cheaper than an upload per round."""
        copy = store.new_dir(tenant_id, "datasets")
        shutil.copytree(source, copy, dirs_exist_ok=True)
        with pg_app.extensions["medmaas.db"].session() as s:
            row = Dataset(
                **{
                    c: getattr(template, c)
                    for c in (
                        "tenant_id",
                        "name",
                        "kind",
                        "filename",
                        "bytes",
                        "sha256",
                        "rows",
                        "schema",
                        "stats",
                        "options",
                    )
                },
                uri=store.url(copy / Path(template.uri).name),
                data_uri=store.url(copy / store.path(template.data_uri or template.uri).name),
            )
            s.add(row)
            s.flush()
            return row.id

    def add_version(i: int) -> str:
        name = f"race-{i}-{uuid.uuid4().hex[:6]}"
        bundle = store.new_dir(tenant_id, f"models/{name}")
        (bundle / "model.safetensors").write_bytes(b"w")
        with pg_app.extensions["medmaas.db"].session() as s:
            s.add(
                ModelVersion(
                    tenant_id=tenant_id,
                    name=name,
                    version=1,
                    arch="rnn",
                    task="regression",
                    input_kind="smiles",
                    spec={"max_len": 64},
                    artifact_uri=store.url(bundle),
                )
            )
        return name

    def client() -> ApiClient:
        return ApiClient(pg_app.test_client(), key)

    dataset_rounds = race(
        ROUNDS,
        clone_dataset,
        lambda ds_id: client().post(
            "/api/v1/jobs",
            json={
                "kind": "train",
                "spec": {
                    "model_name": "m",
                    "dataset_id": ds_id,
                    "arch": "rnn",
                    "task": "regression",
                    "target": "solubility",
                },
            },
        ),
        lambda ds_id: client()._call("delete", f"/api/v1/datasets/{ds_id}"),
    )
    model_rounds = race(
        ROUNDS,
        add_version,
        lambda name: client().post(f"/api/v1/models/{name}/predict", json={"inputs": ["CCO"], "timeout": 0}),
        lambda name: client()._call("delete", f"/api/v1/models/{name}/versions/1"),
    )
    for outcome in dataset_rounds:
        assert outcome in {(202, 409), (422, 204)}, dataset_rounds
    for outcome in model_rounds:
        assert outcome in {(202, 409), (404, 204), (422, 204)}, model_rounds
    assert dangling_jobs(pg_app, tenant_id) == []
    print("dataset rounds (submit, delete):", Counter(dataset_rounds))
    print("model rounds (submit, delete):", Counter(model_rounds))
