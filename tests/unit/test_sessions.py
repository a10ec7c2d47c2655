"""Server-side web sessions: the cookie holds a random id whose sha256 is the only thing
stored; sign-out, key revocation, the lifetime and the idle timeout end a session in the
database, so a copied cookie replayed afterwards is refused; Secure cookies off loopback."""
from __future__ import annotations

import hashlib
import re
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from app import auth
from app.config import Settings, from_env, to_env
from app.models import ApiKey, Job, KeyRole, WebSession, utcnow
from tests.conftest import _make_app, close_app

FORM = {"kind": "sleep", "spec": '{"seconds": 0, "steps": 1}', "priority": "0"}


def tenant_with_admin(app, name: str = "lab") -> tuple[int, int, str]:  # noqa: ANN001
    """(tenant id, key id, secret) of a new tenant's admin key."""
    with app.extensions["medmaas.db"].session() as s:
        tenant = auth.create_tenant(s, name)
        key, secret = auth.new_key(s, tenant.id, "admin", KeyRole.admin)
        return tenant.id, key.id, secret


def csrf_of(client, base_url: str = "http://localhost") -> str:  # noqa: ANN001
    with client.session_transaction(base_url=base_url) as sess:
        return sess["csrf"]


def login(client, secret: str):  # noqa: ANN001, ANN201
    client.get("/login")
    return client.post("/login", data={"api_key": secret, "csrf_token": csrf_of(client)})


def sessions(app) -> list[WebSession]:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        rows = list(s.scalars(select(WebSession).order_by(WebSession.id)))
        s.expunge_all()
        return rows


def job_count(app) -> int:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


def replay(app, cookie: str):  # noqa: ANN001, ANN201
    """Another browser (an attacker) presenting a copy of a session cookie."""
    other = app.test_client()
    other.set_cookie("session", cookie)
    return other


def submit_form(client, csrf: str):  # noqa: ANN001, ANN201
    return client.post("/jobs/new", data={**FORM, "csrf_token": csrf, "form_id": "f" * 32})


def test_sign_in_stores_only_the_hash_of_a_random_session_id(app, client) -> None:  # noqa: ANN001
    tenant_id, key_id, secret = tenant_with_admin(app)
    r = login(client, secret)
    assert r.status_code == 302 and r.headers["Location"].endswith("/jobs")
    with client.session_transaction() as sess:
        cookie = dict(sess)
    # the cookie names no key or tenant: only the session id (and its CSRF token)
    assert set(cookie) <= {"sid", "csrf", "_permanent", "_flashes"}
    assert re.fullmatch(r"[A-Za-z0-9_-]{40,}", cookie["sid"])
    [row] = sessions(app)
    assert row.token_sha256 == hashlib.sha256(cookie["sid"].encode()).hexdigest()
    assert (row.key_id, row.tenant_id, row.ended_at) == (key_id, tenant_id, None)
    lifetime = app.extensions["medmaas.settings"].session_lifetime_s
    assert abs((row.expires_at - row.created_at).total_seconds() - lifetime) < 1
    assert client.get("/jobs").status_code == 200


def test_a_cookie_replayed_after_sign_out_gets_the_sign_in_page_and_creates_no_job(app, client) -> None:  # noqa: ANN001
    _tenant, _key, secret = tenant_with_admin(app)
    login(client, secret)
    csrf = csrf_of(client)
    stolen = client.get_cookie("session").value
    assert replay(app, stolen).get("/jobs").status_code == 200  # the copy works while signed in

    r = client.post("/logout", data={"csrf_token": csrf})
    assert r.status_code == 302 and r.headers["Location"].endswith("/login")
    [row] = sessions(app)
    assert row.ended_at is not None

    attacker = replay(app, stolen)
    page = attacker.get("/jobs")
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    attacker = replay(app, stolen)
    twin = attacker.get("/ui/api/jobs")
    assert twin.status_code == 401 and twin.get_json()["error"]["code"] == "unauthorized"
    attacker = replay(app, stolen)
    created = submit_form(attacker, csrf)  # the cookie's own CSRF token is valid; the session is not
    assert created.status_code == 302 and "/login" in created.headers["Location"]
    assert job_count(app) == 0
    # the session stays ended: signing in again opens a new one
    login(client, secret)
    assert [s.ended_at is None for s in sessions(app)] == [False, True]
    assert submit_form(client, csrf_of(client)).status_code == 302 and job_count(app) == 1


@pytest.mark.parametrize("how", ["api", "cli", "rotate"])
def test_revoking_the_key_ends_its_sessions(app, client, how: str) -> None:  # noqa: ANN001
    tenant_id, key_id, secret = tenant_with_admin(app)
    with app.extensions["medmaas.db"].session() as s:
        _other, other_secret = auth.new_key(s, tenant_id, "other admin", KeyRole.admin)
    login(client, secret)
    stolen = client.get_cookie("session").value
    bearer = {"Authorization": f"Bearer {other_secret}"}
    if how == "api":
        assert app.test_client().delete(f"/api/v1/keys/{key_id}", headers=bearer).status_code == 204
    elif how == "rotate":
        assert app.test_client().post(f"/api/v1/keys/{key_id}/rotate", headers=bearer).status_code == 201
    else:
        with app.extensions["medmaas.db"].session() as s:
            auth.revoke(s, s.get(ApiKey, key_id))
    [row] = sessions(app)
    assert row.ended_at is not None  # ended in the database, not just refused at the next click
    page = client.get("/jobs")
    assert page.status_code == 302 and "/login" in page.headers["Location"]
    assert replay(app, stolen).get("/ui/api/jobs").status_code == 401


def test_a_key_that_expires_ends_the_session_at_the_next_request(app, client) -> None:  # noqa: ANN001
    _tenant, key_id, secret = tenant_with_admin(app)
    login(client, secret)
    with app.extensions["medmaas.db"].session() as s:
        s.execute(update(ApiKey).where(ApiKey.id == key_id).values(expires_at=utcnow() - timedelta(seconds=1)))
    r = client.get("/jobs", follow_redirects=True)
    assert "/login" in r.request.path and "the API key is no longer valid (expired)" in r.get_data(as_text=True)
    assert sessions(app)[0].ended_at is not None


@pytest.mark.parametrize("column", ["expires_at", "last_seen_at"])
def test_lifetime_and_idle_timeout_are_enforced_by_the_server(app, client, column: str) -> None:  # noqa: ANN001
    _tenant, _key, secret = tenant_with_admin(app)
    login(client, secret)
    settings = app.extensions["medmaas.settings"]
    past = utcnow() - timedelta(seconds=(settings.session_idle_timeout_s + 5 if column == "last_seen_at" else 1))
    with app.extensions["medmaas.db"].session() as s:
        s.execute(update(WebSession).values({column: past}))
    r = client.get("/jobs", follow_redirects=True)
    page = r.get_data(as_text=True)
    assert "/login" in r.request.path
    assert ("lifetime" if column == "expires_at" else "idle") in page
    assert sessions(app)[0].ended_at is not None
    assert client.get("/ui/api/jobs").status_code == 401


def test_requests_keep_an_idle_session_alive(app, client) -> None:  # noqa: ANN001
    _tenant, _key, secret = tenant_with_admin(app)
    login(client, secret)
    settings = app.extensions["medmaas.settings"]
    almost = utcnow() - timedelta(seconds=settings.session_idle_timeout_s - 30)
    with app.extensions["medmaas.db"].session() as s:
        s.execute(update(WebSession).values(last_seen_at=almost))
    assert client.get("/jobs").status_code == 200
    assert (utcnow() - sessions(app)[0].last_seen_at).total_seconds() < 5


@pytest.mark.parametrize(
    ("host", "explicit", "secure"),
    [("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False), ("0.0.0.0", None, True),
     ("10.1.2.3", None, True), ("0.0.0.0", False, False), ("127.0.0.1", True, True)],
)
def test_cookies_are_secure_by_default_off_loopback(tmp_path, sqlite_template, host: str, explicit: bool | None,  # noqa: ANN001
                                                    secure: bool) -> None:
    from tests.conftest import use_template

    settings = from_env({}, home=tmp_path / "home", testing=True, secret_key="k", web_host=host,
                        secure_cookies=explicit, broker_url="redis://127.0.0.1:1/0")
    use_template(settings, sqlite_template)
    assert settings.cookies_secure is secure
    app = _make_app(settings)
    try:
        client = app.test_client()
        _t, _k, secret = tenant_with_admin(app)
        base = "https://medmaas.example" if secure else "http://localhost"
        client.get("/login", base_url=base)
        r = client.post("/login", data={"api_key": secret, "csrf_token": csrf_of(client, base)}, base_url=base)
        assert r.status_code == 302
        cookie = r.headers["Set-Cookie"]
        assert ("; Secure" in cookie) is secure and "HttpOnly" in cookie and "SameSite=Lax" in cookie
        assert "Expires=" in cookie  # the browser drops it with the session's lifetime
    finally:
        close_app(app)


def test_unset_secure_cookies_travels_to_child_processes_as_unset() -> None:
    env = to_env(Settings(web_host="0.0.0.0"))
    assert env["MEDMAAS_SECURE_COOKIES"] == ""
    assert from_env(env).secure_cookies is None and from_env(env).cookies_secure
    assert from_env({"MEDMAAS_SECURE_COOKIES": "false", "MEDMAAS_WEB_HOST": "0.0.0.0"}).cookies_secure is False


def test_migration_0010_creates_and_drops_web_sessions(tmp_path) -> None:  # noqa: ANN001
    """SQLite: 0009 -> 0010 adds the table (hash unique, key index, cascades with its key);
    the downgrade drops it and nothing else."""
    import sqlalchemy as sa
    from alembic import command

    from app.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = alembic_config(url)
    command.upgrade(cfg, "0009")
    engine = sa.create_engine(url)
    before = set(sa.inspect(engine).get_table_names())
    assert "web_sessions" not in before
    command.upgrade(cfg, "0010")
    inspector = sa.inspect(engine)
    assert {c["name"] for c in inspector.get_columns("web_sessions")} == {
        "id", "token_sha256", "key_id", "tenant_id", "created_at", "last_seen_at", "expires_at", "ended_at"}
    assert [ix["column_names"] for ix in inspector.get_indexes("web_sessions")] == [["key_id"]]
    assert [u["column_names"] for u in inspector.get_unique_constraints("web_sessions")] == [["token_sha256"]]
    assert {fk["referred_table"]: fk["options"].get("ondelete") for fk in inspector.get_foreign_keys("web_sessions")
            } == {"api_keys": "CASCADE", "tenants": "CASCADE"}
    command.downgrade(cfg, "0009")
    assert set(sa.inspect(engine).get_table_names()) == before
    engine.dispose()
