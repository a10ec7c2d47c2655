"""The pages a new user meets in their first hour, in a real Chromium against a live server,
PostgreSQL, Redis and real workers: a finished job's progress bar says how it ended, cancel
asks first (with and without JavaScript), the train form's split, and predicting from a
model's page."""
from __future__ import annotations

import base64
import csv
import io
import re
from pathlib import Path

import pytest

from tests.conftest import ApiClient
from tests.e2e.helpers import sign_in, wait_js

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

TERMINAL_JS = "['succeeded','failed','cancelled'].includes(document.getElementById('job-state').textContent)"
# The bar's fill colours in app.css (and the running blue, which a finished job must not keep).
FILLS = {"running": (37, 99, 235), "succeeded": (5, 150, 105), "failed": (220, 38, 38), "cancelled": (148, 163, 184)}


def bar_fill(page) -> str:  # noqa: ANN001
    """Which fill colour the bar is painted in, read from the pixels of a screenshot."""
    from PIL import Image

    shot = page.locator("#job-progress").screenshot(animations="disabled")
    img = Image.open(io.BytesIO(shot)).convert("RGB")
    pixel = img.getpixel((12, img.height // 2))
    return min(FILLS, key=lambda k: sum((a - b) ** 2 for a, b in zip(FILLS[k], pixel, strict=True)))


def bar(page) -> dict:  # noqa: ANN001
    return {
        "value": page.locator("#job-progress").evaluate("el => el.value"),
        "state": page.locator("#job-progress").get_attribute("data-state"),
        "label": page.locator("#progress-pct").inner_text(),
        "message": page.locator("#progress-message").inner_text(),
        "fill": bar_fill(page),
    }


def test_finished_jobs_bars_show_how_they_ended_live_and_on_load(page, tenant, processes, artifacts_dir) -> None:  # noqa: ANN001
    procs = processes()
    procs.worker()
    sign_in(page, tenant.key)
    shots = shots_dir(artifacts_dir)

    # Cancelled: the live stream delivers the terminal state to an open page.
    job = tenant.api.submit("sleep", {"seconds": 60, "steps": 20})
    page.goto(f"/jobs/{job['id']}")
    page.evaluate("window.__sameDocument = true")
    wait_js(page, "document.getElementById('job-progress').value >= 0.1", timeout=60_000)
    assert bar(page)["fill"] == "running"
    assert tenant.api.post(f"/api/v1/jobs/{job['id']}/cancel").status_code in (200, 202)
    wait_js(page, "document.getElementById('job-state').textContent === 'cancelled'", timeout=30_000)
    stopped = round(100 * tenant.api.job(job["id"])["progress"])
    live = bar(page)
    assert page.evaluate("window.__sameDocument") is True
    assert live["state"] == "cancelled" and live["fill"] == "cancelled", live
    assert live["label"] == f"cancelled at {stopped}%" and 10 <= stopped < 100, live
    assert abs(live["value"] - stopped / 100) < 0.011
    page.screenshot(path=str(shots / "job-cancelled.png"), full_page=True)
    page.reload()
    assert bar(page) == live  # the same on load

    # Failed: red, with the error's first line, live and on load.
    failed = tenant.api.submit("sleep", {"seconds": 1, "steps": 2, "fail": True})
    page.goto(f"/jobs/{failed['id']}")
    wait_js(page, TERMINAL_JS, timeout=60_000)
    wait_js(page, "document.getElementById('job-progress').dataset.state === 'failed'", timeout=60_000)
    error = tenant.api.job(failed["id"])["error"]
    first = error.strip().splitlines()[0].strip()
    assert "sleep job asked to fail" in error
    live = bar(page)
    assert live["fill"] == "failed" and live["label"].startswith("failed at ") and live["message"] == first, live
    page.reload()
    loaded = bar(page)
    assert loaded == live
    assert "\n" not in loaded["message"]
    page.screenshot(path=str(shots / "job-failed.png"), full_page=True)

    # Succeeded: full and green, live and on load.
    ok = tenant.api.submit("sleep", {"seconds": 1, "steps": 2})
    page.goto(f"/jobs/{ok['id']}")
    wait_js(page, "document.getElementById('job-state').textContent === 'succeeded'", timeout=60_000)
    live = bar(page)
    assert live["value"] == 1.0 and live["label"] == "100%" and live["fill"] == "succeeded", live
    page.reload()
    assert bar(page)["fill"] == "succeeded" and bar(page)["value"] == 1.0

    # The jobs list paints its bars the same way.
    page.goto("/jobs")
    row = page.locator(f"tr[data-job-id='{job['id']}'] progress")
    assert row.evaluate("el => getComputedStyle(el).getPropertyValue('--bar').trim()") == "#94a3b8"
    assert page.js_errors == []


def test_cancel_asks_first_in_a_dialog(page, tenant, processes, artifacts_dir) -> None:  # noqa: ANN001
    procs = processes()
    procs.worker()
    sign_in(page, tenant.key)
    job = tenant.api.submit("sleep", {"seconds": 60, "steps": 60})
    page.goto(f"/jobs/{job['id']}")
    wait_js(page, "document.getElementById('job-state').textContent === 'running'", timeout=60_000)

    page.get_by_role("button", name="Cancel job").click()
    dialog = page.get_by_role("dialog")
    assert dialog.is_visible()
    assert dialog.get_by_role("heading").inner_text() == f"Cancel job #{job['id']}?"
    page.screenshot(path=str(shots_dir(artifacts_dir) / "cancel-dialog.png"))
    dialog.get_by_role("button", name="Keep running").click()
    assert dialog.is_hidden()
    assert page.url.endswith(f"/jobs/{job['id']}")
    page.wait_for_timeout(500)
    assert tenant.api.job(job["id"])["cancel_requested"] is False

    page.get_by_role("button", name="Cancel job").click()
    page.keyboard.press("Escape")  # closes like "Keep running"
    assert dialog.is_hidden()
    assert tenant.api.job(job["id"])["cancel_requested"] is False

    page.get_by_role("button", name="Cancel job").click()
    dialog.get_by_role("button", name="Cancel job").click()
    page.wait_for_url(re.compile(rf"/jobs/{job['id']}$"))
    wait_js(page, "document.getElementById('job-state').textContent === 'cancelled'", timeout=30_000)
    assert tenant.api.job(job["id"])["state"] == "cancelled"
    assert page.locator("#cancel-form").is_hidden()
    assert page.js_errors == []


def test_cancel_confirmation_page_without_javascript(browser, live_server, tenant, artifacts_dir) -> None:  # noqa: ANN001
    job = tenant.api.submit("sleep", {"seconds": 60, "steps": 2})  # no worker: stays queued
    ctx = browser.new_context(base_url=live_server.url, java_script_enabled=False, viewport={"width": 1280, "height": 900})
    try:
        page = ctx.new_page()
        sign_in(page, tenant.key)
        page.goto(f"/jobs/{job['id']}")
        page.get_by_role("button", name="Cancel job").click()
        page.wait_for_url(re.compile(rf"/jobs/{job['id']}/cancel\??$"))
        assert page.locator("h1").inner_text() == f"Cancel job #{job['id']}?"
        page.screenshot(path=str(shots_dir(artifacts_dir) / "cancel-confirm-nojs.png"))
        page.get_by_role("link", name="Keep running").click()
        page.wait_for_url(re.compile(rf"/jobs/{job['id']}$"))
        assert tenant.api.job(job["id"])["state"] == "queued"

        page.get_by_role("button", name="Cancel job").click()
        page.wait_for_url(re.compile(rf"/jobs/{job['id']}/cancel\??$"))
        page.get_by_role("button", name="Cancel job").click()  # posts with the CSRF token
        page.wait_for_url(re.compile(rf"/jobs/{job['id']}$"))
        assert f"Job #{job['id']} cancelled." in page.locator(".flash-info").inner_text()
        assert tenant.api.job(job["id"])["state"] == "cancelled"
        # Cancelled: the page shows how it ended without a script, and the confirmation says so.
        assert page.locator("#progress-pct").inner_text() == "cancelled at 0%"
        assert page.locator("#cancel-form").is_hidden()
        page.goto(f"/jobs/{job['id']}/cancel")
        assert page.locator("h1").inner_text() == f"Job #{job['id']} already cancelled"
        assert page.get_by_role("button", name="Cancel job").count() == 0
    finally:
        ctx.close()


def _small_sequences(tmp_path: Path, rows: int = 240) -> Path:
    from app.sample_data import solubility_csv

    full = solubility_csv(tmp_path / "solubility-full.csv")
    out = tmp_path / "solubility-small.csv"
    with open(full, newline="") as src, open(out, "w", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.writer(dst)
        writer.writerow(["smiles", "solubility"])
        for i, row in enumerate(reader):
            if i >= rows:
                break
            writer.writerow([row["smiles"], row["solubility"]])
    return out


def _upload(api: ApiClient, kind: str, path: Path, **options: str) -> dict:
    with open(path, "rb") as fh:
        r = api.post("/api/v1/datasets", data={"kind": kind, "file": (fh, path.name), **options},
                     content_type="multipart/form-data")
    assert r.status_code == 201, r.get_json()
    return r.get_json()


def test_train_form_split_then_predict_from_the_model_page(page, tenant, processes, tmp_path, artifacts_dir,  # noqa: ANN001
                                                           monkeypatch) -> None:  # noqa: ANN001
    from app.web import library

    procs = processes()
    procs.worker("cpu,gpu")
    ds = _upload(tenant.api, "sequences", _small_sequences(tmp_path), label_columns="solubility")
    sign_in(page, tenant.key)
    shots = shots_dir(artifacts_dir)

    def fill_train_form(val: str, test: str, method: str = "scaffold") -> None:
        page.goto(f"/train/new?dataset_id={ds['id']}")
        page.get_by_label("Model name", exact=True).fill("first-hour")
        page.get_by_label("Target column(s)", exact=True).fill("solubility")
        page.get_by_label("Epochs", exact=True).fill("2")
        page.get_by_label("Architecture parameters (JSON)", exact=True).fill('{"embedding_dim": 8, "hidden_size": 16}')
        page.get_by_label("Split method", exact=True).select_option(method)
        page.get_by_label("Validation fraction", exact=True).fill(val)
        page.get_by_label("Test fraction", exact=True).fill(test)

    # Out of range: the form shows the API's own message for split.val.
    api_error = tenant.api.post("/api/v1/jobs", json={"kind": "train", "spec": {
        "model_name": "x", "dataset_id": ds["id"], "arch": "rnn", "split": {"method": "scaffold", "val": 1.5}}})
    assert api_error.status_code == 422
    api_message = " ".join(api_error.get_json()["error"]["details"]["spec"]["split"]["val"])
    fill_train_form("1.5", "0.1")
    page.locator("#train-form").evaluate("f => f.noValidate = true")  # past the browser's own min/max check
    page.get_by_role("button", name="Start training").click()
    assert page.locator("#form-error").is_visible()
    assert page.locator("#val_fraction-error").inner_text() == api_message
    assert page.get_by_label("Validation fraction", exact=True).get_attribute("aria-invalid") == "true"
    assert page.get_by_label("Split method", exact=True).input_value() == "scaffold"  # the form keeps what was typed
    page.screenshot(path=str(shots / "train-split-error.png"), full_page=True)

    # Each fraction fine, but nothing left to train on: the API's message for the split.
    api_error = tenant.api.post("/api/v1/jobs", json={"kind": "train", "spec": {
        "model_name": "x", "dataset_id": ds["id"], "arch": "rnn", "split": {"method": "random", "val": 0.6, "test": 0.5}}})
    assert api_error.status_code == 422
    split_errors = api_error.get_json()["error"]["details"]["spec"]["split"]
    api_messages = " ".join(m for ms in split_errors.values() for m in ms)
    fill_train_form("0.6", "0.5", method="random")
    page.get_by_role("button", name="Start training").click()
    assert page.locator("#split-error").inner_text() == api_messages
    assert page.locator("#val_fraction-error").count() == 0
    page.js_errors.clear()  # the browser logs the page's 4xx status

    # A scaffold split with 20 % validation and 10 % test trains.
    fill_train_form("0.2", "0.1")
    page.get_by_role("button", name="Start training").click()
    page.wait_for_url(re.compile(r"/jobs/\d+$"))
    job_id = int(page.url.rsplit("/", 1)[1])
    spec = tenant.api.job(job_id)["spec"]
    assert spec["split"] == {"method": "scaffold", "train": 0.7, "val": 0.2, "test": 0.1}
    wait_js(page, TERMINAL_JS, timeout=300_000)
    done = tenant.api.job(job_id)
    assert done["state"] == "succeeded", (done["error"], procs.logs())
    assert page.locator("#job-progress").get_attribute("data-state") == "succeeded"
    data_info = done["result"].get("data") or {}
    if "split" in data_info:
        assert data_info["split"] == "scaffold"
    assert tenant.api.put("/api/v1/models/first-hour/aliases/production", json={"version": 1}).status_code == 200

    # No inference worker yet: the page links to the job instead of waiting on.
    monkeypatch.setattr(library, "PREDICT_WAIT_S", 1.0)
    page.goto("/models/first-hour")
    page.get_by_label("Inputs, one per line", exact=True).fill("CCO\n")
    page.get_by_role("button", name="Predict").click()
    pending = page.locator("#prediction-pending")
    assert pending.is_visible()
    pending_job = int(page.locator("#prediction-result").get_attribute("data-job-id"))
    assert pending.get_by_role("link", name=f"job #{pending_job}").get_attribute("href") == f"/jobs/{pending_job}"
    assert tenant.api.job(pending_job)["kind"] == "predict"

    # With an inference worker the predictions come back as a table, one row per input.
    procs.worker("inference")
    tenant.api.wait(pending_job, timeout=120)  # the worker is up (and the model loaded)
    monkeypatch.setattr(library, "PREDICT_WAIT_S", 60.0)
    page.goto("/models/first-hour")
    assert page.get_by_label("Version or alias", exact=True).locator("option").all_inner_texts() == [
        "latest (v1)", "production (v1)", "v1"]
    page.get_by_label("Version or alias", exact=True).select_option(label="production (v1)")
    page.get_by_label("Inputs, one per line", exact=True).fill("CCO\n\n  c1ccccc1  \nnot_a_smiles((\n")
    page.get_by_role("button", name="Predict").click()
    table = page.locator("#predictions-table")
    table.wait_for()
    rows = table.locator("tbody tr")
    assert rows.count() == 3
    assert [h.strip() for h in table.locator("thead th").all_text_contents()] == ["Input", "solubility", "Error"]
    cells = [rows.nth(i).locator("td").all_inner_texts() for i in range(3)]
    assert cells[0][0].startswith("CCO") and float(cells[0][1]) and cells[0][2] == ""
    assert cells[1][0].startswith("c1ccccc1") and float(cells[1][1])
    assert cells[2][0] == "not_a_smiles((" and cells[2][1] == "—" and "SMILES" in cells[2][2]
    assert rows.nth(2).get_attribute("class") == "row-error"
    assert page.get_by_label("Version or alias", exact=True).input_value() == "alias:production"
    result_job = int(page.locator("#prediction-result").get_attribute("data-job-id"))
    api_job = tenant.api.job(result_job)
    assert api_job["kind"] == "predict" and api_job["spec"]["inputs"] == ["CCO", "c1ccccc1", "not_a_smiles(("]
    assert api_job["spec"]["version"] == 1
    page.screenshot(path=str(shots / "model-predict.png"), full_page=True)

    # Nothing typed: the form says so, and no job is made.
    before = tenant.api.get("/api/v1/jobs?kind=predict").get_json()["items"]
    page.locator("#predict-form").evaluate("f => f.noValidate = true")
    page.get_by_label("Inputs, one per line", exact=True).fill("  \n")
    page.get_by_role("button", name="Predict").click()
    assert "at least one input" in page.locator("#inputs-error").inner_text()
    assert len(tenant.api.get("/api/v1/jobs?kind=predict").get_json()["items"]) == len(before)
    page.js_errors.clear()

    # Phone width: the predictions table and the form still fit.
    page.set_viewport_size({"width": 390, "height": 844})
    monkeypatch.setattr(library, "PREDICT_WAIT_S", 60.0)
    page.get_by_label("Inputs, one per line", exact=True).fill("CCO\nnot_a_smiles((")
    page.get_by_role("button", name="Predict").click()
    page.locator("#predictions-table").wait_for()
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(shots / "model-predict-mobile.png"), full_page=True)
    assert page.js_errors == []


def test_predict_images_from_the_model_page(page, tenant, processes, tmp_path, artifacts_dir, monkeypatch) -> None:  # noqa: ANN001
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from app.sample_data import digits_npz
    from app.web import library

    procs = processes()
    procs.worker("cpu,gpu")
    procs.worker("inference")
    ds = _upload(tenant.api, "images", digits_npz(tmp_path / "digits.npz"))
    job = tenant.api.submit("train", {"model_name": "digits-page", "dataset_id": ds["id"], "arch": "cnn",
                                      "task": "classification", "epochs": 2, "batch_size": 64, "seed": 0})
    done = tenant.api.wait(job["id"], timeout=300)
    assert done["state"] == "succeeded", (done["error"], procs.logs())

    digits = load_digits()
    files = []
    for i in range(3):
        path = tmp_path / f"digit-{i}.png"
        Image.fromarray(np.clip(digits.images[i] * 255 / 16, 0, 255).astype(np.uint8)).save(path)
        files.append(str(path))
    broken = tmp_path / "broken.png"
    broken.write_bytes(base64.b64decode("bm90IGFuIGltYWdl"))
    files.append(str(broken))

    monkeypatch.setattr(library, "PREDICT_WAIT_S", 60.0)
    sign_in(page, tenant.key)
    page.goto("/models/digits-page")
    assert page.get_by_label("Inputs, one per line").count() == 0
    page.get_by_label("Images", exact=True).set_input_files(files)
    page.get_by_role("button", name="Predict").click()
    table = page.locator("#predictions-table")
    table.wait_for()
    rows = table.locator("tbody tr")
    assert rows.count() == 4
    headers = [h.strip() for h in table.locator("thead th").all_text_contents()]
    assert headers == ["Input", "Label", *(f"p({d})" for d in range(10)), "Error"]  # one column per class
    assert rows.nth(0).locator("td").first.inner_text() == "digit-0.png"
    for i in range(3):
        cells = rows.nth(i).locator("td").all_inner_texts()
        assert cells[1] in [str(d) for d in range(10)] and cells[-1] == ""
        probabilities = [float(c) for c in cells[2:-1]]
        assert abs(sum(probabilities) - 1) < 0.01 and max(probabilities) == float(cells[2 + int(cells[1])])
    assert "unreadable image" in rows.nth(3).locator("td").last.inner_text()
    page.screenshot(path=str(shots_dir(artifacts_dir) / "model-predict-images.png"), full_page=True)
    assert page.js_errors == []


def shots_dir(artifacts_dir: Path) -> Path:
    path = artifacts_dir / "first-hour"
    path.mkdir(exist_ok=True)
    return path
