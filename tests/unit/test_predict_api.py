"""Online predict without a worker (issue 10): the 202 answer carries the job, predict jobs stay
out of the jobs list, unknown models (404 in a path, 422 in a spec), over-long inputs (422 at
submit, a per-item error in the worker)."""
from __future__ import annotations

import pandas as pd
import pytest
from sqlalchemy import func, select

from app import jobs as state_machine
from app.models import Job, ModelVersion
from app.stores import jobs as jobs_store
from tests.conftest import ApiClient, create_tenant_key
from tests.unit.test_api_jobs import assert_error


@pytest.fixture()
def tenant(client, app):  # noqa: ANN001
    tid, key = create_tenant_key(app)
    return tid, ApiClient(client, key)


def add_model(app, tenant_id: int, name: str = "sol", input_kind: str = "smiles", max_len: int | None = 256,
              version: int = 1) -> None:  # noqa: ANN001
    spec = {"arch": "rnn", "model_name": name, **({"max_len": max_len} if max_len is not None else {})}
    with app.extensions["medmaas.db"].session() as s:
        s.add(ModelVersion(tenant_id=tenant_id, name=name, version=version, arch="rnn", task="regression",
                           input_kind=input_kind, spec=spec, artifact_uri=f"file:///nowhere/{name}/{version}"))
        s.commit()


def job_count(app) -> int:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        return s.scalar(select(func.count()).select_from(Job))


def finish(app, job_id: int, result: dict) -> None:  # noqa: ANN001
    """What the inference worker does: claim the job and succeed with its result."""
    with app.extensions["medmaas.db"].session() as s:
        attempt = state_machine.claim(s, job_id, "test-worker")
        assert attempt is not None
        assert state_machine.succeed(s, job_id, attempt, result)
        s.commit()


# -- 1. past the timeout: 202 with the job --------------------------------------------------

def test_predict_past_timeout_answers_202_with_the_job_and_location(app, tenant) -> None:  # noqa: ANN001
    tid, api = tenant
    add_model(app, tid)
    r = api.post("/api/v1/models/sol/predict", json={"inputs": ["CCO", "c1ccccc1"], "timeout": 0})
    assert r.status_code == 202, r.get_data(as_text=True)
    job = r.get_json()
    assert job["id"] and job["state"] == "queued" and job["kind"] == "predict", job
    assert job["spec"]["model"] == "sol@1" and job["spec"]["inputs"] == ["CCO", "c1ccccc1"]
    assert r.headers["Location"] == f"/api/v1/jobs/{job['id']}"
    assert api.get(r.headers["Location"]).get_json()["id"] == job["id"]  # readable by id
    assert_error(api.get(f"/api/v1/jobs/{job['id']}/result"), 409, "not_ready")

    result = {"model": "sol", "version": 1, "outputs": ["value"],
              "predictions": [{"input": "CCO", "value": 1.0}, {"input": "c1ccccc1", "value": 2.0}]}
    finish(app, job["id"], result)
    got = api.get(f"/api/v1/jobs/{job['id']}/result")
    assert got.status_code == 200 and got.get_json()["predictions"] == result["predictions"]


def test_openapi_declares_the_202_job(app, tenant) -> None:  # noqa: ANN001
    _tid, api = tenant
    doc = api.get("/api/v1/openapi.json").get_json()
    op = doc["paths"]["/api/v1/models/{name}/predict"]["post"]
    assert "202" in op["responses"] and "404" in op["description"] and "422" in op["description"]
    params = {p["name"]: p for p in doc["paths"]["/api/v1/jobs"]["get"]["parameters"]}
    assert "predict" in params["all"]["description"]


# -- 3. predict jobs stay out of the list ----------------------------------------------------

def test_jobs_list_and_counts_leave_out_predict_jobs(app, tenant) -> None:  # noqa: ANN001
    tid, api = tenant
    add_model(app, tid)
    sleep = api.submit("sleep", {"seconds": 0})
    predicted = api.post("/api/v1/models/sol/predict", json={"inputs": ["CCO"], "timeout": 0}).get_json()

    def ids(query: str = "") -> list[int]:
        r = api.get(f"/api/v1/jobs{query}")
        assert r.status_code == 200, r.get_json()
        return [j["id"] for j in r.get_json()["items"]]

    assert ids() == [sleep["id"]]
    assert ids("?state=queued") == [sleep["id"]]
    assert ids("?kind=predict") == [predicted["id"]]
    assert ids("?all=true") == [predicted["id"], sleep["id"]]
    assert ids("?kind=sleep&all=true") == [sleep["id"]]
    assert api.job(predicted["id"])["kind"] == "predict"

    with app.extensions["medmaas.db"].session() as s:
        assert jobs_store.state_counts(s, tid)["queued"] == 1
        assert jobs_store.state_counts(s, tid, include_hidden=True)["queued"] == 2
        assert jobs_store.state_counts(s, tid, kind="predict")["queued"] == 1
        assert [j.id for j in jobs_store.list_page(s, tid)["items"]] == [sleep["id"]]


# -- 4. unknown models: 404 in the path, 422 in a spec ---------------------------------------

def test_unknown_model_in_the_path_is_404_in_a_spec_422(app, tenant) -> None:  # noqa: ANN001
    tid, api = tenant
    add_model(app, tid)
    for path, body in (("/api/v1/models/ghost/predict", {"inputs": ["CCO"]}),
                       ("/api/v1/models/sol/predict", {"inputs": ["CCO"], "version": 9}),
                       ("/api/v1/models/sol/predict", {"inputs": ["CCO"], "alias": "prod"})):
        err = assert_error(api.post(path, json=body), 404, "not_found")
        assert path.split("/")[4] in err["message"] and "GET /api/v1/models" in err["message"], err
    err = assert_error(api.get("/api/v1/models/ghost"), 404)
    assert "'ghost'" in err["message"] and "GET /api/v1/models" in err["message"]

    err = assert_error(api.post("/api/v1/jobs", json={"kind": "predict", "spec": {"model": "ghost", "inputs": ["C"]}}),
                       422, "unknown_model")
    assert "'ghost'" in err["message"] and "GET /api/v1/models" in err["message"]
    assert err["details"] == {"spec": {"model": [err["message"]]}}
    err = assert_error(api.post("/api/v1/jobs", json={"kind": "score", "spec": {"model": "ghost", "library_id": 1}}),
                       422, "unknown_model")
    assert "'ghost'" in err["message"]
    assert job_count(app) == 0


# -- 5. over-long inputs ---------------------------------------------------------------------

def test_overlong_smiles_is_refused_at_submit_naming_the_input(app, tenant) -> None:  # noqa: ANN001
    tid, api = tenant
    add_model(app, tid)  # max_len 256: over 1024 characters is refused
    ok = "C" * 1024
    err = assert_error(api.post("/api/v1/models/sol/predict", json={"inputs": ["CCO", "C" * 10_000, ok, "N" * 2000]}),
                       422, "input_too_long")
    assert err["message"].startswith("input 1 is 10000 characters long (and 1 more)"), err
    assert "sol v1 reads at most 256 tokens" in err["message"]
    assert set(err["details"]["json"]["inputs"]) == {"1", "3"}
    err = assert_error(api.post("/api/v1/jobs", json={"kind": "predict", "spec": {"model": "sol", "inputs": ["C" * 1025]}}),
                       422, "input_too_long")
    assert set(err["details"]["spec"]["inputs"]) == {"0"}
    assert job_count(app) == 0
    assert api.post("/api/v1/models/sol/predict", json={"inputs": [ok], "timeout": 0}).status_code == 202


def test_token_models_count_whitespace_tokens_at_submit(app, tenant) -> None:  # noqa: ANN001
    tid, api = tenant
    add_model(app, tid, "codes", input_kind="tokens", max_len=8)  # over 32 tokens is refused
    long_codes = " ".join(["E11.9"] * 32)  # 191 characters, 32 tokens: the worker decides
    assert api.post("/api/v1/models/codes/predict", json={"inputs": [long_codes], "timeout": 0}).status_code == 202
    err = assert_error(api.post("/api/v1/models/codes/predict", json={"inputs": ["I10", long_codes + " N18.3"]}), 422,
                       "input_too_long")
    assert err["message"].startswith("input 1 is 33 tokens long") and "codes v1" in err["message"]


def test_worker_gives_inputs_over_max_len_tokens_an_error_not_a_truncation(tmp_path) -> None:  # noqa: ANN001
    from workers.kinds.predict import predict_inputs
    from workers.ml.bundle import bundle_config, save_bundle
    from workers.ml.data import load_sequence_frame
    from workers.ml.models import build_model
    from workers.ml.predict import Predictor

    df = pd.DataFrame({"smiles": ["CCO", "c1ccccc1O", "CCN", "ClCCBr"] * 3, "y": [0.1, 0.2, 0.3, 0.4] * 3})
    data = load_sequence_frame(df, target_columns="y", max_len=16)
    model = build_model("rnn", {"vocab_size": data.tokenizer.vocab_size, "num_outputs": 1, "hidden_size": 8,
                                "embedding_dim": 4})
    save_bundle(tmp_path, model, bundle_config(model, data))
    p = Predictor.from_bundle(tmp_path, "cpu")
    assert p.input["max_len"] == 16
    out = predict_inputs(p, ["CCO", "C" * 40, "[Na+].[Cl-]." + "C" * 14, "C" * 16, "C1CC("], label="sol v1")
    assert "error" not in out[0] and "error" not in out[3]
    assert out[1] == {"input": "C" * 40, "error": "input 1 has 40 tokens; model sol v1 reads at most 16"}
    assert out[2]["error"].startswith("input 2 has ") and "model sol v1 reads at most 16" in out[2]["error"]
    assert "syntax" in out[4]["error"]
    assert p.predict(["C" * 17])[0]["error"] == "input 0 has 17 tokens; the model reads at most 16"
