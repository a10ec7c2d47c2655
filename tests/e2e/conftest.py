"""Browser fixtures: a live server on the PostgreSQL app and Debian's headless Chromium
driven by Playwright. A missing browser fails the tests (it is never downloaded)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from app import jobs
from app.models import Job
from tests.conftest import ARTIFACTS_DIR, ApiClient, create_tenant_key
from tests.e2e.live_server import LiveServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def live_server(pg_app):  # noqa: ANN001, ANN201
    server = LiveServer(pg_app).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():  # noqa: ANN201
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def context(browser, live_server):  # noqa: ANN001, ANN201
    ctx = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(30_000)
    yield ctx
    ctx.close()


@pytest.fixture()
def page(context):  # noqa: ANN001, ANN201
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.js_errors = errors  # checked by tests that care
    yield page


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS_DIR


@pytest.fixture()
def tenant(pg_app):  # noqa: ANN001, ANN201
    tenant_id, key = create_tenant_key(pg_app)
    api = ApiClient(pg_app.test_client(), key)
    yield SimpleNamespace(id=tenant_id, key=key, api=api)
    # Nothing of this test may keep a later test's worker busy (its key may be revoked by now).
    with pg_app.extensions["medmaas.db"].session() as s:
        for job_id in s.scalars(select(Job.id).where(Job.tenant_id == tenant_id, Job.state.in_(["queued", "running"]))):
            jobs.request_cancel(s, job_id)
