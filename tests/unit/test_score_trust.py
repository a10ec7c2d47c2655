"""Trust columns and drawings in score jobs (issue 12): a calibrated ensemble with a domain
reference adds spread, interval and domain columns to the score table (fingerprints computed
in the RDKit pool, the same as in process), a plain model takes the plain path, and
`explain_top_k` draws the best rows as SVG files that only the job's tenant can fetch and
that erasing the job deletes. SQLite + fakeredis; jobs run in process."""

from __future__ import annotations

import gzip
import xml.etree.ElementTree as ET

import numpy as np
import pyarrow.parquet as pq
import pytest

from app.artifacts import ArtifactStore, job_dir
from app.models import ModelVersion
from app.sample_data import moses_library
from app.security_headers import DATA_CONTENT_SECURITY_POLICY
from tests.conftest import ApiClient, create_tenant_key, seed_tiny_model_and_library
from tests.unit.test_api_jobs import assert_error
from tests.unit.test_predict_explain import SVG, model_dir, register, tiny_bundle
from workers.scoring import canon, runner
from workers.tasks import execute_job

ROWS = 60


@pytest.fixture(scope="module")
def moses_rows() -> list[str]:
    with gzip.open(moses_library(), "rt") as fh:
        next(fh)
        return [next(fh).strip() for _ in range(ROWS)]


@pytest.fixture
def lab(app, moses_rows):
    """(tenant id, api client, library dataset id) with model tiny v1 (a plain untrained RNN)."""
    tid, key = create_tenant_key(app)
    settings = app.extensions["medmaas.settings"]
    ds_id = seed_tiny_model_and_library(app.extensions["medmaas.db"], settings.artifacts, tid, moses_rows)
    return tid, ApiClient(app.test_client(), key), ds_id


def add_trusted_model(app, tid: int) -> None:
    """trusted v1: a two-member ensemble with calibration and a Morgan domain reference."""
    bundle = tiny_bundle(model_dir(app, tid, "trusted"), members=2, trust=True)
    store = ArtifactStore(app.extensions["medmaas.settings"].artifacts)
    with app.extensions["medmaas.db"].session() as s:
        s.add(
            ModelVersion(
                tenant_id=tid,
                name="trusted",
                version=1,
                arch="rnn",
                task="regression",
                input_kind="smiles",
                spec={},
                artifact_uri=store.url(bundle),
            )
        )
        s.commit()


def run_score(app, api: ApiClient, spec: dict) -> dict:
    job = api.submit("score", spec)
    db, settings = app.extensions["medmaas.db"], app.extensions["medmaas.settings"]
    assert execute_job(db, settings, None, job["id"]) == "succeeded", api.job(job["id"])
    return api.job(job["id"])


def test_explain_top_k_draws_the_best_rows_for_the_jobs_tenant_only(app, lab) -> None:
    tid, api, ds_id = lab
    job = run_score(
        app, api, {"model": "tiny@1", "library_id": ds_id, "top_k": 5, "explain_top_k": 3, "output": "parquet"}
    )
    result = job["result"]
    assert result["outputs"] == result["columns"] == ["y"]  # a plain model: no trust columns
    drawn = result["explanations"]
    assert [e["rank"] for e in drawn] == [1, 2, 3]
    assert [e["row"] for e in drawn] == [r["row"] for r in result["top_k"][:3]]
    assert [e["score"] for e in drawn] == [r["y"] for r in result["top_k"][:3]]
    for e in drawn:
        assert e["file"] == f"explain/{e['rank']}.svg"
        assert e["media_type"] == "image/svg+xml"
        assert e["url"] == f"/api/v1/jobs/{job['id']}/files/explain/{e['rank']}.svg"
        assert e["output"] == "y"
        assert e["atom_weights"]
        assert e["smiles"] == result["top_k"][e["rank"] - 1]["canonical_smiles"]
        r = api.get(e["url"])
        assert r.status_code == 200
        assert r.mimetype == "image/svg+xml"
        assert r.headers["Content-Security-Policy"] == DATA_CONTENT_SECURITY_POLICY
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert ET.fromstring(r.get_data(as_text=True)).tag == SVG

    assert_error(api.get(f"/api/v1/jobs/{job['id']}/files/explain/4.svg"), 404)  # not drawn
    _other_tid, other_key = create_tenant_key(app)
    other = ApiClient(app.test_client(), other_key)
    assert_error(other.get(drawn[0]["url"]), 404)  # another tenant's job does not exist for it

    directory = job_dir(app.extensions["medmaas.settings"], tid, job["id"])
    assert sorted(p.name for p in (directory / "explain").iterdir()) == ["1.svg", "2.svg", "3.svg"]
    assert api.client.delete(f"/api/v1/jobs/{job['id']}", headers=api.headers).status_code == 204
    assert not directory.exists()
    assert_error(api.get(drawn[0]["url"]), 404)


def test_explain_top_k_and_the_model_are_checked_at_submit(app, lab) -> None:
    tid, api, ds_id = lab
    register(app, tid, "lm", task="language_model")
    for spec, field in (
        ({"top_k": 2, "explain_top_k": 3}, "explain_top_k"),
        ({"explain_top_k": 101}, "explain_top_k"),
        ({"coverage": 0.3}, "coverage"),
        ({"model": "lm"}, "model"),
    ):
        body = {"kind": "score", "spec": {"model": "tiny@1", "library_id": ds_id, **spec}}
        r = api.post("/api/v1/jobs", json=body)
        assert r.status_code == 422, r.get_json()
        assert field in r.get_json()["error"]["details"]["spec"], r.get_json()
    assert "fine-tune it with init_from" in r.get_json()["error"]["message"]


def test_a_trusted_model_adds_spread_interval_and_domain_columns(app, lab, moses_rows) -> None:
    tid, api, ds_id = lab
    add_trusted_model(app, tid)
    job = run_score(
        app,
        api,
        {
            "model": "trusted@1",
            "library_id": ds_id,
            "top_k": 4,
            "coverage": 0.8,
            "output": "parquet",
            "rank_by": "y_lo",
            "dedupe": True,  # the dedupe path keeps each row's own fingerprint
        },
    )
    result = job["result"]
    extra = ["y_std", "y_lo", "y_hi", "nn_similarity", "in_domain"]
    assert result["outputs"] == ["y"]
    assert result["columns"] == ["y", *extra]
    assert result["coverage"] == 0.8
    table = pq.read_table(job_dir(app.extensions["medmaas.settings"], tid, job["id"]) / "scores.parquet")
    assert table.column_names[4:10] == ["y", *extra]
    assert str(table.schema.field("in_domain").type) == "bool"
    frame = table.to_pandas()
    ok = frame["valid"].to_numpy()
    assert (frame.loc[ok, "y_lo"] <= frame.loc[ok, "y"]).all()
    assert (frame.loc[ok, "y"] <= frame.loc[ok, "y_hi"]).all()
    assert frame.loc[~ok, extra].isna().all().all()

    # the domain columns from fingerprints made in the RDKit pool equal those made in process
    from workers.ml.predict import Predictor

    predictor = Predictor.from_bundle(model_dir(app, tid, "trusted"), "cpu")
    scores, _errors, extras = predictor.score_smiles_full(moses_rows, coverage=0.8)
    np.testing.assert_allclose(frame.loc[ok, "nn_similarity"], extras["nn_similarity"][ok], rtol=1e-5)
    np.testing.assert_array_equal(frame.loc[ok, "in_domain"].astype(bool), extras["in_domain"][ok] > 0.5)
    np.testing.assert_allclose(frame.loc[ok, "y_hi"], extras["y_hi"][ok], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(frame.loc[ok, "y"], scores[ok, 0], rtol=1e-4, atol=1e-5)
    top = result["top_k"]
    assert [r["y_lo"] for r in top] == sorted((r["y_lo"] for r in top), reverse=True)
    assert {"y_std", "nn_similarity", "in_domain"} <= set(top[0])
    assert isinstance(top[0]["in_domain"], bool)


def test_a_plain_model_takes_the_plain_path(app, lab) -> None:
    _tid, api, ds_id = lab
    job = api.submit("score", {"model": "tiny@1", "library_id": ds_id})
    env, _ = runner.load_env(app.extensions["medmaas.db"], app.extensions["medmaas.settings"], job["id"], prepare=True)
    assert env.extra_keys == []
    assert env.fingerprint is None
    assert env.score_cols == ["y"]

    def refuse(*_a, **_kw):
        raise AssertionError("score_smiles_full on the plain path")

    env.predictor.score_smiles_full = refuse
    out = runner.model_scores(env, ["CCO", "c1ccccc1"], None, 64)
    assert out.shape == (2, 1)
    assert np.isfinite(out).all()


def test_the_pool_fingerprints_next_to_canonicalisation() -> None:
    from workers.ml.domain import morgan_packed

    rows = ["OCC", "C1CC(", "c1ccccc1O", "", "[Na+].[Cl-]"] * 20
    fingerprint = {"radius": 2, "nbits": 2048}
    pool = canon.RDKitPool(2)
    try:
        pooled = canon.Canonicalised(rows, "rdkit", 100, pool, fingerprint)
        in_line = canon.Canonicalised(rows, "rdkit", 100, None, fingerprint)
        assert pooled.result() == in_line.result() == canon.check_and_canonicalise(rows)
        fps = pooled.fingerprints()
        assert fps is not None
        assert fps.shape == (len(rows), 256)
        assert fps.dtype == np.uint8
        np.testing.assert_array_equal(fps, in_line.fingerprints())
        canonical, _ = pooled.result()
        np.testing.assert_array_equal(fps, morgan_packed([c or "" for c in canonical]))
        assert not fps[1].any()
        assert fps[0].any()
        assert canon.Canonicalised(rows, "rdkit", 100, pool).fingerprints() is None
    finally:
        pool.close()


def test_cli_score_submits_explain_top_k_and_coverage_and_summarises_the_drawings(app, lab, monkeypatch) -> None:
    from click.testing import CliRunner

    from medmaas import commands
    from medmaas.client import Client
    from tests.unit.test_predict_explain import FlaskSession

    _tid, api, ds_id = lab
    session = FlaskSession(app.test_client())
    monkeypatch.setattr(commands, "get_client", lambda: Client("http://medmaas.test", api.key, session=session))
    args = ["score", "tiny@1", str(ds_id), "--top-k", "3", "--explain-top-k", "2", "--coverage", "0.8"]
    res = CliRunner().invoke(commands.client, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    job_id = int(res.output.split("Submitted job ")[1].split()[0])
    spec = api.job(job_id)["spec"]
    assert (spec["top_k"], spec["explain_top_k"], spec["coverage"]) == (3, 2, 0.8)

    url = f"/api/v1/jobs/{job_id}/files/explain/1.svg"
    job = {"id": job_id, "kind": "score", "result": {"rows": 60, "explanations": [{"rank": 1, "url": url}]}}
    assert f"Drawings of the top 1 with their attributions: GET {url} ..." in commands.result_summary(job)
