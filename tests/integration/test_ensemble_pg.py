"""An ensemble trained by two real worker processes (PostgreSQL + Redis): its members are
units of work on the shard lease, so both workers train some, and the one version it
registers predicts with a spread."""
from __future__ import annotations

import pytest
import redis
from sqlalchemy import select

from app import workers_registry
from app.db import Database
from app.models import ModelVersion, ScoreShard, ShardState
from tests.conftest import ApiClient, wait_until
from tests.integration.test_training_e2e import upload_file

pytestmark = pytest.mark.integration

MEMBERS = 3
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two workers share the machine's cores


def test_two_workers_train_the_members_of_one_ensemble_version(pg_api: ApiClient, pg_settings, processes,  # noqa: ANN001
                                                               tmp_path) -> None:
    from tests.unit.test_augment import frame

    path = tmp_path / "mols.csv"
    frame().to_csv(path, index=False)
    ds = upload_file(pg_api, "sequences", path, label_columns="y")
    procs = processes()
    procs.worker("cpu", env=ONE_THREAD)
    procs.worker("cpu", env=ONE_THREAD)
    client = redis.Redis.from_url(pg_settings.broker_url)
    try:
        wait_until(lambda: len(workers_registry.live_workers(client).get("cpu", ())) >= 2, 60,
                   what="both workers to announce themselves")
    finally:
        client.close()
    spec = {"model_name": "ens", "dataset_id": ds["id"], "arch": "rnn", "task": "regression", "target": "y",
            "epochs": 3, "batch_size": 8, "lr": 3e-3, "seed": 1, "ensemble": MEMBERS,
            "model": {"cell": "gru", "embedding_dim": 8, "hidden_size": 16}, "explain_faithfulness": False}
    job = pg_api.submit("train", spec)
    done = pg_api.wait(job["id"], timeout=80)
    assert done["state"] == "succeeded", (done["error"], procs.logs())

    db = Database(pg_settings.sqlalchemy_url)
    try:
        with db.session() as s:
            members = s.execute(select(ScoreShard.index, ScoreShard.state, ScoreShard.worker)
                                .where(ScoreShard.job_id == job["id"]).order_by(ScoreShard.index)).all()
    finally:
        db.dispose()
    assert [state for _, state, _ in members] == [ShardState.done] * MEMBERS
    assert len({worker for _, _, worker in members}) == 2, members  # both workers trained members
    assert done["result"]["ensemble"] == MEMBERS and len(done["result"]["members"]["workers"]) == 2

    version = pg_api.get("/api/v1/models/ens/versions/1").get_json()
    assert len(version["metrics"]["members"]) == MEMBERS and version["metrics"]["uncertainty"]["method"] == "ensemble"
    from app.artifacts import ArtifactStore
    from workers.ml.predict import Predictor

    with Database(pg_settings.sqlalchemy_url).session() as s:
        uri = s.scalar(select(ModelVersion.artifact_uri).where(ModelVersion.job_id == job["id"]))
    predictor = Predictor.from_bundle(ArtifactStore.from_settings(pg_settings).path(uri), device="cpu")
    assert predictor.members == MEMBERS
    for p in predictor.predict_smiles(["CCO", "c1ccccc1O", "CCCCCCCCCC"]):
        assert p["uncertainty"]["method"] == "ensemble" and p["uncertainty"]["std"]["y"] > 0, p
