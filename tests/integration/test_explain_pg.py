"""Explained predictions on PostgreSQL with a real worker process (issue 12): POST
/models/{name}/predict with `explain` answers 200 with each molecule's atom weights and its
SVG drawing, the invalid input keeps its error; a score job's top-K drawings are served to
the job's tenant."""

from __future__ import annotations

import gzip
import itertools
import xml.etree.ElementTree as ET

import pytest

from app import auth
from app.sample_data import moses_library
from tests.conftest import ApiClient, seed_tiny_model_and_library

pytestmark = pytest.mark.integration

SVG = "{http://www.w3.org/2000/svg}svg"
LIBRARY_ROWS = 60


@pytest.fixture
def lab(pg_app, pg_settings):
    """(api client, library dataset id) with model "tiny" v1 (an untrained RNN) for a fresh tenant."""
    db = pg_app.extensions["medmaas.db"]
    with db.session() as s:
        tenant = auth.create_tenant(s, "explain-lab")
        tenant_id, key = tenant.id, auth.create_key(s, tenant)
    with gzip.open(moses_library(), "rt") as fh:
        next(fh)
        smiles = [line.strip() for line in itertools.islice(fh, LIBRARY_ROWS)]
    ds_id = seed_tiny_model_and_library(db, pg_settings.artifacts, tenant_id, smiles)
    return ApiClient(pg_app.test_client(), key), ds_id


def test_explained_predict_and_score_drawings_with_a_worker(lab, processes) -> None:
    api, library_id = lab
    procs = processes()
    procs.worker("cpu,inference")

    r = api.post(
        "/api/v1/models/tiny/predict",
        json={"inputs": ["CCO", "not-a-molecule", "c1ccccc1O"], "explain": True, "timeout": 90},
    )
    assert r.status_code == 200, (r.get_json(), procs.logs())
    items = r.get_json()["predictions"]
    assert "error" in items[1]
    assert "explanation" not in items[1]
    for item, atoms in ((items[0], 3), (items[2], 7)):
        explanation = item["explanation"]
        assert explanation["method"] == "integrated_gradients"
        assert explanation["output"] == "y"
        assert sorted(explanation["atom_weights"], key=int) == [str(i) for i in range(atoms)]
        assert ET.fromstring(explanation["svg"]).tag == SVG

    job = api.submit("score", {"model": "tiny@1", "library_id": library_id, "top_k": 3, "explain_top_k": 2})
    done = api.wait(job["id"], timeout=120)
    assert done["state"] == "succeeded", (done, procs.logs())
    urls = [e["url"] for e in done["result"]["explanations"]]
    assert len(urls) == 2
    drawing = api.get(urls[0])
    assert drawing.status_code == 200
    assert drawing.mimetype == "image/svg+xml"
    assert ET.fromstring(drawing.get_data(as_text=True)).tag == SVG
