"""Trust on the pages (app/web/explain.py, app/web/trust.py): a version's trust metrics as
tables, the "Explain a molecule / an image" form submitting an explained predict job, the
explanation page of a predict job, a score job's top-K table with its drawings, and the
routes serving those drawings (session-authenticated, listed files only, data CSP)."""

from __future__ import annotations

import base64
import re
import uuid
from typing import Any

import pytest
from sqlalchemy import select

from app import auth
from app.artifacts import job_dir, open_write
from app.models import Job, JobState, KeyRole, ModelVersion
from app.security_headers import DATA_CONTENT_SECURITY_POLICY, PAGE_CONTENT_SECURITY_POLICY
from app.web import explain, trust
from tests.conftest import sign_in

SVG = (
    "<?xml version='1.0' encoding='iso-8859-1'?>\n"
    "<svg version='1.1' baseProfile='full' xmlns='http://www.w3.org/2000/svg' width='360px' height='280px' "
    "viewBox='0 0 360 280'><rect style='opacity:1.0;fill:#FFFFFF;stroke:none' width='360.0' height='280.0' "
    "x='0.0' y='0.0'> </rect><ellipse cx='180' cy='140' rx='20' ry='20' style='fill:#FF7F7F' /></svg>\n"
)
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)

TRUST_METRICS = {
    "test": {"rmse": 1.1, "mae": 0.8},
    "best_epoch": 7,
    "faithfulness": {"top": 0.42, "random": 0.12, "ratio": 3.5, "n": 64, "fraction": 0.2},
    "uncertainty": {"method": "ensemble", "members": 5, "spread_error_spearman": 0.31},
    "calibration": {"coverage": 0.9, "test_coverage": 0.887, "test_mean_width": 2.4},
    "domain": {
        "threshold": 0.34,
        "test_in_domain_fraction": 0.93,
        "test_error_in_domain": 0.95,
        "test_error_out_of_domain": 2.1,
    },
}


class Lab:
    def __init__(self, app: Any, client: Any, role: str = "member") -> None:
        self.app, self.client = app, client
        with self.db.session() as s:
            self.tenant = auth.create_tenant(s, f"lab-{uuid.uuid4().hex[:8]}").id
            key, _ = auth.new_key(s, self.tenant, role, KeyRole(role))
            self.key_id = key.id
        sign_in(app, client, self.key_id)

    @property
    def db(self) -> Any:
        return self.app.extensions["medmaas.db"]

    def version(
        self, name: str, version: int, metrics: dict, input_kind: str = "smiles", task: str = "regression"
    ) -> None:
        with self.db.session() as s:
            s.add(
                ModelVersion(
                    tenant_id=self.tenant, name=name, version=version, arch="rnn", task=task,
                    input_kind=input_kind, spec={}, metrics=metrics, artifact_uri="file:///nowhere",
                )
            )  # fmt: skip

    def job(self, kind: str, spec: dict, result: dict | None, state: JobState = JobState.succeeded) -> int:
        with self.db.session() as s:
            job = Job(tenant_id=self.tenant, kind=kind, spec=spec, state=state, queue="cpu", result=result)
            s.add(job)
            s.flush()
            return job.id

    def post(self, path: str, data: dict, **kw: Any) -> Any:
        return self.client.post(path, data={"csrf_token": "token", **data}, **kw)


@pytest.fixture
def lab(app, client) -> Lab:
    return Lab(app, client)


def html_of(response: Any) -> str:
    assert response.status_code == 200, response.get_data(as_text=True)[:1000]
    return response.get_data(as_text=True)


# -- the model page: trust metrics ---------------------------------------------------------


def test_the_model_page_shows_each_trust_section_as_a_table_and_hides_absent_ones(lab: Lab) -> None:
    lab.version("sol", 1, {"test": {"rmse": 1.5}})  # an old version: no trust metrics
    lab.version("sol", 2, TRUST_METRICS)
    page = lab.client.get("/models/sol")
    html = html_of(page)
    assert page.headers["Content-Security-Policy"] == PAGE_CONTENT_SECURITY_POLICY  # unchanged for pages
    assert 'id="trust-v2"' in html
    assert 'id="trust-v1"' not in html
    sections = {key: re.search(rf'id="trust-v2-{key}">(.*?)</table>', html, re.S) for key in trust.TRUST_SECTIONS}
    assert all(sections.values()), [k for k, v in sections.items() if not v]
    faith = sections["faithfulness"].group(1)  # type: ignore[union-attr]
    assert "3.50× as much" in faith
    assert "0.42" in faith
    assert "0.12" in faith
    assert "20.0%" in faith
    unc = sections["uncertainty"].group(1)  # type: ignore[union-attr]
    assert "ensemble" in unc
    assert "Ensemble members" in unc
    assert ">5<" in unc
    assert "Spearman ρ = 0.31" in unc
    cal = sections["calibration"].group(1)  # type: ignore[union-attr]
    assert 'Requested coverage</th><td class="num">90.0%' in cal
    assert "88.7%" in cal
    assert "2.4" in cal
    dom = sections["domain"].group(1)  # type: ignore[union-attr]
    assert "0.34" in dom
    assert "93.0%" in dom
    assert "0.95" in dom
    assert "2.1" in dom
    versions_table = re.search(r'id="versions-table">(.*?)</table>', html, re.S).group(1)  # type: ignore[union-attr]
    assert "test_rmse 1.1" in versions_table
    assert "best_epoch 7" in versions_table
    assert "faithfulness" not in versions_table
    assert "spread_error" not in versions_table


def test_classification_calibration_and_a_version_without_trust_metrics() -> None:
    sections = trust.trust_sections(
        {"calibration": {"test_ece_before": 0.081, "test_ece_after": 0.022, "test_set_coverage": 0.91}, "val": {}}
    )
    assert [s.key for s in sections] == ["calibration"]
    assert sections[0].highlight == "Expected calibration error 0.081 → 0.022 after temperature scaling."
    assert ("Prediction-set coverage (test)", "91.0%") in sections[0].rows
    assert trust.trust_sections({"test": {"rmse": 1.0}}) == []
    assert trust.trust_sections(None) == []


def test_no_trust_section_for_a_model_without_trust_metrics(lab: Lab) -> None:
    lab.version("old", 1, {"test": {"rmse": 1.5}})
    html = html_of(lab.client.get("/models/old"))
    assert 'id="trust"' not in html
    assert 'id="explain-form"' in html


# -- the explain form ----------------------------------------------------------------------


def test_the_explain_form_submits_an_explained_predict_job_and_redirects_to_its_page(lab: Lab, monkeypatch) -> None:
    monkeypatch.setattr(explain, "EXPLAIN_WAIT_S", 0.0)  # no worker here: the job stays queued
    lab.version("sol", 1, TRUST_METRICS)
    html = html_of(lab.client.get("/models/sol"))
    assert 'action="/models/sol/explain"' in html
    assert 'name="smiles"' in html
    assert 'name="csrf_token"' in html
    r = lab.post("/models/sol/explain", {"smiles": "c1ccccc1O", "coverage": "0.8", "ref": "version:1", "form_id": "f1"})
    assert r.status_code == 303, r.get_data(as_text=True)[:500]
    job_id = int(re.fullmatch(r"/jobs/(\d+)/explanation", r.headers["Location"]).group(1))  # type: ignore[union-attr]
    with lab.db.session() as s:
        job = s.get(Job, job_id)
        assert job.kind == "predict"
        assert job.tenant_id == lab.tenant
        assert job.spec["inputs"] == ["c1ccccc1O"]
        assert job.spec["model"] == "sol@1"
        assert job.spec["explain"] is True
        assert job.spec["coverage"] == 0.8
        assert job.spec["explain_format"] == "svg"
    pending = html_of(lab.client.get(r.headers["Location"]))
    assert 'id="explain-pending"' in pending
    assert '<noscript><meta http-equiv="refresh" content="3"></noscript>' in pending  # refreshes without JS
    assert "js/explain.js" in pending
    again = lab.post("/models/sol/explain", {"smiles": "c1ccccc1O", "coverage": "0.8", "form_id": "f1"})
    assert again.headers["Location"] == r.headers["Location"]  # the same form sent twice: one job


@pytest.mark.parametrize(
    ("data", "field", "status"),
    [({"smiles": "  "}, "smiles", 400), ({"smiles": "CCO", "coverage": "1.5"}, "coverage", 400)],
)
def test_the_explain_form_marks_bad_fields_and_makes_no_job(lab: Lab, data: dict, field: str, status: int) -> None:
    lab.version("sol", 1, {})
    r = lab.post("/models/sol/explain", {"coverage": "0.9", **data})
    assert r.status_code == status
    assert f'id="{field}-error"' in r.get_data(as_text=True)
    with lab.db.session() as s:
        assert s.scalars(select(Job)).all() == []


def test_a_tokens_model_cannot_be_explained_and_a_viewer_cannot_submit(app, client) -> None:
    lab = Lab(app, client, role="member")
    lab.version("codes", 1, {}, input_kind="tokens")
    html = html_of(client.get("/models/codes"))
    assert 'id="explain-unavailable"' in html
    assert 'id="explain-form"' not in html
    assert lab.post("/models/codes/explain", {"smiles": "a b c"}).status_code == 422
    viewer = Lab(app, app.test_client(), role="viewer")
    viewer.version("sol", 1, {})
    assert viewer.post("/models/sol/explain", {"smiles": "CCO"}).status_code == 403
    assert client.post("/models/codes/explain", data={"smiles": "CCO"}).status_code == 400  # no CSRF token
    with lab.db.session() as s:
        assert s.scalars(select(Job)).all() == []


# -- the explanation page of a predict job ---------------------------------------------------

EXPLAINED_RESULT = {
    "model": "sol",
    "version": 1,
    "outputs": ["logS"],
    "predictions": [
        {
            "input": "c1ccccc1O",
            "smiles": "Oc1ccccc1",
            "values": {"logS": -0.71},
            "uncertainty": {"method": "ensemble", "samples": 5, "std": {"logS": 0.23}},
            "interval": {"coverage": 0.8, "values": {"logS": [-1.2, -0.25]}},
            "domain": {"nn_similarity": 0.61, "in_domain": True, "threshold": 0.34},
            "explanation": {"atom_weights": {"0": 1.0, "3": -0.4}, "svg": SVG, "output": "logS"},
        },
        {"input": "not((", "error": "invalid SMILES: not(("},
        {
            "input": "CCCCCCCCCC",
            "values": {"logS": -4.0},
            "domain": {"nn_similarity": 0.1, "in_domain": False, "threshold": 0.34},
        },
    ],
}


def test_the_explanation_page_shows_prediction_spread_interval_domain_and_drawing(lab: Lab) -> None:
    lab.version("sol", 1, TRUST_METRICS)
    spec = {
        "model": "sol@1",
        "model_name": "sol",
        "version": 1,
        "inputs": ["c1ccccc1O", "not((", "CCCCCCCCCC"],
        "explain": True,
    }
    job_id = lab.job("predict", spec, EXPLAINED_RESULT)
    page = lab.client.get(f"/jobs/{job_id}/explanation")
    html = html_of(page)
    assert "noscript" not in html
    assert "explain.js" not in html
    first = re.search(r'id="item-0"(.*?)</section>', html, re.S).group(1)  # type: ignore[union-attr]
    assert f'<img class="drawing" id="drawing-0" src="/jobs/{job_id}/drawings/0"' in first
    assert "<svg" not in html  # drawings are never inlined
    assert "-0.71" in first
    assert "± 0.23" in first
    assert "[-1.2, -0.25]" in first
    assert "Interval (80%)" in first
    assert "ensemble spread over 5 samples" in first
    assert "in domain" in first
    assert "Tanimoto 0.61" in first
    assert "threshold 0.34" in first
    assert '#0</td><td class="num pos">+1.000' in first
    assert '#3</td><td class="num neg">-0.400' in first
    assert "invalid SMILES: not((" in re.search(r'id="item-1"(.*?)</section>', html, re.S).group(1)  # type: ignore[union-attr]
    third = re.search(r'id="item-2"(.*?)</section>', html, re.S).group(1)  # type: ignore[union-attr]
    assert "out of domain" in third
    assert 'id="drawing-2-missing"' in third
    assert "not estimated" in third
    job_page = html_of(lab.client.get(f"/jobs/{job_id}"))
    assert f'href="/jobs/{job_id}/explanation"' in job_page

    drawing = lab.client.get(f"/jobs/{job_id}/drawings/0")
    assert drawing.status_code == 200
    assert drawing.mimetype == "image/svg+xml"
    assert drawing.get_data(as_text=True) == SVG
    assert drawing.headers["Content-Security-Policy"] == DATA_CONTENT_SECURITY_POLICY
    assert drawing.headers["X-Content-Type-Options"] == "nosniff"
    assert lab.client.get(f"/jobs/{job_id}/drawings/1").status_code == 404  # an error item
    assert lab.client.get(f"/jobs/{job_id}/drawings/7").status_code == 404


def test_image_drawings_are_served_as_png_and_unsafe_svg_is_not_served(lab: Lab) -> None:
    lab.version("xray", 1, {}, input_kind="image", task="classification")
    result = {
        "predictions": [
            {"probabilities": {"a": 0.7, "b": 0.3}, "label": "a",
             "explanation": {"heatmap_shape": [8, 8], "png_base64": base64.b64encode(PNG_1X1).decode()}},
            {"values": {"y": 1.0}, "explanation": {"svg": "<svg xmlns='http://www.w3.org/2000/svg'><script>x</script></svg>"}},
        ]
    }  # fmt: skip
    job_id = lab.job("predict", {"model": "xray@1", "inputs": [{"image_base64": "x"}, {"image_base64": "y"}]}, result)
    png = lab.client.get(f"/jobs/{job_id}/drawings/0")
    assert png.status_code == 200
    assert png.mimetype == "image/png"
    assert png.data == PNG_1X1
    assert lab.client.get(f"/jobs/{job_id}/drawings/1").status_code == 404
    html = html_of(lab.client.get(f"/jobs/{job_id}/explanation"))
    assert "image 1" in html
    assert "Heat map" in html
    assert "Probability" in html
    assert 'id="item-0-label">a<' in html


def test_drawings_and_pages_of_another_tenants_or_unfinished_jobs_are_not_served(app, client, lab: Lab) -> None:
    job_id = lab.job("predict", {"model": "sol@1", "inputs": ["CCO"]}, EXPLAINED_RESULT)
    queued = lab.job("predict", {"model": "sol@1", "inputs": ["CCO"]}, None, JobState.queued)
    assert lab.client.get(f"/jobs/{queued}/drawings/0").status_code == 409
    other = Lab(app, app.test_client())
    assert other.client.get(f"/jobs/{job_id}/drawings/0").status_code == 404
    assert other.client.get(f"/jobs/{job_id}/explanation").status_code == 404
    score = lab.job("score", {}, {"top_k": []})
    assert lab.client.get(f"/jobs/{score}/explanation").status_code == 404
    signed_out = app.test_client().get(f"/jobs/{job_id}/drawings/0")
    assert signed_out.status_code == 302
    assert "/login" in signed_out.headers["Location"]


# -- a score job's top-K ---------------------------------------------------------------------


def score_result(explanations: list[dict]) -> dict:
    return {
        "model": "sol",
        "version": 1,
        "outputs": ["logS", "logP"],
        "rank_by": "logS",
        "top_k": [
            {"row": 4, "id": "m4", "smiles": "OCC", "canonical_smiles": "CCO", "logS": 1.25, "logP": -0.3,
             "logS_std": 0.2, "logS_lo": 0.8, "logS_hi": 1.7, "logP_std": 0.1, "nn_similarity": 0.72, "in_domain": True},
            {"row": 1, "id": "m1", "smiles": "c1ccccc1", "canonical_smiles": "c1ccccc1", "logS": 0.5, "logP": 2.0,
             "logS_std": 0.4, "logS_lo": 0.1, "logS_hi": 0.9, "logP_std": 0.3, "nn_similarity": 0.2, "in_domain": 0.0},
        ],
        "explanations": explanations,
    }  # fmt: skip


def write_file(app: Any, tenant: int, job_id: int, name: str, body: bytes) -> None:
    path = job_dir(app.extensions["medmaas.settings"], tenant, job_id) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_write(path) as fh:
        fh.write(body)


def test_the_score_job_page_shows_the_top_k_table_with_drawings(app, lab: Lab) -> None:
    job_id = lab.job("score", {"model": "sol@1", "model_name": "sol", "version": 1, "library_id": 1}, None)
    explanations = [
        {"rank": 1, "row": 4, "file": "explain/1.svg", "url": f"/api/v1/jobs/{job_id}/files/explain/1.svg"},
        {"rank": 2, "row": 1, "error": "RDKit could not draw it"},
    ]
    with lab.db.session() as s:
        job = s.get(Job, job_id)
        job.result = score_result(explanations)
    write_file(app, lab.tenant, job_id, "explain/1.svg", SVG.encode())
    write_file(app, lab.tenant, job_id, "scores.csv", b"row,logS\n")
    html = html_of(lab.client.get(f"/jobs/{job_id}"))
    table = re.search(r'id="topk-table">(.*?)</table>', html, re.S).group(1)  # type: ignore[union-attr]
    headers = re.findall(r'<th scope="col"[^>]*>(.*?)</th>', table)
    assert headers == ["Rank", "Structure", "SMILES", "logS", "Std", "Interval", "NN similarity", "Domain", "logP"]
    rows = re.findall(r"<tr data-row=\"(\d+)\">(.*?)</tr>", table, re.S)
    assert [r[0] for r in rows] == ["4", "1"]
    first, second = rows[0][1], rows[1][1]
    assert f'<img class="thumb" src="/jobs/{job_id}/files/explain/1.svg"' in first
    assert "<code>CCO</code>" in first
    assert "m4" in first
    assert "1.25" in first
    assert "± 0.2" in first
    assert "[0.8, 1.7]" in first
    assert "0.72" in first
    assert ">in<" in first
    assert "-0.3" in first
    assert "<img" not in second
    assert ">out<" in second
    assert 'title="RDKit could not draw it">not drawn<' in second
    assert "<code>c1ccccc1</code>" in second
    assert 'id="result-details"' in html  # the raw JSON folds away under the table

    svg = lab.client.get(f"/jobs/{job_id}/files/explain/1.svg")
    assert svg.status_code == 200
    assert svg.mimetype == "image/svg+xml"
    assert svg.get_data(as_text=True) == SVG
    assert svg.headers["Content-Security-Policy"] == DATA_CONTENT_SECURITY_POLICY
    assert lab.client.get(f"/jobs/{job_id}/files/scores.csv").status_code == 404  # not a listed drawing
    assert lab.client.get(f"/jobs/{job_id}/files/explain/2.svg").status_code == 404
    assert lab.client.get(f"/jobs/{job_id}/files/../jobs/{job_id}/explain/1.svg").status_code == 404


def test_top_k_without_drawings_shows_smiles_only_and_listed_paths_must_stay_inside(lab: Lab) -> None:
    hostile = [
        {"row": 4, "file": "../../secret.svg"},
        {"row": 1, "file": "/etc/passwd.svg"},
        {"rank": 2, "file": "x.txt"},
    ]
    job_id = lab.job("score", {"model": "sol@1"}, score_result(hostile))
    html = html_of(lab.client.get(f"/jobs/{job_id}"))
    table = re.search(r'id="topk-table">(.*?)</table>', html, re.S).group(1)  # type: ignore[union-attr]
    assert "<img" not in table
    assert "<code>CCO</code>" in table
    assert "No structures were drawn" in html
    assert trust.explanation_files(score_result(hostile)).names() == set()
    assert lab.client.get(f"/jobs/{job_id}/files/../../secret.svg").status_code == 404


def test_safe_relative_and_svg_checks() -> None:
    assert trust.safe_relative("explain/3.svg") == "explain/3.svg"
    for bad in ("../x.svg", "/x.svg", "a//b.svg", "a/./b.svg", "x.html", "", None, "a\\b.svg", "x.svg\x00"):
        assert trust.safe_relative(bad) is None, bad
    assert trust.is_svg(SVG)
    assert not trust.is_svg("<html><svg></svg></html>")
    assert not trust.is_svg("<svg onload='alert(1)'></svg>")
    assert not trust.is_svg("<svg><foreignObject/></svg>")


def test_a_multi_output_models_further_drawings_and_an_explanation_error(lab: Lab) -> None:
    result = {
        "predictions": [
            {
                "smiles": "CCO",
                "values": {"a": 1.0, "b": 2.0},
                "explanation": {
                    "method": "integrated_gradients", "output": "a", "svg": SVG, "atom_weights": {"0": 0.5},
                    "outputs": {"a": {"svg": SVG}, "b": {"svg": SVG.replace("#FF7F7F", "#7F7FFF")}},
                },
            },
            {"smiles": "C", "values": {"a": 0.0, "b": 0.0},
             "explanation": {"method": "integrated_gradients", "error": "no atoms to attribute"}},
        ]
    }  # fmt: skip
    job_id = lab.job("predict", {"model": "m@1", "inputs": ["CCO", "C"], "explain": True}, result)
    html = html_of(lab.client.get(f"/jobs/{job_id}/explanation"))
    assert f'src="/jobs/{job_id}/drawings/0?output=b"' in html
    assert f'src="/jobs/{job_id}/drawings/0?output=a"' not in html  # the lead drawing is the main one
    assert "No drawing for this input: no atoms to attribute." in html
    assert "none: this version stores no calibration" in html
    b = lab.client.get(f"/jobs/{job_id}/drawings/0?output=b")
    assert b.status_code == 200
    assert "#7F7FFF" in b.get_data(as_text=True)
    assert lab.client.get(f"/jobs/{job_id}/drawings/0?output=zzz").status_code == 404


def test_the_score_form_asks_for_drawings_of_at_most_the_top_k(app, lab: Lab) -> None:
    from tests.conftest import seed_tiny_model_and_library

    smiles = [f"{'C' * n}O" for n in range(1, 51)]
    settings = app.extensions["medmaas.settings"]
    library_id = seed_tiny_model_and_library(lab.db, settings.artifacts, lab.tenant, smiles)
    html = html_of(lab.client.get("/score/new"))
    assert 'name="explain_top_k"' in html
    assert 'value="10"' in html
    form = {"model": "tiny", "library_id": str(library_id), "output": "csv", "coverage": "0.8", "form_id": "s1"}
    r = lab.post("/score/new", {**form, "top_k": "2", "explain_top_k": "10"})
    assert r.status_code == 302, r.get_data(as_text=True)[:1000]
    with lab.db.session() as s:
        job = s.scalars(select(Job).where(Job.kind == "score")).one()
        assert job.spec["explain_top_k"] == 2
        assert job.spec["top_k"] == 2
        assert job.spec["coverage"] == 0.8


def test_the_explain_form_of_an_image_model_sends_the_file_and_the_method(lab: Lab, monkeypatch) -> None:
    import io

    monkeypatch.setattr(explain, "EXPLAIN_WAIT_S", 0.0)
    lab.version("xray", 1, {}, input_kind="image", task="classification")
    html = html_of(lab.client.get("/models/xray"))
    assert "Explain an image" in html
    assert 'name="file"' in html
    assert 'enctype="multipart/form-data"' in html
    assert 'name="sets"' in html  # a classifier: its conformal prediction set may be asked for
    missing = lab.post("/models/xray/explain", {"method": "ig"})
    assert missing.status_code == 400
    assert 'id="file-error"' in missing.get_data(as_text=True)
    r = lab.post(
        "/models/xray/explain",
        {"method": "ig", "coverage": "0.9", "sets": "1", "file": (io.BytesIO(PNG_1X1), "chest.png")},
        content_type="multipart/form-data",
    )
    assert r.status_code == 303, r.get_data(as_text=True)[:500]
    with lab.db.session() as s:
        job = s.scalars(select(Job).where(Job.kind == "predict")).one()
        assert job.spec["inputs"] == [{"image_base64": base64.b64encode(PNG_1X1).decode()}]
        assert job.spec["explain_method"] == "ig"
        assert job.spec["explain_format"] == "png"
        assert job.spec["prediction_sets"] is True
