"""`ensemble: N` training (workers/kinds/train.py): members are units of work on the shard
lease, taken by the shard task of any worker and by the parent job; each checkpoints and
resumes; the parent assembles one Ensemble, packages it and registers one version."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from app.artifacts import job_dir
from app.models import Job, ModelVersion, ShardState
from tests.conftest import ApiClient
from tests.unit.test_api_datasets_models import upload
from tests.unit.test_pretrain import csv_bytes
from workers.kinds import train as train_kind
from workers.scoring import shards
from workers.tasks import execute_job, run_unit

TINY = {"cell": "gru", "embedding_dim": 8, "hidden_size": 16, "dropout": 0.1}


@pytest.fixture()
def mols(api: ApiClient) -> dict:
    r = upload(api, "sequences", "mols.csv", csv_bytes(), label_columns="y")
    assert r.status_code == 201, r.get_json()
    return r.get_json()


def submit(api: ApiClient, ds: dict, **kw) -> dict:  # noqa: ANN003
    spec = {"model_name": "ens", "dataset_id": ds["id"], "arch": "rnn", "task": "regression", "target": "y",
            "epochs": 2, "batch_size": 16, "lr": 3e-3, "seed": 4, "model": TINY, **kw}
    return api.submit("train", spec)


def member_blocks(n: int) -> list[tuple[int, int, None]]:
    return [(i, i, None) for i in range(n)]


def test_members_are_units_any_worker_takes_and_one_version_carries_them(app, api: ApiClient, mols: dict) -> None:  # noqa: ANN001
    from workers.ml.bundle import load_bundle
    from workers.ml.ensemble import Ensemble
    from workers.ml.predict import Predictor

    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    job = submit(api, mols, ensemble=2, augment={"random_smiles": 1})
    with db.session() as s:  # as the parent creates them; another worker's shard task then takes member 1
        shards.create_shards(s, job["id"], member_blocks(2))
    assert run_unit(db, settings, None, job["id"], 1, "other-host:1") == "done"
    assert run_unit(db, settings, None, job["id"], 1, "other-host:2") == "skipped"  # a duplicate delivery
    assert execute_job(db, settings, None, job["id"]) == "succeeded"

    done = api.job(job["id"])
    result = done["result"]
    assert result["ensemble"] == 2 and done["progress"] == 1.0
    with db.session() as s:
        members = shards.shards_of(s, job["id"])
        mv = s.scalar(select(ModelVersion).where(ModelVersion.job_id == job["id"]))
        tenant_id = s.get(Job, job["id"]).tenant_id
    assert [m.state for m in members] == [ShardState.done] * 2
    assert members[1].worker == "other-host:1" and members[0].worker not in (None, "other-host:1")
    assert sorted(result["members"]["workers"]) == sorted({"other-host:1", members[0].worker})
    assert [m.stats["seed"] for m in members] == [4, 5]
    # per-epoch metrics name their member (member 1 trained while the job was still queued: not filed)
    metric_events = [e["data"] for e in api.events(job["id"]) if e["type"] == "metric"]
    assert sorted((m["member"], m["epoch"]) for m in metric_events) == [(0, 1), (0, 2)]

    directory = job_dir(settings, tenant_id, job["id"])
    weights = [load_file(directory / f"member-{i:02d}.safetensors") for i in range(2)]
    assert not torch.equal(weights[0]["head.weight"], weights[1]["head.weight"])  # seeds differ

    metrics = mv.metrics
    assert len(metrics["members"]) == 2 and metrics["test"]["rmse"] > 0
    assert {"uncertainty", "calibration", "domain", "faithfulness"} <= set(metrics)
    assert metrics["uncertainty"]["method"] == "ensemble"
    from app.artifacts import ArtifactStore

    bundle = ArtifactStore.from_settings(settings).path(mv.artifact_uri)
    model, config = load_bundle(bundle)
    assert isinstance(model, Ensemble) and config["members"] == 2 and config["augment"] == {"random_smiles": 1}
    assert config["calibration"] and config["domain"]
    for i in range(2):
        for k, v in weights[i].items():
            assert torch.equal(model.state_dict()[f"members.{i}.{k}"], v), (i, k)
    preds = Predictor.from_bundle(bundle, device="cpu").predict_smiles(["CCO", "c1ccccc1O", "CCCCCCCCCC"])
    assert all(p["uncertainty"]["method"] == "ensemble" and p["uncertainty"]["std"]["y"] > 0 for p in preds)
    assert len({round(p["uncertainty"]["std"]["y"], 6) for p in preds}) > 1


def test_a_member_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_one_does(app, api: ApiClient,  # noqa: ANN001
                                                                                       mols: dict) -> None:
    from workers.ml.training import load_checkpoint

    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    jobs_ = [submit(api, mols, ensemble=2, epochs=2, augment={"random_smiles": 1}) for _ in range(2)]
    for job in jobs_:
        with db.session() as s:
            shards.create_shards(s, job["id"], member_blocks(2))
    interrupted, reference = (train_kind.MemberJob.load(db, settings, j["id"]) for j in jobs_)
    stop = [False]

    ckpt = train_kind.member_checkpoint(interrupted.job_dir, 0)

    def after_first_epoch() -> None:
        assert train_kind.member_summary(db, interrupted.job_id)["running"] == 1
        stop[0] = ckpt.exists()  # epoch 1 is checkpointed: stop at the next batch

    with db.session() as s:
        claim = shards.claim(s, interrupted.job_id, 0, "w1")
    assert train_kind.train_member(interrupted, claim, lambda: stop[0], on_progress=after_first_epoch) == "stopped"
    assert load_checkpoint(ckpt)["epoch"] == 1
    summary = train_kind.member_summary(db, interrupted.job_id)
    assert summary["pending"] == 2 and summary["fraction"] == 0.0
    with db.session() as s:
        claim = shards.claim(s, interrupted.job_id, 0, "w2")
    assert claim.attempt == 2
    assert train_kind.train_member(interrupted, claim, lambda: False) == "done"
    with db.session() as s:
        claim = shards.claim(s, reference.job_id, 0, "w3")
    assert train_kind.train_member(reference, claim, lambda: False) == "done"
    resumed = load_file(train_kind.member_weights(interrupted.job_dir, 0))
    straight = load_file(train_kind.member_weights(reference.job_dir, 0))
    assert resumed.keys() == straight.keys()
    for k in resumed:
        assert torch.allclose(resumed[k], straight[k], atol=1e-6), k
    summary = train_kind.member_summary(db, interrupted.job_id)
    assert summary["done"] == 1 and summary["fraction"] == pytest.approx(0.5)


def test_a_failed_member_fails_the_job_with_its_error(app, api: ApiClient, mols: dict, monkeypatch) -> None:  # noqa: ANN001
    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    job = submit(api, mols, ensemble=2, epochs=1)
    with db.session() as s:
        s.get(Job, job["id"]).max_attempts = 1

    def broken(*_a, **_kw):  # noqa: ANN002, ANN003, ANN202
        raise ValueError("no memory for member")

    monkeypatch.setattr(train_kind, "build_member", broken)
    assert execute_job(db, settings, None, job["id"]) == "failed"
    done = api.job(job["id"])
    assert "ensemble member 0 failed" in done["error"] and "no memory for member" in done["error"]
    with db.session() as s:
        states = [m.state for m in shards.shards_of(s, job["id"])]
    assert states[0] == ShardState.failed and states[1] in (ShardState.cancelled, ShardState.failed)


def test_ensemble_outputs_combine_as_the_mean_prediction() -> None:
    from workers.ml.heads import ClassificationHead, RegressionHead
    from workers.ml.training import combine_members

    raw = torch.tensor([[[0.0, 2.0]], [[2.0, 0.0]]])
    probs = torch.softmax(combine_members(raw, ClassificationHead(["a", "b"])), -1)
    assert torch.allclose(probs, torch.tensor([[0.5, 0.5]]))
    reg = RegressionHead(["y"])
    reg.fit(np.array([[0.0], [1.0]]))
    assert torch.allclose(combine_members(torch.tensor([[[1.0]], [[3.0]]]), reg), torch.tensor([[2.0]]))


def test_a_single_model_takes_todays_path_and_carries_its_package(app, api: ApiClient, mols: dict) -> None:  # noqa: ANN001
    from app.artifacts import ArtifactStore
    from workers.ml.bundle import read_bundle_config

    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    job = submit(api, mols, epochs=1, coverage=0.8)
    assert execute_job(db, settings, None, job["id"]) == "succeeded"
    with db.session() as s:
        assert shards.shards_of(s, job["id"]) == []  # no units: the job trains the one model itself
        mv = s.scalar(select(ModelVersion).where(ModelVersion.job_id == job["id"]))
    assert {"test", "uncertainty", "calibration", "domain", "faithfulness"} <= set(mv.metrics)
    assert mv.metrics["calibration"]["coverage"] == 0.8
    config = read_bundle_config(ArtifactStore.from_settings(settings).path(mv.artifact_uri))
    assert config["members"] == 1 and config["calibration"] and config["domain"] and config["augment"] is None
