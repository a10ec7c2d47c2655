"""The key management page: admin keys only (others get a 403 page); list, create (the secret
shown once), revoke after a confirmation (the last admin key refused with a clear message),
rotate; the same rules as the API and CLI (app.auth)."""
from __future__ import annotations

import re

import pytest
from sqlalchemy import func, select

from app import auth
from app.models import ApiKey, KeyRole
from tests.conftest import sign_in


def make_tenant(app, name: str = "lab") -> int:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        return auth.create_tenant(s, name).id


def make_key(app, tenant_id: int, role: str = "admin", name: str = "") -> tuple[int, str]:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        key, secret = auth.new_key(s, tenant_id, name or role, KeyRole(role))
        return key.id, secret


def key_row(app, key_id: int) -> ApiKey:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        key = s.get(ApiKey, key_id)
        s.expunge(key)
        return key


def key_count(app) -> int:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        return s.scalar(select(func.count()).select_from(ApiKey)) or 0


def api_status(app, secret: str) -> int:  # noqa: ANN001
    return app.test_client().get("/api/v1/jobs", headers={"Authorization": f"Bearer {secret}"}).status_code


def shown_secret(html: str) -> str:
    match = re.search(r'id="secret-value">(mm_[^<]+)<', html)
    assert match, html[:2000]
    return match.group(1)


@pytest.fixture()
def admin(app, client):  # noqa: ANN001, ANN201
    """A browser signed in with an admin key of a tenant that has a second admin key."""
    tenant = make_tenant(app)
    key_id, secret = make_key(app, tenant, "admin", "signed-in")
    other_id, _ = make_key(app, tenant, "admin", "spare admin")
    sign_in(app, client, key_id)
    return type("Admin", (), {"tenant": tenant, "key_id": key_id, "secret": secret, "other_id": other_id})


def test_the_page_lists_the_tenants_keys_without_secrets_or_hashes(app, client, admin) -> None:  # noqa: ANN001
    viewer_id, viewer_secret = make_key(app, admin.tenant, "viewer", "dashboards")
    make_key(app, make_tenant(app, "other-lab"), "admin", "not ours")
    page = client.get("/keys")
    html = page.get_data(as_text=True)
    assert page.status_code == 200
    viewer = key_row(app, viewer_id)
    row = re.search(rf'<tr id="key-{viewer_id}">.*?</tr>', html, re.S).group(0)
    assert f"mm_{viewer.prefix}_" in row and "dashboards" in row and "viewer" in row and "active" in row
    assert "never" in row  # never used, never expires
    assert "not ours" not in html
    assert viewer_secret not in html and viewer.key_hash not in html
    assert 'href="/keys"' in html  # the admin's nav link
    assert "(this sign-in)" in html


@pytest.mark.parametrize("role", ["member", "viewer"])
def test_other_roles_get_a_403_page_and_change_nothing(app, client, role: str) -> None:  # noqa: ANN001
    tenant = make_tenant(app)
    make_key(app, tenant, "admin")
    key_id, _ = make_key(app, tenant, role)
    target, _ = make_key(app, tenant, "viewer", "target")
    sign_in(app, client, key_id)
    jobs_page = client.get("/jobs").get_data(as_text=True)
    assert 'href="/keys"' not in jobs_page  # no nav link either
    before = key_count(app)
    for method, url in [("get", "/keys"), ("post", "/keys"), ("get", f"/keys/{target}/revoke"),
                        ("post", f"/keys/{target}/revoke"), ("post", f"/keys/{target}/rotate")]:
        r = getattr(client, method)(url, data={"csrf_token": "token", "name": "x", "role": "admin"})
        assert r.status_code == 403 and r.mimetype == "text/html", (method, url)
        assert "admin key" in r.get_data(as_text=True)
    assert key_count(app) == before and key_row(app, target).revoked_at is None


def test_create_shows_the_secret_once_and_it_works_with_its_role(app, client, admin) -> None:  # noqa: ANN001
    r = client.post("/keys", data={"csrf_token": "token", "name": "pipeline", "role": "member",
                                   "expires_in_days": "30"})
    assert r.status_code == 201
    secret = shown_secret(r.get_data(as_text=True))
    key = auth.authenticate(app.extensions["medmaas.db"].sessionmaker(), secret)
    assert key is not None and (key.name, key.role) == ("pipeline", KeyRole.member) and key.expires_at is not None
    assert api_status(app, secret) == 200
    assert secret not in client.get("/keys").get_data(as_text=True)  # never shown again


@pytest.mark.parametrize(("form", "field"), [({"role": "superuser"}, "role"), ({"role": "viewer", "name": "x" * 200},
                                             "name"), ({"role": "viewer", "expires_in_days": "0"}, "expires_in_days"),
                                            ({"role": "viewer", "expires_in_days": "soon"}, "expires_in_days")])
def test_create_refuses_what_the_api_refuses(app, client, admin, form: dict, field: str) -> None:  # noqa: ANN001
    before = key_count(app)
    r = client.post("/keys", data={"csrf_token": "token", **form})
    assert r.status_code == 400 and f'id="{field}-error"' in r.get_data(as_text=True)
    assert key_count(app) == before


def test_forms_need_the_csrf_token(app, client, admin) -> None:  # noqa: ANN001
    before = key_count(app)
    assert client.post("/keys", data={"role": "admin"}).status_code == 400
    assert client.post(f"/keys/{admin.other_id}/revoke").status_code == 400
    assert key_count(app) == before and key_row(app, admin.other_id).revoked_at is None


def test_revoke_asks_first_then_revokes(app, client, admin) -> None:  # noqa: ANN001
    target, secret = make_key(app, admin.tenant, "member", "old laptop")
    confirm = client.get(f"/keys/{target}/revoke")
    assert confirm.status_code == 200 and 'id="key-confirm-form"' in confirm.get_data(as_text=True)
    assert key_row(app, target).revoked_at is None  # asking is not doing
    r = client.post(f"/keys/{target}/revoke", data={"csrf_token": "token"}, follow_redirects=True)
    assert r.request.path == "/keys" and "revoked" in r.get_data(as_text=True)
    assert key_row(app, target).revoked_at is not None and api_status(app, secret) == 401


def test_the_last_admin_key_is_refused_with_a_clear_message(app, client) -> None:  # noqa: ANN001
    tenant = make_tenant(app)
    key_id, secret = make_key(app, tenant, "admin")
    make_key(app, tenant, "member")
    sign_in(app, client, key_id)
    r = client.post(f"/keys/{key_id}/revoke", data={"csrf_token": "token"})
    html = r.get_data(as_text=True)
    assert r.status_code == 409 and "last active admin key" in html and "Create another admin key first" in html
    assert key_row(app, key_id).revoked_at is None and api_status(app, secret) == 200
    assert client.get("/keys").status_code == 200  # still signed in


def test_revoking_the_signed_in_key_signs_this_browser_out(app, client, admin) -> None:  # noqa: ANN001
    r = client.post(f"/keys/{admin.key_id}/revoke", data={"csrf_token": "token"})
    assert r.status_code == 302 and r.headers["Location"].endswith("/login")
    page = client.get("/keys")
    assert page.status_code == 302 and "/login" in page.headers["Location"]


def test_rotate_replaces_the_secret_keeping_name_and_role(app, client, admin) -> None:  # noqa: ANN001
    target, old_secret = make_key(app, admin.tenant, "viewer", "dashboards")
    assert client.get(f"/keys/{target}/rotate").status_code == 200
    r = client.post(f"/keys/{target}/rotate", data={"csrf_token": "token"})
    assert r.status_code == 201
    new_secret = shown_secret(r.get_data(as_text=True))
    new = auth.authenticate(app.extensions["medmaas.db"].sessionmaker(), new_secret)
    assert (new.name, new.role) == ("dashboards", KeyRole.viewer) and new.id != target
    assert api_status(app, old_secret) == 401 and api_status(app, new_secret) == 200
    again = client.post(f"/keys/{target}/rotate", data={"csrf_token": "token"})  # the old one is revoked now
    assert again.status_code == 409 and "is revoked" in again.get_data(as_text=True)


def test_another_tenants_key_is_not_found(app, client, admin) -> None:  # noqa: ANN001
    stranger, secret = make_key(app, make_tenant(app, "other-lab"), "admin")
    for method, url in [("get", f"/keys/{stranger}/revoke"), ("post", f"/keys/{stranger}/revoke"),
                        ("post", f"/keys/{stranger}/rotate")]:
        assert getattr(client, method)(url, data={"csrf_token": "token"}).status_code == 404
    assert key_row(app, stranger).revoked_at is None and api_status(app, secret) == 200


def test_a_viewer_sign_in_cannot_submit_upload_or_point_aliases_from_the_pages(app, client) -> None:  # noqa: ANN001
    """The pages' forms need the role their API twins need: member to submit, upload, predict,
    cancel; admin to point an alias. A viewer still signs out."""
    from app.models import Job

    tenant = make_tenant(app)
    viewer_id, _ = make_key(app, tenant, "viewer")
    member_id, _ = make_key(app, tenant, "member")
    sign_in(app, client, viewer_id)
    form = {"csrf_token": "token", "kind": "sleep", "spec": '{"seconds": 0}', "model_name": "m", "dataset_id": "1"}
    for url in ("/jobs/new", "/train/new", "/score/new", "/datasets", "/models/m/predict", "/models/m/explain"):
        r = client.post(url, data=form)
        assert r.status_code == 403, url
        assert "viewer key" in r.get_data(as_text=True), url
    with app.extensions["medmaas.db"].session() as s:
        assert s.query(Job).count() == 0
    sign_in(app, client, member_id)
    r = client.post("/models/m/aliases", data={"csrf_token": "token", "alias": "prod", "version": "1"})
    assert r.status_code == 403
    assert "needs a admin key" not in r.get_data(as_text=True)
    assert "admin key" in r.get_data(as_text=True)
    sign_in(app, client, viewer_id)
    assert client.post("/logout", data={"csrf_token": "token"}).status_code in (302, 303)
