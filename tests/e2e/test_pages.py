"""The web pages in a real headless Chromium against a live server, PostgreSQL, Redis and
real worker subprocesses: sign-in, live progress and metric curves, cancel, tenant
isolation, CSRF, dataset upload, training from the form and the model registry pages."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from sqlalchemy import update

from app.models import ApiKey, utcnow
from tests.conftest import ApiClient, create_tenant_key
from tests.e2e.helpers import sign_in, wait_js

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

def progress_value(page) -> float:  # noqa: ANN001
    return page.locator("#job-progress").evaluate("el => el.value")


def chart_points(page, chart: str) -> int:  # noqa: ANN001
    return int(page.locator(f"#chart-{chart}").get_attribute("data-points") or 0)


def test_submit_from_form_then_watch_progress_eta_and_curves_live(page, tenant, processes, artifacts_dir) -> None:  # noqa: ANN001
    procs = processes()
    procs.worker()
    sign_in(page, tenant.key)

    page.goto("/jobs/new")
    assert page.get_by_label("Kind", exact=True).input_value() == "sleep"
    page.get_by_label("Spec (JSON object)", exact=True).fill(json.dumps({"seconds": 8, "steps": 8, "metrics": True}))
    page.get_by_role("button", name="Submit job").click()
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    job_id = int(page.url.rsplit("/", 1)[1])
    assert page.locator("h1").inner_text().startswith(f"Job #{job_id}")
    page.evaluate("window.__sameDocument = true")  # gone if the page reloads

    # The progress bar advances, with an ETA, without a reload.
    wait_js(page, "document.getElementById('job-progress').value > 0", timeout=60_000)
    first = progress_value(page)
    wait_js(page, f"document.getElementById('job-progress').value > {first}", timeout=30_000)
    assert re.search(r"ETA", page.locator("#progress-eta").inner_text()) or progress_value(page) == 1.0
    assert page.locator("#job-state").inner_text().lower() in ("running", "succeeded")

    # The loss chart gains points as metric events arrive.
    wait_js(page, "+document.getElementById('chart-loss').dataset.points >= 1", timeout=30_000)
    points = chart_points(page, "loss")
    wait_js(page, f"+document.getElementById('chart-loss').dataset.points > {points}", timeout=30_000)
    assert page.locator("#chart-loss canvas").count() >= 1
    assert page.locator("#chart-loss").get_attribute("data-series") == "train_loss,val_loss"
    assert page.locator("#chart-val").get_attribute("data-series") == "val_rmse"

    wait_js(page, "document.getElementById('job-state').textContent === 'succeeded'", timeout=60_000)
    wait_js(page, "+document.getElementById('chart-loss').dataset.points === 8")
    assert chart_points(page, "val") == 8
    assert page.evaluate("window.__sameDocument") is True
    assert progress_value(page) == 1.0
    assert "Epoch 8" in page.locator("#metrics-latest").inner_text()
    assert page.locator("#event-rows tr.ev-metric").count() == 8
    assert page.locator("#cancel-form").is_hidden()

    with page.expect_download() as download:
        page.get_by_role("link", name="Download result").click()
    result = json.loads(Path(download.value.path()).read_text())
    assert result["steps"] == 8 and result["attempt"] == 1
    assert page.js_errors == []


def test_jobs_list_updates_live_and_filters(page, tenant, processes) -> None:  # noqa: ANN001
    procs = processes()
    procs.worker()
    sign_in(page, tenant.key)
    page.goto("/jobs")
    assert page.locator("#jobs-empty").is_visible()
    page.evaluate("window.__sameDocument = true")

    job = tenant.api.submit("sleep", {"seconds": 3, "steps": 3})
    row = page.locator(f"tr[data-job-id='{job['id']}']")
    row.wait_for(timeout=15_000)
    page.locator(f"tr[data-job-id='{job['id']}'][data-state='succeeded']").wait_for(timeout=60_000)
    assert row.locator(".badge").inner_text().lower() == "succeeded"
    assert row.locator("td[data-label='Kind']").inner_text() == "sleep"
    assert row.locator("progress").evaluate("el => el.value") == 1.0
    assert page.evaluate("window.__sameDocument") is True
    assert page.locator("[data-count='succeeded']").inner_text() == "1"

    failed = tenant.api.submit("sleep", {"seconds": 0, "steps": 1, "fail": True})
    assert tenant.api.wait(failed["id"])["state"] == "failed"
    page.goto("/jobs?state=failed")
    page.locator(f"tr[data-job-id='{failed['id']}']").wait_for()
    assert page.locator("#job-rows tr").count() == 1
    page.get_by_label("State", exact=True).select_option("succeeded")
    page.get_by_role("button", name="Apply filters").click()
    page.wait_for_url(re.compile(r"state=succeeded"))
    page.locator(f"tr[data-job-id='{job['id']}']").wait_for()
    assert page.locator(f"tr[data-job-id='{failed['id']}']").count() == 0
    assert page.js_errors == []


def test_cancel_running_job_from_its_page(page, tenant, processes) -> None:  # noqa: ANN001
    procs = processes()
    procs.worker()
    sign_in(page, tenant.key)
    job = tenant.api.submit("sleep", {"seconds": 60, "steps": 60})
    page.goto(f"/jobs/{job['id']}")
    wait_js(page, "document.getElementById('job-state').textContent === 'running'", timeout=60_000)
    page.get_by_role("button", name="Cancel job").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel job").click()  # confirm
    page.wait_for_url(re.compile(rf"/jobs/{job['id']}$"))
    wait_js(page, "document.getElementById('job-state').textContent === 'cancelled'", timeout=15_000)
    assert page.locator("#cancel-form").is_hidden()
    assert tenant.api.job(job["id"])["state"] == "cancelled"
    assert page.js_errors == []


def test_another_tenants_job_is_not_found(page, tenant, pg_app) -> None:  # noqa: ANN001
    other = ApiClient(pg_app.test_client(), create_tenant_key(pg_app)[1])
    theirs = other.submit("sleep", {"seconds": 0, "steps": 1})
    try:
        sign_in(page, tenant.key)
        response = page.goto(f"/jobs/{theirs['id']}")
        assert response.status == 404
        assert "Not found" in page.locator("h1").inner_text()
        for path in (f"/ui/api/jobs/{theirs['id']}", f"/ui/api/jobs/{theirs['id']}/events",
                     f"/ui/api/jobs/{theirs['id']}/stream", f"/jobs/{theirs['id']}/result"):
            assert page.request.get(path).status == 404, path
        listed = page.request.get("/ui/api/jobs").json()["items"]
        assert theirs["id"] not in [j["id"] for j in listed]
        # Cancelling someone else's job: 404 (with a valid CSRF token), and nothing changes.
        token = page.evaluate("document.querySelector('input[name=csrf_token]').value")
        assert page.request.post(f"/jobs/{theirs['id']}/cancel", form={"csrf_token": token}).status == 404
        assert other.job(theirs["id"])["cancel_requested"] is False
    finally:
        other.post(f"/api/v1/jobs/{theirs['id']}/cancel")


def test_csrf_token_is_required_on_posts(page, tenant) -> None:  # noqa: ANN001
    job = tenant.api.submit("sleep", {"seconds": 60, "steps": 2})  # no worker: stays queued
    sign_in(page, tenant.key)
    page.goto(f"/jobs/{job['id']}")
    missing = page.request.post(f"/jobs/{job['id']}/cancel", form={})
    forged = page.request.post(f"/jobs/{job['id']}/cancel", form={"csrf_token": "forged"})
    assert missing.status == 400 and forged.status == 400
    assert "security token" in missing.text()
    assert tenant.api.job(job["id"])["state"] == "queued"
    assert page.request.post("/jobs/new", form={"kind": "sleep", "spec": "{}"}).status == 400
    assert page.request.post("/logout", form={}).status == 400
    # The JSON twins are read-only, and the Bearer API does not accept the session cookie.
    assert page.request.post("/ui/api/jobs", form={}).status == 405
    assert page.request.get("/api/v1/jobs").status == 401
    # With the page's own token the same POST works.
    page.get_by_role("button", name="Cancel job").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel job").click()
    wait_js(page, "document.getElementById('job-state').textContent === 'cancelled'")
    assert tenant.api.job(job["id"])["state"] == "cancelled"


def test_bad_key_is_refused_and_revoked_key_signs_out(page, tenant, pg_app) -> None:  # noqa: ANN001
    page.goto("/jobs")
    page.wait_for_url(re.compile(r"/login\?next=%2Fjobs|/login\?next=/jobs"))
    page.get_by_label("API key", exact=True).fill("mm_000000000000_not-a-real-key")
    page.get_by_role("button", name="Sign in").click()
    assert "not valid" in page.get_by_role("alert").inner_text()
    assert page.get_by_label("API key", exact=True).get_attribute("aria-invalid") == "true"

    sign_in(page, tenant.key)
    assert tenant.key not in page.context.cookies()[0]["value"]
    with pg_app.extensions["medmaas.db"].session() as s:
        s.execute(update(ApiKey).where(ApiKey.tenant_id == tenant.id).values(revoked_at=utcnow()))
    page.goto("/jobs")
    page.wait_for_url(re.compile(r"/login"))
    assert "no longer valid" in page.get_by_role("alert").inner_text()
    assert page.request.get("/ui/api/jobs").status == 401


def _solubility_with_bad_rows(tmp_path: Path) -> Path:
    from app.sample_data import solubility_csv

    path = solubility_csv(tmp_path / "solubility.csv")
    with open(path, "a", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["not_a_smiles((", "broken", "-1.0", "train"])
        writer.writerow(["C1CC", "unclosed ring", "-2.0", "train"])
    return path


def test_upload_train_watch_curves_and_use_the_registry(page, tenant, processes, tmp_path, artifacts_dir) -> None:  # noqa: ANN001
    procs = processes()
    procs.worker("cpu,gpu")
    sign_in(page, tenant.key)

    # Upload through the form; the validation report lists the invalid rows with reasons.
    page.goto("/datasets")
    page.get_by_label("File", exact=True).set_input_files(str(_solubility_with_bad_rows(tmp_path)))
    page.get_by_label("Kind", exact=True).select_option("sequences")
    page.get_by_label("Name", exact=True).fill("solubility (e2e)")
    page.get_by_label("Options").fill("text_column=smiles\nlabel_columns=solubility")
    page.get_by_role("button", name="Upload and validate").click()
    page.wait_for_url(re.compile(r"/datasets/\d+$"), timeout=120_000)
    dataset_id = int(page.url.rsplit("/", 1)[1])
    assert int(page.locator("#ds-rows").inner_text()) > 1000
    stored = tenant.api.get(f"/api/v1/datasets/{dataset_id}").get_json()
    assert int(page.locator("#ds-invalid").inner_text()) == stored["invalid_rows"] >= 2  # ours + the source's own
    invalid = page.locator("table.invalid-samples")
    assert invalid.locator("tbody tr").count() == len(stored["invalid_samples"])
    assert "reason" in invalid.locator("thead").inner_text().lower()
    assert "unclosed ring" in invalid.inner_text()  # our appended "C1CC" row, with RDKit's reason

    # A bad upload is rejected with the API's message, and nothing is stored.
    page.goto("/datasets")
    bad = tmp_path / "bad.csv"
    bad.write_text("name,value\nx,1\n")
    page.get_by_label("File", exact=True).set_input_files(str(bad))
    page.get_by_role("button", name="Upload and validate").click()
    assert page.locator("#upload-error").is_visible()
    page.js_errors.clear()  # the browser logs the page's expected 4xx status
    assert tenant.api.get("/api/v1/datasets").get_json()["items"][0]["id"] == dataset_id

    # Train from the form (the dataset picks the architecture) and watch real metric events.
    page.goto(f"/datasets/{dataset_id}")
    page.get_by_role("link", name="Train on this dataset").click()
    page.wait_for_url(re.compile(r"/train/new\?dataset_id=\d+"))
    assert page.get_by_label("Dataset", exact=True).input_value() == str(dataset_id)
    assert page.get_by_label("Architecture", exact=True).input_value() == "rnn"
    page.get_by_label("Model name", exact=True).fill("sol-e2e")
    page.get_by_label("Target column(s)", exact=True).fill("solubility")
    page.get_by_label("Task", exact=True).select_option("regression")
    page.get_by_label("Epochs", exact=True).fill("4")
    page.get_by_label("Batch size", exact=True).fill("64")
    page.get_by_label("Learning rate", exact=True).fill("0.003")
    page.get_by_label("Architecture parameters (JSON)", exact=True).fill('{"embedding_dim": 16, "hidden_size": 32}')
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    job_id = int(page.url.rsplit("/", 1)[1])
    page.evaluate("window.__sameDocument = true")

    wait_js(page, "+document.getElementById('chart-loss').dataset.points >= 1", timeout=300_000)
    seen = chart_points(page, "loss")
    wait_js(page, "document.getElementById('job-state').textContent !== 'running' || "
                           f"+document.getElementById('chart-loss').dataset.points > {seen}", timeout=300_000)
    wait_js(page, "['succeeded','failed','cancelled'].includes(document.getElementById('job-state').textContent)",
                           timeout=300_000)
    job = tenant.api.job(job_id)
    assert job["state"] == "succeeded", (job["error"], procs.logs())
    wait_js(page, "+document.getElementById('chart-loss').dataset.points === 4")
    assert page.evaluate("window.__sameDocument") is True
    assert {"train_loss", "val_loss"} <= set(page.locator("#chart-loss").get_attribute("data-series").split(","))
    assert "val_rmse" in page.locator("#chart-val").get_attribute("data-series").split(",")
    assert "Epoch 4" in page.locator("#metrics-latest").inner_text()
    metric_epochs = [e["data"]["epoch"] for e in tenant.api.events(job_id) if e["type"] == "metric"]
    assert metric_epochs == [1, 2, 3, 4]

    page.screenshot(path=str(artifacts_dir / "job-page.png"), full_page=True)
    phone = page.context.new_page()
    phone.set_viewport_size({"width": 390, "height": 844})
    phone.goto(f"/jobs/{job_id}")
    wait_js(phone, "+document.getElementById('chart-loss').dataset.points === 4")
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # nothing overflows sideways
    phone.screenshot(path=str(artifacts_dir / "job-page-mobile.png"), full_page=True)
    phone.close()

    # The model link leads to the registry page: versions with metrics, aliases, weights.
    page.get_by_role("link", name="Model sol-e2e").click()
    page.wait_for_url(re.compile(r"/models/sol-e2e$"))
    versions = page.locator("#versions-table tbody tr")
    assert versions.count() == 1 and "v1" in versions.first.inner_text()
    assert "test_rmse" in versions.first.inner_text()
    page.get_by_label("Alias", exact=True).fill("production")
    page.get_by_role("button", name="Set alias").click()
    assert "sol-e2e@production now points to version 1" in page.locator(".flash-info").inner_text()
    assert tenant.api.get("/api/v1/models/sol-e2e").get_json()["aliases"] == {"production": 1}
    with page.expect_download() as download:
        page.locator("#versions-table").get_by_role("link", name="weights").click()
    from safetensors.numpy import load_file

    assert load_file(download.value.path())  # plain tensors

    page.goto("/models")
    assert "production → v1" in page.locator("#models-table").inner_text()
    assert page.js_errors == []

    # Score a library from the score form, then download the score file from the job page.
    library = tmp_path / "library.smi"
    library.write_text("CCO ethanol\nc1ccccc1 benzene\nCCCCCCCCCCCCCCCC hexadecane\nC1CC broken\n")
    page.goto("/datasets")
    page.get_by_label("File", exact=True).set_input_files(str(library))
    page.get_by_label("Kind", exact=True).select_option("library")
    page.get_by_label("Options").fill("")
    page.get_by_role("button", name="Upload and validate").click()
    page.wait_for_url(re.compile(r"/datasets/\d+$"))
    page.get_by_role("link", name="Score this library").click()
    page.wait_for_url(re.compile(r"/score/new\?library_id=\d+"))
    page.get_by_label("Model", exact=True).fill("sol-e2e@production")
    page.get_by_label("Top k", exact=True).fill("2")
    page.get_by_role("button", name="Start scoring").click()
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    score_id = int(page.url.rsplit("/", 1)[1])
    wait_js(page, "['succeeded','failed','cancelled'].includes(document.getElementById('job-state').textContent)",
            timeout=300_000)
    job = tenant.api.job(score_id)
    assert job["state"] == "succeeded", (job["error"], procs.logs())
    assert page.locator("#model-link").inner_text() == "Model sol-e2e@production"
    with page.expect_download() as download:
        page.get_by_role("link", name="Download result").click()
    assert download.value.suggested_filename == f"job-{score_id}-scores.csv"
    with open(download.value.path()) as fh:
        scored = list(csv.DictReader(fh))
    assert len(scored) == 4 and "ring" in " ".join(scored[3].values())
    page.goto("/jobs?kind=score")
    assert page.locator("#job-rows tr").count() == 1

    # Screenshots of the other pages, wide and narrow, for a human to look at.
    shots = artifacts_dir / "pages"
    shots.mkdir(exist_ok=True)
    for name, path in (("jobs", "/jobs"), ("submit", "/jobs/new"), ("train", f"/train/new?dataset_id={dataset_id}"),
                       ("score", "/score/new?model=sol-e2e@production"), ("datasets", "/datasets"),
                       ("dataset", f"/datasets/{dataset_id}"), ("models", "/models"), ("model", "/models/sol-e2e")):
        for width, suffix in ((1280, ""), (390, "-mobile")):
            page.set_viewport_size({"width": width, "height": 900 if width > 400 else 844})
            page.goto(path)
            assert page.evaluate("document.documentElement.scrollWidth") <= width, (name, width)
            unlabeled = page.evaluate("""[...document.querySelectorAll('input:not([type=hidden]), select, textarea, button')]
                .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                              && !el.getAttribute('aria-labelledby') && !el.textContent.trim())
                .map(el => el.outerHTML)""")
            assert unlabeled == [], (name, unlabeled)
            page.screenshot(path=str(shots / f"{name}{suffix}.png"), full_page=True)
    assert page.js_errors == []
