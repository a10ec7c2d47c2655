"""The ASGI front's one-hop routes (app/asgi.py BufferedFlask): what they answer is what Flask
answers through a2wsgi, for reads, HEAD, submits, bodies over the limit and chunked bodies."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.testclient import TestClient

from app.asgi import BUFFERED_ROUTES, create_asgi_app
from tests.conftest import create_tenant_key


@pytest.fixture
def front(app) -> tuple[TestClient, dict[str, str]]:  # noqa: ANN001
    _tenant, key = create_tenant_key(app)
    return TestClient(create_asgi_app(app, wsgi_threads=2, stream_threads=2)), {"Authorization": f"Bearer {key}"}


def test_the_submit_and_list_routes_are_buffered() -> None:
    assert ("/api/v1/jobs", ["GET", "POST"]) in BUFFERED_ROUTES
    assert any(path == "/api/v1/jobs/{job_id:int}" for path, _methods in BUFFERED_ROUTES)


def test_a_submit_and_its_reads_answer_as_flask_does(front: tuple[TestClient, dict[str, str]], client, api) -> None:  # noqa: ANN001
    http, headers = front
    submitted = http.post("/api/v1/jobs", headers=headers, json={"kind": "sleep", "spec": {"seconds": 0}})
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["state"] == "queued" and submitted.headers["X-Request-ID"]
    got = http.get(f"/api/v1/jobs/{job['id']}", headers=headers)
    assert got.status_code == 200 and got.json()["id"] == job["id"]
    assert got.headers["content-length"] == str(len(got.content))
    assert got.headers["X-Content-Type-Options"] == "nosniff"  # Flask's after_request headers came along
    head = http.head(f"/api/v1/jobs/{job['id']}", headers=headers)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == got.headers["content-length"]  # HEAD tells GET's length
    listed = http.get("/api/v1/jobs?limit=1", headers=headers)
    assert listed.status_code == 200 and [j["id"] for j in listed.json()["items"]] == [job["id"]]
    assert http.get("/api/v1/jobs/999999", headers=headers).status_code == 404
    assert http.get(f"/api/v1/jobs/{job['id']}").status_code == 401


@pytest.mark.parametrize(
    ("kw", "status"),
    [
        ({"content": b"{" * (3 * 1024 * 1024)}, 413),  # a declared length over the limit: a2wsgi refuses it
        ({"content": iter([b'{"kind": "sleep", ', b'"spec": {"seconds": 0}}'])}, 202),  # chunked: read whole
        ({"content": iter([b"{" * (1024 * 1024)] * 3)}, 413),  # chunked, past the limit: read no further
        ({"content": b"not json"}, 400),
    ],
)
def test_bodies_the_one_hop_path_does_not_take_still_get_flasks_answer(
    front: tuple[TestClient, dict[str, str]], kw: dict[str, Any], status: int
) -> None:
    http, headers = front
    r = http.post("/api/v1/jobs", headers={**headers, "Content-Type": "application/json"}, **kw)
    assert r.status_code == status, r.text
    if status >= 400:
        assert set(r.json()["error"]) == {"code", "message", "details"}
