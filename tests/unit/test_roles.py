"""Key roles and the key lifecycle: every /api/v1 route declares the role it needs (viewer <
member < admin), checked once in the API's auth hook; revoked and expired keys get 401."""
from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from app import auth
from app.api import declared_role, required_role
from app.models import ApiKey, Dataset, Job, KeyRole, utcnow

ROLES = ("viewer", "member", "admin")
MISSING = 999_999  # an id no object of the test has: allowed roles get past auth to a 404/422


def make_key(app, tenant_id: int, role: str, name: str = "", expires_in_days: int | None = None) -> tuple[int, str]:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        key, secret = auth.new_key(s, tenant_id, name or role, KeyRole(role), expires_in_days)
        return key.id, secret


def make_tenant(app, name: str = "acme") -> int:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        return auth.create_tenant(s, name).id


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def routes(client) -> list[tuple[str, str, dict[str, Any]]]:  # noqa: ANN001
    """(method, path template, operation) for every operation in the OpenAPI document."""
    doc = client.get("/api/v1/openapi.json").get_json()
    out = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method in ("get", "post", "put", "patch", "delete"):
                out.append((method.upper(), path, op))
    return out


def minimal_request(path: str, op: dict[str, Any], key_id: int) -> tuple[str, dict[str, Any]]:
    """A concrete URL and a minimal well-formed body for an operation."""
    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name == "key_id":
            return str(key_id)
        if name == "which":
            return "config"
        return str(MISSING) if name.endswith("id") or name in ("version", "rank") else "nosuch"

    url = re.sub(r"\{(\w+)\}", fill, path)
    kw: dict[str, Any] = {}
    body = op.get("requestBody", {}).get("content", {})
    if "multipart/form-data" in body:
        kw["data"] = {"kind": "sequences", "file": (__import__("io").BytesIO(b"sequence\nACGT\n"), "d.csv")}
        kw["content_type"] = "multipart/form-data"
    elif "application/json" in body:
        if url.endswith("/api/v1/jobs"):
            kw["json"] = {"kind": "sleep", "spec": {"seconds": 0}}
        elif url.endswith("/api/v1/keys"):
            kw["json"] = {"name": "walk", "role": "viewer"}
        elif "/aliases/" in url:
            kw["json"] = {"version": 1}
        elif url.endswith("/predict"):
            kw["json"] = {"inputs": ["CCO"]}
        else:
            kw["json"] = {}
    return url, kw


def counts(app) -> dict[str, int]:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        return {m.__name__: s.scalar(select(func.count()).select_from(m)) or 0 for m in (Job, Dataset, ApiKey)}


def revoked(app, key_id: int) -> bool:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        return s.get(ApiKey, key_id).revoked_at is not None


def test_every_api_view_declares_its_role(app) -> None:  # noqa: ANN001
    undeclared = [
        rule.rule
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/v1/") and rule.rule != "/api/v1/openapi.json"
        and declared_role(app.view_functions[rule.endpoint]) is None
    ]
    assert undeclared == []


@pytest.mark.parametrize("role", ROLES)
def test_walk_every_route_for_each_role(app, client, role: str) -> None:  # noqa: ANN001
    tenant = make_tenant(app)
    make_key(app, tenant, "admin", "keep")  # so revoking the walk's own key is never the last admin
    _kid, secret = make_key(app, tenant, role)
    ops = routes(client)
    assert len(ops) >= 15 and {("POST", "/api/v1/keys"), ("DELETE", "/api/v1/keys/{key_id}")} <= {
        (m, p) for m, p, _ in ops
    }
    needed = {(m, p): required_role(app.view_functions[_endpoint(app, m, p)]) for m, p, _ in ops}
    mine = KeyRole(role)
    for method, path, op in ops:
        target, _ = make_key(app, tenant, "viewer", "target")  # what DELETE / rotate act on
        url, kw = minimal_request(path, op, target)
        before = counts(app)
        resp = client.open(url, method=method, headers=bearer(secret), **kw)
        assert resp.status_code != 401, (method, path, resp.get_json())
        if mine.allows(needed[(method, path)]):
            assert resp.status_code != 403, (role, method, path, resp.get_json())
        else:
            assert resp.status_code == 403, (role, method, path, resp.status_code)
            error = resp.get_json()["error"]
            assert error["code"] == "forbidden" and needed[(method, path)].value in error["message"]
            assert counts(app) == before and not revoked(app, target), (method, path)
        if role == "viewer":  # changes nothing; reads all but the admin-only listings (keys)
            assert (resp.status_code == 403) == (method != "GET" or needed[(method, path)] == KeyRole.admin), (
                method, path, resp.status_code)
        if role == "member":
            assert (resp.status_code == 403) == (needed[(method, path)] == KeyRole.admin), (method, path)
        if role == "admin":
            assert resp.status_code != 403


def _endpoint(app, method: str, path: str) -> str:  # noqa: ANN001
    flask_path = re.sub(r"\{(\w+)\}", r"<\1>", path)
    for rule in app.url_map.iter_rules():
        if re.sub(r"<(?:\w+:)?(\w+)>", r"<\1>", rule.rule) == flask_path and method in (rule.methods or ()):
            return rule.endpoint
    raise AssertionError(f"no rule for {method} {path}")


def test_role_table(app) -> None:  # noqa: ANN001
    roles = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/v1/") and rule.rule != "/api/v1/openapi.json":
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                roles[(method, rule.rule)] = declared_role(app.view_functions[rule.endpoint])
    admin_only = ("/api/v1/keys", "/api/v1/audit")  # key management and the audit trail
    assert all(r == KeyRole.viewer for (m, p), r in roles.items() if m == "GET" and not p.startswith(admin_only))
    assert {r for (m, p), r in roles.items() if p.startswith("/api/v1/audit")} == {KeyRole.admin}
    assert roles[("POST", "/api/v1/jobs")] == roles[("POST", "/api/v1/datasets")] == KeyRole.member
    assert {r for (m, p), r in roles.items() if p.startswith("/api/v1/keys")} == {KeyRole.admin}
    assert [r for (m, p), r in roles.items() if "/aliases/" in p] == [KeyRole.admin]


def test_undeclared_route_needs_admin(app, client) -> None:  # noqa: ANN001
    app.add_url_rule("/api/v1/undeclared", "undeclared", lambda: {"ok": True}, methods=["GET"])
    tenant = make_tenant(app)
    for role, status in (("viewer", 403), ("member", 403), ("admin", 200)):
        assert client.get("/api/v1/undeclared", headers=bearer(make_key(app, tenant, role)[1])).status_code == status


def test_other_tenants_objects_stay_404(app, client) -> None:  # noqa: ANN001
    a, b = make_tenant(app, "a"), make_tenant(app, "b")
    a_member = make_key(app, a, "member")[1]
    job = client.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}}, headers=bearer(a_member))
    assert job.status_code == 202
    job_id = job.get_json()["id"]
    b_admin, b_viewer = make_key(app, b, "admin")[1], make_key(app, b, "viewer")[1]
    assert client.get(f"/api/v1/jobs/{job_id}", headers=bearer(b_viewer)).status_code == 404
    assert client.post(f"/api/v1/jobs/{job_id}/cancel", headers=bearer(b_admin)).status_code == 404
    a_key = make_key(app, a, "viewer")[0]
    assert client.delete(f"/api/v1/keys/{a_key}", headers=bearer(b_admin)).status_code == 404
    assert client.post(f"/api/v1/keys/{a_key}/rotate", headers=bearer(b_admin)).status_code == 404
    ids = [k["id"] for k in client.get("/api/v1/keys", headers=bearer(b_admin)).get_json()["items"]]
    assert a_key not in ids and len(ids) == 2


def test_expired_and_revoked_keys_get_401(app, client) -> None:  # noqa: ANN001
    tenant = make_tenant(app)
    expired_id, expired = make_key(app, tenant, "admin", "old", expires_in_days=1)
    revoked_id, revoked_secret = make_key(app, tenant, "admin", "gone")
    valid = make_key(app, tenant, "viewer", "soon", expires_in_days=1)[1]
    with app.extensions["medmaas.db"].session() as s:
        s.execute(update(ApiKey).where(ApiKey.id == expired_id).values(expires_at=utcnow() - timedelta(seconds=1)))
        s.execute(update(ApiKey).where(ApiKey.id == revoked_id).values(revoked_at=utcnow()))
    r = client.get("/api/v1/jobs", headers=bearer(expired))
    assert r.status_code == 401 and r.get_json()["error"]["message"] == "API key expired"
    r = client.get("/api/v1/jobs", headers=bearer(revoked_secret))
    assert r.status_code == 401 and r.get_json()["error"]["message"] == "API key revoked"
    assert client.get("/api/v1/jobs", headers=bearer(valid)).status_code == 200
    with app.extensions["medmaas.db"].session() as s:  # the web sign-in uses the same check
        assert auth.authenticate(s, expired) is None and auth.authenticate(s, revoked_secret) is None
        assert auth.authenticate(s, valid) is not None


def test_key_lifecycle_and_last_admin_rule(app, client) -> None:  # noqa: ANN001
    tenant = make_tenant(app)
    admin_id, admin = make_key(app, tenant, "admin", "root")
    r = client.post("/api/v1/keys", json={"name": "ci", "role": "member", "expires_in_days": 30},
                    headers=bearer(admin))
    assert r.status_code == 201, r.get_json()
    created = r.get_json()
    assert created["role"] == "member" and created["expires_at"] and created["secret"].startswith("mm_")
    assert client.post("/api/v1/jobs", json={"kind": "sleep", "spec": {}},
                       headers=bearer(created["secret"])).status_code == 202
    assert client.post("/api/v1/keys", json={"name": "x", "role": "root"}, headers=bearer(admin)).status_code == 422

    listing = client.get("/api/v1/keys", headers=bearer(admin)).get_json()["items"]
    assert [k["id"] for k in listing] == [admin_id, created["id"]]
    assert set(listing[0]) == {"id", "prefix", "name", "role", "created_at", "last_used_at", "expires_at",
                               "revoked_at"}
    assert created["secret"] not in str(listing)

    # the only admin key cannot revoke itself (nor be revoked by anyone)
    r = client.delete(f"/api/v1/keys/{admin_id}", headers=bearer(admin))
    assert r.status_code == 409 and r.get_json()["error"]["message"] == "this is the last admin key of the tenant"
    assert client.delete(f"/api/v1/keys/{created['id']}", headers=bearer(admin)).status_code == 204
    assert client.get("/api/v1/jobs", headers=bearer(created["secret"])).status_code == 401

    # an expired admin key does not count as the other admin
    exp_id, _ = make_key(app, tenant, "admin", "expired")
    with app.extensions["medmaas.db"].session() as s:
        s.execute(update(ApiKey).where(ApiKey.id == exp_id).values(expires_at=utcnow() - timedelta(days=1)))
    assert client.delete(f"/api/v1/keys/{admin_id}", headers=bearer(admin)).status_code == 409

    # with a second admin, the first can go
    second_id, second = make_key(app, tenant, "admin", "second")
    assert client.delete(f"/api/v1/keys/{admin_id}", headers=bearer(second)).status_code == 204
    assert client.get("/api/v1/keys", headers=bearer(admin)).status_code == 401
    assert client.delete(f"/api/v1/keys/{second_id}", headers=bearer(second)).status_code == 409


def test_rotate(app, client) -> None:  # noqa: ANN001
    tenant = make_tenant(app)
    admin_id, admin = make_key(app, tenant, "admin", "root")
    viewer_id, viewer = make_key(app, tenant, "viewer", "dash", expires_in_days=10)
    r = client.post(f"/api/v1/keys/{viewer_id}/rotate", headers=bearer(admin))
    assert r.status_code == 201, r.get_json()
    new = r.get_json()
    assert new["id"] != viewer_id and (new["name"], new["role"]) == ("dash", "viewer") and new["expires_at"]
    assert client.get("/api/v1/jobs", headers=bearer(viewer)).status_code == 401
    assert client.get("/api/v1/jobs", headers=bearer(new["secret"])).status_code == 200
    assert client.post(f"/api/v1/keys/{viewer_id}/rotate", headers=bearer(admin)).status_code == 409

    # rotating the only admin key is allowed: the new key replaces it
    r = client.post(f"/api/v1/keys/{admin_id}/rotate", headers=bearer(admin))
    assert r.status_code == 201 and r.get_json()["role"] == "admin"
    assert client.get("/api/v1/keys", headers=bearer(admin)).status_code == 401
    assert client.get("/api/v1/keys", headers=bearer(r.get_json()["secret"])).status_code == 200


def test_cli_keys_create_list_revoke(app, monkeypatch) -> None:  # noqa: ANN001
    from medmaas.cli import main

    monkeypatch.setenv("MEDMAAS_DATABASE_URL", str(app.extensions["medmaas.db"].engine.url))
    tenant = make_tenant(app, "cli")
    admin_id, _ = make_key(app, tenant, "admin", "root")
    runner = CliRunner()
    res = runner.invoke(main, ["keys", "create", "--tenant", "cli", "--role", "viewer", "--expires-in-days", "7"])
    assert res.exit_code == 0, res.output
    secret = res.output.strip()
    with app.extensions["medmaas.db"].session() as s:
        key = auth.verify(s, secret)
        assert key.role == KeyRole.viewer and key.expires_at is not None
    res = runner.invoke(main, ["keys", "list", "--tenant", "cli"])
    assert res.exit_code == 0 and "viewer" in res.output and "root" in res.output and secret not in res.output
    res = runner.invoke(main, ["keys", "revoke", str(admin_id)])
    assert res.exit_code != 0 and "last admin key" in res.output and not revoked(app, admin_id)
    assert runner.invoke(main, ["keys", "revoke", str(admin_id), "--force"]).exit_code == 0
    assert revoked(app, admin_id)
    assert runner.invoke(main, ["keys", "create", "--tenant", "cli", "--role", "root"]).exit_code != 0
