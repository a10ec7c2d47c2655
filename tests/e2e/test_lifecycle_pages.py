"""Compare, clone and tags in a real headless Chromium against a live server, PostgreSQL,
Redis and a real worker subprocess: tag runs and filter the jobs list by tag and by the spec,
tick runs and compare them (curves overlaid, spec diff, final metrics), run a job again with
changes, and read and edit a model card on the model page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import seed_tiny_model_and_library
from tests.e2e.helpers import sign_in, wait_js

pytestmark = [pytest.mark.e2e, pytest.mark.integration]


def test_tag_filter_and_compare_runs_from_the_jobs_page(page, tenant, processes) -> None:
    procs = processes()
    procs.worker()
    a = tenant.api.submit("sleep", {"seconds": 1, "steps": 3, "metrics": True})
    b = tenant.api.submit("sleep", {"seconds": 1, "steps": 5, "metrics": True})
    other = tenant.api.submit("sleep", {"seconds": 0, "steps": 1})
    for job in (a, b, other):
        assert tenant.api.wait(job["id"], timeout=90)["state"] == "succeeded"
    sign_in(page, tenant.key)

    # Tag both runs from their pages.
    for job in (a, b):
        page.goto(f"/jobs/{job['id']}")
        page.get_by_label("Tags (space or comma separated)").fill("sweep, lr-1e-3")
        page.get_by_role("button", name="Save tags").click()
        page.wait_for_url(re.compile(rf"/jobs/{job['id']}#tags$"))
        assert page.locator("#job-tags").inner_text().split() == ["lr-1e-3", "sweep"]
    assert tenant.api.job(a["id"])["tags"] == ["lr-1e-3", "sweep"]

    # Filter the list by tag, then by text in the spec.
    page.goto("/jobs")
    page.get_by_label("Tag", exact=True).fill("sweep")
    page.get_by_role("button", name="Apply filters").click()
    page.wait_for_url(re.compile(r"tag=sweep"))
    page.locator(f"tr[data-job-id='{a['id']}']").wait_for()
    assert page.locator("#job-rows tr").count() == 2
    assert page.locator(f"tr[data-job-id='{other['id']}']").count() == 0
    page.get_by_label("Search the spec").fill('"steps": 5')
    page.get_by_role("button", name="Apply filters").click()
    page.wait_for_url(re.compile(r"search="))
    page.locator(f"tr[data-job-id='{b['id']}']").wait_for()
    assert page.locator("#job-rows tr").count() == 1

    # Tick two runs; the ticks survive the live refresh; compare them.
    page.goto("/jobs?tag=sweep")
    page.get_by_label(f"Select job {a['id']} to compare").check()
    page.get_by_label(f"Select job {b['id']}" + " to compare").check()
    page.wait_for_timeout(2500)  # the list re-renders every 2 s
    assert page.get_by_label(f"Select job {a['id']} to compare").is_checked()
    page.get_by_role("button", name="Compare selected").click()
    page.wait_for_url(re.compile(r"/jobs/compare\?"))
    assert page.locator("h1").inner_text() == "Compare 2 runs"

    # Curves overlaid: one chart per metric, one line per run.
    chart = page.locator(".compare-chart[data-metric='train_loss']")
    wait_js(page, "document.querySelector(\".compare-chart[data-metric='train_loss'] canvas\") !== null")
    assert chart.get_attribute("data-series") == "2"
    assert chart.get_attribute("data-jobs") == f"{a['id']},{b['id']}"
    assert chart.get_attribute("data-points") == "5"  # epochs 1..5 (run a stops at 3)
    # Spec diff: only the differing key highlighted.
    differs = page.locator("#spec-diff tr.differs")
    assert differs.count() == 1
    assert differs.get_attribute("data-key") == "steps"
    assert differs.locator("td").all_inner_texts() == ["3", "5"]
    # Final metrics side by side (the runs' last values).
    loss = page.locator("#metrics-compare tr[data-key='train_loss'] td")
    assert loss.count() == 2
    assert all(t != "—" for t in loss.all_inner_texts())
    assert page.js_errors == []


def test_run_again_with_changes_from_the_job_page(page, tenant, processes) -> None:
    procs = processes()
    procs.worker()
    src = tenant.api.submit("sleep", {"seconds": 1, "steps": 2, "metrics": True})
    assert tenant.api.wait(src["id"], timeout=90)["state"] == "succeeded"
    sign_in(page, tenant.key)
    page.goto(f"/jobs/{src['id']}")
    page.get_by_role("link", name="Run again with changes").click()
    page.wait_for_url(re.compile(rf"/jobs/{src['id']}/clone$"))
    editor = page.get_by_label("Spec (JSON object)")
    assert '"steps": 2' in editor.input_value()

    # A bad change is refused with the field named, and the edit is kept.
    editor.fill(editor.input_value().replace('"steps": 2', '"steps": -4'))
    page.get_by_role("button", name="Submit new job").click()
    assert "steps" in page.locator("#form-error").inner_text()
    assert '"steps": -4' in page.get_by_label("Spec (JSON object)").input_value()

    editor = page.get_by_label("Spec (JSON object)")
    editor.fill(editor.input_value().replace('"steps": -4', '"steps": 4'))
    page.get_by_role("button", name="Submit new job").click()
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    new_id = int(page.url.rsplit("/", 1)[1])
    assert new_id != src["id"]
    assert f"A copy of job #{src['id']}" in page.locator("#cloned-from").inner_text()
    wait_js(page, "document.getElementById('job-state').textContent === 'succeeded'", timeout=90_000)
    new = tenant.api.job(new_id)
    assert new["cloned_from"] == src["id"]
    assert new["spec"]["steps"] == 4
    assert new["result"]["steps"] == 4
    # the refused submission's 422 page is the only resource that failed to load
    assert [e for e in page.js_errors if "status of 422" not in e] == []


def test_model_card_and_version_tags_on_the_model_page(page, tenant, pg_app, artifacts_dir) -> None:
    seed_tiny_model_and_library(pg_app.extensions["medmaas.db"], artifacts_dir, tenant.id, ["CCO", "c1ccccc1"] * 30)
    sign_in(page, tenant.key)
    page.goto("/models/tiny")
    card = page.locator("#card-v1")
    assert card.is_visible()
    assert "Not written yet." in page.locator("#card-v1-intended_use").inner_text()
    card.get_by_label("Intended use").fill("Rank candidate solvents for screening")
    card.get_by_label("Limitations").fill("Neutral organic molecules only")
    card.get_by_role("button", name="Save card").click()
    page.wait_for_url(re.compile(r"/models/tiny#card-v1$"))
    assert page.locator("#card-v1-intended_use").inner_text() == "Rank candidate solvents for screening"
    card = page.locator("#card-v1")
    card.get_by_label("Tags of v1 (space or comma separated)").fill("candidate")
    card.get_by_role("button", name="Save tags").click()
    page.wait_for_url(re.compile(r"/models/tiny#card-v1$"))
    assert "candidate" in page.locator("#card-v1 summary").inner_text()
    with page.expect_download() as download:
        page.locator("#card-md-v1").click()
    text = Path(download.value.path()).read_text(encoding="utf-8")
    assert "# Model card: tiny v1" in text
    assert "Neutral organic molecules only" in text
    api_card = tenant.api.get("/api/v1/models/tiny/versions/1/card").get_json()
    assert api_card["limitations"] == "Neutral organic molecules only"
    assert tenant.api.get("/api/v1/models/tiny/versions/1").get_json()["tags"] == ["candidate"]
    assert page.js_errors == []
