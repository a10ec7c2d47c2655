"""Trust on the pages in a real Chromium against a live server, PostgreSQL, Redis and an
inference worker: a model's page shows its trust metrics, its "Explain a molecule" form
submits an explained prediction, and the drawing the worker made (RDKit SVG, served
through <img>) renders with a size (checked on a screenshot)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from sqlalchemy import update

from app.models import ModelVersion
from tests.conftest import seed_tiny_model_and_library
from tests.e2e.helpers import sign_in, wait_js

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

SMILES = [f"{'C' * n}O" for n in range(1, 26)] + [f"c1ccccc1{'C' * n}" for n in range(25)]
TRUST = {
    "test": {"rmse": 0.9},
    "faithfulness": {"top": 0.3, "random": 0.1, "ratio": 3.0, "n": 20, "fraction": 0.2},
    "uncertainty": {"method": "ensemble", "members": 3, "spread_error_spearman": 0.4},
    "calibration": {"coverage": 0.9, "test_coverage": 0.88, "test_mean_width": 1.7},
    "domain": {
        "threshold": 0.3,
        "test_in_domain_fraction": 0.95,
        "test_error_in_domain": 0.8,
        "test_error_out_of_domain": 1.6,
    },
}
DRAWN_JS = (
    "(() => { const img = document.getElementById('drawing-0');"
    " return !!img && img.complete && img.naturalWidth > 0; })()"
)


def test_explain_a_molecule_from_the_model_page(page, tenant, pg_app, pg_settings, processes, tmp_path: Path) -> None:
    from PIL import Image

    database = pg_app.extensions["medmaas.db"]
    seed_tiny_model_and_library(database, pg_settings.artifacts, tenant.id, SMILES)
    with database.session() as s:
        s.execute(update(ModelVersion).where(ModelVersion.tenant_id == tenant.id).values(metrics=TRUST))
    processes().worker("inference")  # loads torch while the browser signs in
    sign_in(page, tenant.key)

    page.goto("/models/tiny")
    assert page.locator("#trust-v1-faithfulness").is_visible()
    assert "3.00× as much" in page.locator("#trust-v1-faithfulness").inner_text()
    page.screenshot(path=str(tmp_path / "model-page-trust.png"), full_page=True)
    page.get_by_label("SMILES", exact=True).fill("c1ccccc1CCO")
    page.get_by_role("button", name="Explain", exact=True).click()
    page.wait_for_url(re.compile(r"/jobs/\d+/explanation$"))
    page.locator("#drawing-0").wait_for(timeout=45_000)  # the page reloads itself once the job is done
    wait_js(page, DRAWN_JS, timeout=10_000)

    img = page.locator("#drawing-0")
    box = img.bounding_box()
    assert box is not None
    assert box["width"] > 100
    assert box["height"] > 100
    src = img.get_attribute("src") or ""
    drawing = page.request.get(src)
    assert drawing.status == 200
    assert drawing.headers["content-type"].startswith("image/svg+xml")
    assert "<svg" in drawing.text()
    assert "<script" not in drawing.text()
    assert "c1ccccc1CCO" in page.locator("#item-0").inner_text()

    shot = tmp_path / "explain-a-molecule.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0
    pixels = Image.open(io.BytesIO(img.screenshot())).convert("RGB")
    assert pixels.width > 100
    assert pixels.height > 100
    colours = pixels.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 2  # a drawing, not a blank box

    # Phone width: the explanation and the model page's trust tables still fit.
    page.set_viewport_size({"width": 390, "height": 844})
    explanation_url = page.url
    for url in (explanation_url, "/models/tiny"):
        page.goto(url)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, url
    page.screenshot(path=str(tmp_path / "model-page-mobile.png"), full_page=True)
    assert page.js_errors == []  # no CSP violation, no script error


THUMBS_JS = (
    "(() => { const imgs = [...document.querySelectorAll('#topk-table img.thumb')];"
    " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0; })()"
)


def test_a_score_jobs_top_k_table_shows_the_drawn_structures(
    page,
    tenant,
    pg_app,
    pg_settings,
    processes,
    tmp_path: Path,
) -> None:
    database = pg_app.extensions["medmaas.db"]
    library_id = seed_tiny_model_and_library(database, pg_settings.artifacts, tenant.id, SMILES)
    processes().worker("cpu,gpu")
    job = tenant.api.submit("score", {"model": "tiny", "library_id": library_id, "top_k": 5, "explain_top_k": 3})
    sign_in(page, tenant.key)
    done = tenant.api.wait(job["id"], timeout=45)
    assert done["state"] == "succeeded", done["error"]
    assert len(done["result"]["explanations"]) == 3

    page.goto(f"/jobs/{job['id']}")
    table = page.locator("#topk-table")
    assert table.locator("tbody tr").count() == 5
    assert wait_js(page, THUMBS_JS, timeout=10_000) == 3  # ranks 1-3 drawn, 4-5 SMILES only
    box = table.locator("img.thumb").first.bounding_box()
    assert box is not None
    assert box["width"] > 50
    assert box["height"] > 50
    assert table.locator("tbody tr").nth(4).locator("img").count() == 0
    page.screenshot(path=str(tmp_path / "score-top-k.png"), full_page=True)
    assert page.js_errors == []
