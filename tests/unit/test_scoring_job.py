"""The `score` job in process (SQLite, no broker): a tiny untrained RNN over a gzip .smi
library; resume from existing shards; cancel; the spec checks."""
from __future__ import annotations

import gzip
from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from sqlalchemy import update

from app import auth, jobs
from app.artifacts import ArtifactStore
from app.config import from_env
from app.db import Database
from app.ingest.library import ingest_library
from app.models import Dataset, Job, JobState, ModelVersion, ScoreShard, ShardState, utcnow
from app.sample_data import moses_library
from app.artifacts import job_dir
from app.kinds import SpecError, SubmitContext, get_kind
from workers.scoring import runner, shards
from workers.tasks import execute_job
from tests.conftest import use_template

N = 1_500


@pytest.fixture(scope="module")
def moses_rows() -> list[str]:
    with gzip.open(moses_library(), "rt") as fh:
        next(fh)
        return [next(fh).strip() for _ in range(N)]


@pytest.fixture()
def env(tmp_path, moses_rows, sqlite_template):  # noqa: ANN001, ANN201
    """(settings, db, tenant id, library dataset id, model ref, bundle dir)."""
    import torch

    from workers.ml.bundle import bundle_config, save_bundle
    from workers.ml.data import load_sequence_frame
    from workers.ml.models import build_model

    settings = from_env({}, home=tmp_path / "home", score_shard_rows=300, score_batch_size=256,
                        heartbeat_interval_s=0.2, heartbeat_timeout_s=2.0)
    use_template(settings, sqlite_template)
    db = Database(settings.sqlalchemy_url)
    store = ArtifactStore(settings.artifacts)
    with db.session() as s:
        tenant = auth.create_tenant(s, "lab").id
    frame = pd.DataFrame({"smiles": moses_rows[:200], "logp": np.linspace(-2, 5, 200)})
    data = load_sequence_frame(frame, target_columns="logp", task="regression")
    torch.manual_seed(0)
    model = build_model("rnn", {"vocab_size": data.tokenizer.vocab_size, "num_outputs": 1, "hidden_size": 16,
                                "embedding_dim": 8})
    bundle = save_bundle(store.tenant_dir(tenant, "models", "tiny"), model, bundle_config(model, data))
    lib = store.tenant_dir(tenant, "datasets", "lib") / "lib.smi.gz"
    lines = [f"{smi} m{i}" if i % 211 != 3 else f"C1CC( m{i}" for i, smi in enumerate(moses_rows)]
    lines.insert(10, "")  # blank lines and comments are not rows
    lines.insert(20, "# a comment")
    with gzip.open(lib, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    report = ingest_library(str(lib), lib.name)
    assert report.rows == N
    with db.session() as s:
        ds = Dataset(tenant_id=tenant, name="lib", kind="library", filename=lib.name, bytes=lib.stat().st_size,
                     sha256="0" * 64, rows=report.rows, schema=report.schema, stats={}, options={},
                     uri=store.url(lib), data_uri=store.url(lib))
        s.add(ds)
        s.add(ModelVersion(tenant_id=tenant, name="tiny", version=1, arch="rnn", task="regression",
                           input_kind="smiles", spec={}, artifact_uri=store.url(bundle)))
        s.flush()
        ds_id = ds.id
    yield settings, db, tenant, ds_id, "tiny@1", bundle
    db.dispose()


def submit(env, **spec) -> int:  # noqa: ANN001
    settings, db, tenant, ds_id, ref, _ = env
    kind = get_kind("score")
    with db.session() as s:
        full = kind.check(kind.schema().load({"model": ref, "library_id": ds_id, **spec}), SubmitContext(s, tenant, settings))
        job, _ = jobs.submit(s, tenant_id=tenant, kind="score", spec=full, queue="cpu")
        return job.id


def job_state(db, job_id: int) -> Job:  # noqa: ANN001
    with db.session() as s:
        return s.get(Job, job_id)


def test_scores_a_gzip_smi_library_in_order(env, moses_rows) -> None:  # noqa: ANN001
    settings, db, tenant, _, _, bundle = env
    job_id = submit(env, top_k=5, output="parquet")
    assert execute_job(db, settings, None, job_id) == "succeeded"
    job = job_state(db, job_id)
    res = job.result
    bad = [i for i in range(N) if i % 211 == 3]
    assert (res["rows"], res["valid"], res["invalid"]) == (N, N - len(bad), len(bad))
    assert res["shards"]["count"] == 5 and res["shards"]["attempts"] == 5
    assert res["source"]["compressed"] is True and res["source"]["decompress_s"] >= 0
    assert res["invalid_reasons"] == {"SMILES parse error": len(bad)} and res["duplicates"] is None
    out_dir = job_dir(settings, tenant, job_id)
    assert sorted(p.name for p in out_dir.iterdir()) == ["scores.parquet"]  # scratch (gzip copy, parts) removed
    t = pq.read_table(out_dir / "scores.parquet").to_pandas()
    assert t["row"].tolist() == list(range(N)) and t["id"].tolist() == [f"m{i}" for i in range(N)]
    assert t.loc[~t["valid"], "row"].tolist() == bad and t.loc[~t["valid"], "logp"].isna().all()

    from workers.ml.predict import Predictor

    direct, _ = Predictor.from_bundle(bundle, device="cpu").score_smiles(moses_rows)
    ok = t["valid"].to_numpy()
    np.testing.assert_allclose(t.loc[ok, "logp"].to_numpy(), direct[ok, 0], rtol=1e-5, atol=1e-5)
    order = [i for i in np.lexsort((np.arange(N), -np.where(ok, direct[:, 0], -np.inf)))[:5]]
    assert [r["row"] for r in res["top_k"]] == order


def test_a_rerun_parent_keeps_finished_shards_and_reclaims_stale_ones(env) -> None:  # noqa: ANN001
    settings, db, _, _, _, _ = env
    job_id = submit(env, output="csv")
    with db.session() as s:
        jobs.claim(s, job_id, "first-parent")  # the first attempt, which is about to die
    score_env, _ = runner.load_env(db, settings, job_id, prepare=True)
    with db.session() as s:
        shards.create_shards(s, job_id, runner._blocks(score_env, N))
    for index in (0, 3):  # finished by "another worker"
        with db.session() as s:
            c = shards.claim(s, job_id, index, "other")
        assert runner.score_shard(score_env, c, lambda: False) == "done"
    with db.session() as s:
        shards.claim(s, job_id, 1, "first-parent")  # held by the parent when it died
        s.execute(update(ScoreShard).values(heartbeat_at=utcnow() - timedelta(seconds=30)))
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=30)))
        jobs.reap_stale(s, settings.heartbeat_timeout_s)  # the parent job goes back to queued
        before = {sh.index: (sh.attempts, sh.output_uri, sh.finished_at) for sh in shards.shards_of(s, job_id)}
    assert execute_job(db, settings, None, job_id) == "succeeded"
    with db.session() as s:
        after = {sh.index: (sh.attempts, sh.output_uri, sh.finished_at, sh.state) for sh in shards.shards_of(s, job_id)}
    assert after[0][:3] == before[0] and after[3][:3] == before[3]
    assert {i: a[0] for i, a in after.items()} == {0: 1, 1: 2, 2: 1, 3: 1, 4: 1}
    assert all(a[3] == ShardState.done for a in after.values())
    job = job_state(db, job_id)
    assert job.attempts == 2 and job.result["rows"] == N
    t = pd.read_csv(job_dir(settings, job.tenant_id, job_id) / "scores.csv")
    assert t["row"].tolist() == list(range(N))


def test_cancel_stops_the_job_and_deletes_partial_outputs(env, monkeypatch) -> None:  # noqa: ANN001
    settings, db, tenant, _, _, _ = env
    job_id = submit(env)
    real_finish = runner.shards.finish

    def finish_then_cancel(s, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        # The user cancels in the same commit that finishes the first shard: no polling thread
        # racing the remaining shards to the end of the job.
        ok = real_finish(s, *args, **kwargs)
        jobs.request_cancel(s, job_id)
        return ok

    monkeypatch.setattr(runner.shards, "finish", finish_then_cancel)
    assert execute_job(db, settings, None, job_id) == "cancelled"
    assert job_state(db, job_id).state == JobState.cancelled
    with db.session() as s:
        states = [sh.state for sh in shards.shards_of(s, job_id)]
    # the first shard and any already running beside it finish; the rest are cancelled
    assert set(states) == {ShardState.done, ShardState.cancelled}, states
    out_dir = job_dir(settings, tenant, job_id)
    assert not [p for p in out_dir.rglob("*") if p.is_file()]


def test_spec_checks(env) -> None:  # noqa: ANN001
    settings, db, tenant, ds_id, ref, _ = env
    kind = get_kind("score")
    spec = kind.schema().load({"model": ref, "library_id": ds_id})
    assert (spec["top_k"], spec["output"], spec["validate"], spec["dedupe"], spec["max_length"]) == (
        100, "csv", "rdkit", False, 2000)
    assert kind.route(spec, settings) == "cpu" and kind.route({**spec, "device": "cuda"}, settings) == "gpu"
    with db.session() as s:
        checked = kind.check(spec, SubmitContext(s, tenant, settings))
        assert checked["model_name"] == "tiny" and checked["version"] == 1 and checked["library_rows"] == N
        for bad, code in [({"model": "nope"}, "unknown_model"), ({"model": "tiny@2"}, "unknown_model"),
                          ({"library_id": ds_id + 1}, "unknown_dataset"), ({"text_column": "x"}, "invalid_spec")]:
            with pytest.raises(SpecError) as err:
                kind.check({**spec, **bad}, SubmitContext(s, tenant, settings))
            assert err.value.code == code
        other = auth.create_tenant(s, "other").id
        with pytest.raises(SpecError) as err:
            kind.check(spec, SubmitContext(s, other, settings))
        assert err.value.code == "unknown_model"
