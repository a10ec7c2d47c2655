"""Batch scoring through the API with real worker subprocesses (PostgreSQL + Redis).

One small RNN is trained on the solubility set once for the module; the tests then score
libraries built from real MOSES SMILES, with invalid rows, blank lines and duplicates mixed
in, and kill, cancel and mis-submit score jobs.
"""
from __future__ import annotations

import csv
import gzip
import io
import itertools
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

from app.sample_data import moses_library, solubility_csv
from tests.conftest import ApiClient, Processes, create_tenant_key, wait_until

pytestmark = pytest.mark.integration

N_ROWS = 10_000
# (text as bytes, whether RDKit/scoring must reject it)
INVALID = [b"C1CC(", b"C(C)(C)(C)(C)C", b"c1cccc1", b"C1CC", b"N(=O)(=O)(=O)C", b"\xff\xfeCCO", b"C" * 2500,
           b"CC)(", b"[Xx]C", b""]


def moses_smiles(n: int, skip: int = 0) -> list[str]:
    with gzip.open(moses_library(), "rt") as fh:
        next(fh)  # header
        return [line.strip() for line in itertools.islice(fh, skip, skip + n)]


def build_library(path: Path, n_rows: int, skip: int = 0) -> list[tuple[str, bytes, bool]]:
    """A CSV of exactly n_rows data rows (id, smiles): MOSES molecules with 1% invalid rows of
    several kinds, ~2% duplicates (some written in another atom order, i.e. the same canonical
    SMILES) and blank lines (which are not rows). Returns [(id, smiles bytes, invalid)]."""
    rng = np.random.default_rng(7)
    pool = moses_smiles(n_rows, skip)
    rows: list[tuple[str, bytes, bool]] = []
    for i in range(n_rows):
        if i % 100 == 37:
            text, bad = INVALID[(i // 100) % len(INVALID)], True
        elif i % 50 == 11 and i > 100:
            j = int(rng.integers(0, i - 1))
            while rows[j][2]:
                j -= 1
            text, bad = rows[j][1], False  # an exact duplicate of an earlier row
        elif i == 20:
            text, bad = b"OCC", False  # ethanol, non-canonical ...
        elif i == 21:
            text, bad = b"CCO", False  # ... and canonical: one canonical SMILES, two rows
        else:
            text, bad = pool[i].encode(), False
        rows.append((f"mol-{i}", text, bad))
    out = io.BytesIO()
    out.write(b"id,smiles\n")
    for i, (ident, text, _) in enumerate(rows):
        out.write(ident.encode() + b"," + text + b"\n")
        if i % 997 == 5:
            out.write(b"\n")  # a blank line: not a row
    path.write_bytes(out.getvalue())
    return rows


def upload(api: ApiClient, path: Path, **options: str) -> dict:
    with open(path, "rb") as fh:
        r = api.post("/api/v1/datasets", data={"kind": "library", "file": (fh, path.name), **options},
                     content_type="multipart/form-data")
    assert r.status_code == 201, r.get_json()
    return r.get_json()


def read_csv_result(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


@pytest.fixture(scope="module")
def scoring(pg_app, pg_settings, tmp_path_factory):  # noqa: ANN001, ANN201
    """(api client of one tenant, model name, bundle path) with a trained solubility RNN."""
    api = ApiClient(pg_app.test_client(), create_tenant_key(pg_app)[1])
    work = tmp_path_factory.mktemp("scoring")
    with open(solubility_csv(work / "solubility.csv"), "rb") as fh:
        r = api.post("/api/v1/datasets", data={"kind": "sequences", "file": (fh, "solubility.csv"),
                                               "label_columns": "solubility"}, content_type="multipart/form-data")
    assert r.status_code == 201, r.get_json()
    procs = Processes(pg_settings, work)
    try:
        procs.worker("cpu,gpu")
        job = api.submit("train", {"model_name": "sol", "dataset_id": r.get_json()["id"], "arch": "rnn",
                                   "task": "regression", "target": "solubility", "epochs": 4, "batch_size": 32,
                                   "lr": 3e-3, "seed": 1, "model": {"cell": "gru", "embedding_dim": 32,
                                                                    "hidden_size": 64}})
        done = api.wait(job["id"], timeout=300)
        assert done["state"] == "succeeded", (done["error"], procs.logs())
    finally:
        procs.stop()
    assert api.put("/api/v1/models/sol/aliases/production", json={"version": 1}).status_code == 200
    from app.artifacts import ArtifactStore
    from app.models import ModelVersion

    with pg_app.extensions["medmaas.db"].session() as s:
        uri = s.scalar(select(ModelVersion.artifact_uri).where(ModelVersion.name == "sol", ModelVersion.version == 1,
                                                                ModelVersion.tenant_id == _tenant_of(s, api)))
    return api, "sol", ArtifactStore(pg_settings.artifacts).path(uri), work


def _tenant_of(session, api: ApiClient) -> int:  # noqa: ANN001
    from app import auth

    return auth.authenticate(session, api.key).tenant_id


@pytest.fixture(scope="module")
def big_library(scoring) -> dict:  # noqa: ANN001
    """30,000 MOSES rows (gzip), for the kill and cancel tests."""
    api, _, _, work = scoring
    path = work / "big.smi.gz"
    with gzip.open(path, "wt") as fh:
        for i, smi in enumerate(moses_smiles(30_000, skip=20_000)):
            fh.write(f"{smi} big-{i}\n")
    return upload(api, path)


def shard_rows(pg_app, job_id: int) -> list:  # noqa: ANN001
    from app.models import ScoreShard

    with pg_app.extensions["medmaas.db"].session() as s:
        return [(sh.index, sh.state.value, sh.attempts, sh.worker, sh.output_uri, sh.finished_at)
                for sh in s.scalars(select(ScoreShard).where(ScoreShard.job_id == job_id).order_by(ScoreShard.index))]


def test_scores_a_library_in_input_order_with_invalid_rows_reported(scoring, pg_settings, processes) -> None:  # noqa: ANN001
    api, model, bundle, work = scoring
    rows = build_library(work / "lib.csv", N_ROWS)
    lib = upload(api, work / "lib.csv")
    assert lib["rows"] == N_ROWS  # blank lines are not rows
    procs = processes(pg_settings.replace(score_shard_rows=2_000, score_batch_size=1024))
    procs.worker("cpu,gpu")
    procs.worker("cpu")
    job = api.submit("score", {"model": f"{model}@production", "library_id": lib["id"], "top_k": 25,
                               "output": "csv", "dedupe": True})
    done = api.wait(job["id"], timeout=240)
    assert done["state"] == "succeeded", (done["error"], procs.logs())
    result = done["result"]
    n_invalid = sum(bad for _, _, bad in rows)
    assert (result["rows"], result["valid"], result["invalid"]) == (N_ROWS, N_ROWS - n_invalid, n_invalid)
    assert result["shards"]["count"] == 5 and result["outputs"] == ["solubility"]

    # the file: every input row once, in order, with its id and SMILES
    r = api.get(f"/api/v1/jobs/{job['id']}/result")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    assert f'filename=job-{job["id"]}-scores.csv' in r.headers["Content-Disposition"]
    table = read_csv_result(r.data)
    assert [int(t["row"]) for t in table] == list(range(N_ROWS))
    assert [t["id"] for t in table] == [ident for ident, _, _ in rows]
    for t, (_, text, bad) in zip(table, rows):
        assert (t["valid"] == "false") == bad, t
        if bad:
            assert t["error"] and not t["solubility"] and not t["canonical_smiles"]
        else:
            assert t["smiles"] == text.decode() and t["canonical_smiles"] and not t["error"]
    errors = {rows[i][1]: table[i]["error"] for i in range(N_ROWS) if rows[i][2]}
    assert errors[b"C1CC("].startswith("SMILES parse error")
    assert "valence" in errors[b"C(C)(C)(C)(C)C"].lower()
    assert "kekulize" in errors[b"c1cccc1"].lower()
    assert "not valid UTF-8" in errors[b"\xff\xfeCCO"] and "too long" in errors[b"C" * 2500]
    assert errors[b""] == "empty SMILES"
    assert table[20]["canonical_smiles"] == table[21]["canonical_smiles"] == "CCO"
    assert table[20]["solubility"] == table[21]["solubility"]
    # dedupe works per shard: a repeat of a canonical SMILES earlier in the same shard is scored once
    seen, repeats = set(), 0
    for t in table:
        if t["valid"] == "true":
            key = (int(t["row"]) // 2_000, t["canonical_smiles"])
            repeats += key in seen
            seen.add(key)
    assert result["duplicates"] == repeats > 0
    assert set(result["invalid_reasons"]) >= {"SMILES parse error", "invalid molecule", "empty SMILES"}

    # top-K equals a direct computation with the same bundle
    from workers.ml.predict import Predictor

    predictor = Predictor.from_bundle(bundle, device="cpu")
    valid_rows = [i for i, (_, _, bad) in enumerate(rows) if not bad]
    direct, errs = predictor.score_smiles([rows[i][1].decode() for i in valid_rows])
    assert not any(errs)
    direct = direct[:, 0].astype(np.float64)
    ours = np.array([float(table[i]["solubility"]) for i in valid_rows])
    np.testing.assert_allclose(ours, direct, rtol=1e-4, atol=1e-4)
    order = np.lexsort((np.array(valid_rows), -direct))[:25]
    expected_top = [valid_rows[i] for i in order]
    got_top = [t["row"] for t in result["top_k"]]
    got_scores = np.array([t["solubility"] for t in result["top_k"]])
    np.testing.assert_allclose(got_scores, direct[order], rtol=1e-4, atol=1e-4)
    # identical rows above: equal scores may tie; compare as sets where the scores tie
    assert sorted(got_top) == sorted(expected_top) or np.allclose(np.sort(got_scores), np.sort(direct[order]))
    assert list(got_scores) == sorted(got_scores, reverse=True)
    assert {"row", "id", "smiles", "canonical_smiles", "solubility"} <= set(result["top_k"][0])

    # the same table as Parquet
    r = api.get(f"/api/v1/jobs/{job['id']}/result?format=parquet")
    assert r.status_code == 200 and f'job-{job["id"]}-scores.parquet' in r.headers["Content-Disposition"]
    pt = pq.read_table(io.BytesIO(r.data))
    # every trained version carries its calibration and domain reference: intervals and similarity
    assert pt.column_names == ["row", "id", "smiles", "canonical_smiles", "solubility", "solubility_lo",
                               "solubility_hi", "nn_similarity", "in_domain", "valid", "error"]
    valid = pt.filter(pt.column("valid")).to_pydict()
    assert all(lo <= y <= hi for lo, y, hi in zip(valid["solubility_lo"], valid["solubility"], valid["solubility_hi"]))
    assert all(0 <= sim <= 1 for sim in valid["nn_similarity"])
    assert pt.column("row").to_pylist() == list(range(N_ROWS))
    assert api.get(f"/api/v1/jobs/{job['id']}/result?format=xlsx").status_code == 400

    progress = [e["data"] for e in api.events(job["id"]) if e["type"] == "progress" and "molecules_done" in e["data"]]
    assert progress and progress[-1]["molecules_done"] == N_ROWS and progress[-1]["shards_done"] == 5
    assert any(p.get("molecules_per_s") for p in progress)
    assert {"molecules_total", "eta_s", "shards_total"} <= set(progress[-1])


def test_sigkill_reruns_only_unfinished_shards(scoring, big_library, pg_app, pg_settings, processes) -> None:  # noqa: ANN001
    api, model, _, _ = scoring
    procs = processes(pg_settings.replace(score_shard_rows=1_000, score_batch_size=256))
    procs.beat()
    workers = [procs.worker("cpu,gpu"), procs.worker("cpu")]
    job = api.submit("score", {"model": model, "library_id": big_library["id"], "output": "parquet", "top_k": 10})
    wait_until(lambda: sum(s[1] == "done" for s in shard_rows(pg_app, job["id"])) >= 3, 120, 0.05,
               what="three shards done")
    # kill the worker running the parent job: the hardest case (the parent must be re-run
    # and pick up the existing shards); the other worker keeps taking shards meanwhile
    parent_pid = int(api.job(job["id"])["worker"].split(":")[1])
    victim = next(w for w in workers if w.pid == parent_pid)
    procs.kill(victim, signal.SIGKILL)
    snapshot = shard_rows(pg_app, job["id"])
    done_before = {s[0]: s for s in snapshot if s[1] == "done"}
    running_on_victim = {s[0] for s in snapshot if s[1] == "running" and s[3].endswith(f":{parent_pid}")}
    assert done_before and len(done_before) < 30, snapshot
    procs.worker("cpu")
    done = api.wait(job["id"], timeout=240)
    assert done["state"] == "succeeded", (done["error"], procs.logs())
    assert done["attempts"] == 2
    after = {s[0]: s for s in shard_rows(pg_app, job["id"])}
    assert len(after) == 30 and all(s[1] == "done" for s in after.values())
    for index, before in done_before.items():
        assert after[index] == before, "a finished shard was run again"
    reran = {i for i, s in after.items() if s[2] > 1}
    assert reran == running_on_victim, (reran, running_on_victim)
    r = api.get(f"/api/v1/jobs/{job['id']}/result")
    assert r.status_code == 200 and r.mimetype == "application/vnd.apache.parquet"
    rows = pq.read_table(io.BytesIO(r.data), columns=["row", "id"])
    assert rows.column("row").to_pylist() == list(range(30_000))
    assert rows.column("id").to_pylist() == [f"big-{i}" for i in range(30_000)]
    assert done["result"]["rows"] == 30_000 and done["result"]["shards"]["attempts"] == 30 + len(running_on_victim)


def test_cancel_mid_job_stops_shards_and_serves_nothing(scoring, big_library, pg_app, pg_settings, processes) -> None:  # noqa: ANN001
    api, model, _, _ = scoring
    procs = processes(pg_settings.replace(score_shard_rows=1_000, score_batch_size=256))
    procs.worker("cpu,gpu")
    procs.worker("cpu")
    job = api.submit("score", {"model": model, "library_id": big_library["id"]})
    wait_until(lambda: any(s[1] == "done" for s in shard_rows(pg_app, job["id"])), 120, 0.05, what="a shard done")
    asked = time.monotonic()
    assert api.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 202
    done = api.wait(job["id"], timeout=20)
    assert done["state"] == "cancelled" and time.monotonic() - asked < 10, (done, procs.logs())
    r = api.get(f"/api/v1/jobs/{job['id']}/result")
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "not_ready"
    states = {s[1] for s in shard_rows(pg_app, job["id"])}
    assert states <= {"done", "cancelled"} and "cancelled" in states

    from app.models import Job

    with pg_app.extensions["medmaas.db"].session() as s:
        tenant = s.get(Job, job["id"]).tenant_id
    job_dir = pg_settings.artifacts / f"tenant-{tenant}" / "jobs" / str(job["id"])
    # shard workers notice within a batch or a heartbeat; then no partial output remains
    wait_until(lambda: not [p for p in job_dir.rglob("*") if p.is_file()], 10, what="partial outputs deleted")
    # the workers are free again
    nxt = api.submit("sleep", {"seconds": 0})
    assert api.wait(nxt["id"], timeout=60)["state"] == "succeeded"


def test_unknown_model_or_library_is_rejected_without_a_job(scoring, pg_app) -> None:  # noqa: ANN001
    api, model, _, work = scoring
    path = work / "tiny.smi"
    path.write_text("CCO a\n")
    lib = upload(api, path)
    before = len(api.get("/api/v1/jobs?kind=score&limit=500").get_json()["items"])

    def rejected(spec: dict, code: str, status: int = 422) -> None:
        r = api.post("/api/v1/jobs", json={"kind": "score", "spec": spec})
        assert r.status_code == status and r.get_json()["error"]["code"] == code, r.get_json()

    rejected({"model": "no-such-model@production", "library_id": lib["id"]}, "unknown_model")
    rejected({"model": f"{model}@no-such-alias", "library_id": lib["id"]}, "unknown_model")
    rejected({"model": f"{model}@99", "library_id": lib["id"]}, "unknown_model")
    rejected({"model": model, "library_id": 999_999}, "unknown_dataset")
    rejected({"model": model}, "invalid_spec")
    rejected({"model": model, "library_id": lib["id"], "output": "xlsx"}, "invalid_spec")
    sequences = api.get("/api/v1/datasets?kind=sequences").get_json()["items"][0]
    rejected({"model": model, "library_id": sequences["id"]}, "invalid_dataset")
    rejected({"model": model, "library_id": lib["id"], "text_column": "smiles"}, "invalid_spec")  # .smi has no columns
    other = ApiClient(pg_app.test_client(), create_tenant_key(pg_app)[1])  # another tenant: its library is invisible
    r = other.post("/api/v1/jobs", json={"kind": "score", "spec": {"model": model, "library_id": lib["id"]}})
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "unknown_model"
    other_lib = upload(other, path)
    rejected({"model": model, "library_id": other_lib["id"]}, "unknown_dataset")
    assert len(api.get("/api/v1/jobs?kind=score&limit=500").get_json()["items"]) == before


def test_library_without_valid_rows_succeeds_with_zero_scores(scoring, processes) -> None:  # noqa: ANN001
    api, model, _, work = scoring
    path = work / "junk.csv"
    path.write_bytes(b"smiles,name\nC1CC(,a\nnot a molecule,b\n,c\nXYZ,d\n")
    lib = upload(api, path)
    assert lib["rows"] == 4
    procs = processes()
    procs.worker("cpu")
    job = api.submit("score", {"model": model, "library_id": lib["id"], "output": "parquet"})
    done = api.wait(job["id"], timeout=120)
    assert done["state"] == "succeeded", (done["error"], procs.logs())
    res = done["result"]
    assert (res["rows"], res["valid"], res["invalid"], res["top_k"]) == (4, 0, 4, [])
    r = api.get(f"/api/v1/jobs/{job['id']}/result?format=csv")  # converted from the Parquet file on the fly
    assert r.status_code == 200
    table = read_csv_result(r.data)
    assert [t["id"] for t in table] == ["a", "b", "c", "d"] and all(t["valid"] == "false" and t["error"] for t in table)
