"""/metrics behind a setting (loopback by default, or a Bearer token; per-tenant series only
with the token), and one set of security headers on API answers, errors and pages alike."""
from __future__ import annotations

import pytest

from tests.conftest import ApiClient, _make_app, close_app, create_tenant_key, use_template

REMOTE = {"REMOTE_ADDR": "10.9.8.7"}


@pytest.fixture()
def token_app(sqlite_settings):  # noqa: ANN001, ANN201
    app = _make_app(sqlite_settings.replace(metrics_token="s3cret-metrics-token"))
    yield app
    close_app(app)


def test_metrics_default_is_loopback_only_without_tenant_names(app, client, api: ApiClient) -> None:  # noqa: ANN001
    api.submit("sleep", {"seconds": 0})
    local = client.get("/metrics")
    assert local.status_code == 200 and 'medmaas_jobs{state="queued"} 1.0' in local.get_data(as_text=True)
    text = local.get_data(as_text=True)
    assert "medmaas_tenant_jobs" not in text and "tenant=" not in text
    remote = client.get("/metrics", environ_base=REMOTE)
    assert remote.status_code == 403 and remote.get_json()["error"]["code"] == "forbidden"
    # a reverse proxy on the same host forwards from loopback: that is not a local scrape
    proxied = client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
    assert proxied.status_code == 403
    # without a configured token, no presented token opens it either
    assert client.get("/metrics", headers={"Authorization": "Bearer "}, environ_base=REMOTE).status_code == 403


def test_metrics_token_opens_it_remotely_with_per_tenant_series(token_app) -> None:  # noqa: ANN001
    client = token_app.test_client()
    _tid, key = create_tenant_key(token_app, "lab-north")
    ApiClient(client, key).submit("sleep", {"seconds": 0})
    for wrong in ("Bearer nope", "Bearer s3cret-metrics-tokenX", "Basic s3cret-metrics-token", ""):
        r = client.get("/metrics", headers={"Authorization": wrong}, environ_base=REMOTE)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", wrong
    ok = client.get("/metrics", headers={"Authorization": "Bearer s3cret-metrics-token"}, environ_base=REMOTE)
    assert ok.status_code == 200
    assert 'medmaas_tenant_jobs{state="queued",tenant="lab-north"} 1.0' in ok.get_data(as_text=True)
    local = client.get("/metrics")  # loopback still works, still without tenant names
    assert local.status_code == 200 and "lab-north" not in local.get_data(as_text=True)


def test_metrics_loopback_can_be_turned_off(tmp_path, sqlite_template) -> None:  # noqa: ANN001
    from app.config import from_env

    settings = from_env({"MEDMAAS_METRICS_LOOPBACK": "false", "MEDMAAS_METRICS_TOKEN": "t"}, home=tmp_path / "h",
                        testing=True, secret_key="k", broker_url="redis://127.0.0.1:1/0")
    use_template(settings, sqlite_template)
    app = _make_app(settings)
    try:
        client = app.test_client()
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer t"}).status_code == 200
    finally:
        close_app(app)


def assert_security_headers(r, page: bool = False) -> None:  # noqa: ANN001
    h = r.headers
    assert h["X-Content-Type-Options"] == "nosniff"
    assert h["X-Frame-Options"] == "DENY"
    assert h["Referrer-Policy"] == "same-origin"
    assert "frame-ancestors 'none'" in h["Content-Security-Policy"]
    assert ("script-src 'self'" in h["Content-Security-Policy"]) is page
    assert h["Cache-Control"] == "no-store"


def test_api_answers_and_errors_carry_the_security_headers(client, api: ApiClient) -> None:  # noqa: ANN001
    job = api.submit("sleep", {"seconds": 0})
    for r in (api.get("/api/v1/jobs"), api.get(f"/api/v1/jobs/{job['id']}"), api.get("/api/v1/jobs/999999"),
              client.get("/api/v1/jobs"), api.post("/api/v1/jobs", json={"kind": "nope"}),
              client.get("/api/v1/openapi.json"), client.get("/healthz"), client.get("/metrics")):
        assert r.status_code in (200, 401, 404, 422), r.status_code
        assert_security_headers(r)


def test_pages_and_static_files_share_the_same_hook(client) -> None:  # noqa: ANN001
    page = client.get("/login")
    assert page.status_code == 200
    assert_security_headers(page, page=True)
    static = client.get("/static/css/app.css")
    assert static.status_code == 200 and static.headers["X-Content-Type-Options"] == "nosniff"
    assert static.headers.get("Cache-Control") != "no-store"  # the app's own files may be cached
