"""Idempotency-Key (issue 10): the same key and request give the original job (200); the same key
with a different kind, spec, priority or max_attempts is 422 idempotency_key_reused and stores
nothing. The web forms' per-form keys still give one job for a resubmitted form."""
from __future__ import annotations

import re

from sqlalchemy import func, select, update

from app import jobs as state_machine
from app.models import ApiKey, Job
from tests.conftest import ApiClient, create_tenant_key, sign_in
from tests.unit.test_api_jobs import assert_error

SLEEP = {"kind": "sleep", "spec": {"seconds": 0, "steps": 2}}


def job_count(app) -> int:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        return s.scalar(select(func.count()).select_from(Job))


def post(api: ApiClient, body: dict, key: str = "run-42"):  # noqa: ANN201
    return api.post("/api/v1/jobs", json=body, headers={"Idempotency-Key": key})


def test_same_key_same_request_is_the_original_job(api: ApiClient, app, fake_redis) -> None:  # noqa: ANN001
    first = post(api, SLEEP)
    assert first.status_code == 202
    again = post(api, {"spec": {"steps": 2, "seconds": 0}, "kind": "sleep", "priority": 0})  # order, defaults
    assert again.status_code == 200 and again.get_json()["id"] == first.get_json()["id"]
    assert job_count(app) == 1
    assert len(fake_redis.messages("cpu")) == 1  # published once


def test_same_key_different_request_is_422_and_stores_nothing(api: ApiClient, app) -> None:  # noqa: ANN001
    job = post(api, SLEEP).get_json()
    for body in ({**SLEEP, "spec": {"seconds": 1, "steps": 2}},
                 {**SLEEP, "spec": {"seconds": 0}},  # the defaults it would get are not the request
                 {**SLEEP, "priority": 5},
                 {**SLEEP, "max_attempts": 1},
                 {"kind": "train", "spec": SLEEP["spec"]}):
        err = assert_error(post(api, body), 422, "idempotency_key_reused")
        assert "'run-42'" in err["message"] and f"job {job['id']}" in err["message"], err
        assert err["details"] == {"idempotency_key": "run-42", "job_id": job["id"]}
    assert job_count(app) == 1
    assert post(api, SLEEP).status_code == 200  # the original request still gets its job


def test_keys_are_per_tenant_and_a_refused_submit_frees_nothing(api: ApiClient, app, client) -> None:  # noqa: ANN001
    other = ApiClient(client, create_tenant_key(app)[1])
    mine = post(api, SLEEP).get_json()
    theirs = post(other, {**SLEEP, "priority": 3})
    assert theirs.status_code == 202 and theirs.get_json()["id"] != mine["id"]
    # An invalid first request stores nothing, so the key is still free for a valid one.
    assert_error(post(api, {"kind": "sleep", "spec": {"seconds": -1}}, key="fresh"), 422, "invalid_spec")
    assert post(api, SLEEP, key="fresh").status_code == 202


def test_jobs_from_before_the_digest_match_any_request(api: ApiClient, app) -> None:  # noqa: ANN001
    job = post(api, SLEEP).get_json()
    with app.extensions["medmaas.db"].session() as s:
        assert s.get(Job, job["id"]).request_sha256 == state_machine.request_digest("sleep", SLEEP["spec"], 0, None)
        s.execute(update(Job).where(Job.id == job["id"]).values(request_sha256=None))  # as migrated rows
        s.commit()
    r = post(api, {**SLEEP, "priority": 9})
    assert r.status_code == 200 and r.get_json()["id"] == job["id"]


def test_request_digest_is_stable() -> None:
    a = state_machine.request_digest("train", {"a": 1, "b": {"y": [1, 2], "x": None}}, 0, None)
    assert a == state_machine.request_digest("train", {"b": {"x": None, "y": [1, 2]}, "a": 1}, 0, None)
    assert a != state_machine.request_digest("train", {"a": 1, "b": {"y": [2, 1], "x": None}}, 0, None)
    assert a != state_machine.request_digest("train", {"a": 1, "b": {"y": [1, 2], "x": None}}, 0, 3)
    assert re.fullmatch(r"[0-9a-f]{64}", a)


def test_a_resubmitted_web_form_gives_the_same_job(app, client) -> None:  # noqa: ANN001
    tid, _key = create_tenant_key(app)
    with app.extensions["medmaas.db"].session() as s:
        key_id = s.scalar(select(ApiKey.id).where(ApiKey.tenant_id == tid))
    sign_in(app, client, key_id)
    form = {"csrf_token": "token", "kind": "sleep", "spec": '{"seconds": 0, "steps": 2}', "priority": "0",
            "form_id": "f" * 32}
    first = client.post("/jobs/new", data=form)
    again = client.post("/jobs/new", data=form)  # a double click, or the browser's resubmit
    assert first.status_code == again.status_code == 302, again.get_data(as_text=True)[:500]
    assert first.headers["Location"] == again.headers["Location"]
    assert job_count(app) == 1


def test_migration_0005_adds_and_drops_the_column_keeping_rows(tmp_path) -> None:
    """SQLite, no services: 0004 -> 0005 keeps jobs and their events (no table copy), existing
    rows get NULL (not recorded), and the downgrade drops only the column."""
    import sqlalchemy as sa
    from alembic import command

    from app.migrate import alembic_config

    url = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = alembic_config(url)
    command.upgrade(cfg, "0004")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO tenants (id, name, created_at) VALUES (1, 'acme', '2026-01-01 00:00:00')"))
        conn.execute(sa.text(
            "INSERT INTO jobs (id, tenant_id, kind, spec, state, queue, priority, attempts, max_attempts, progress,"
            " message, created_at, cancel_requested, event_seq, idempotency_key) VALUES (1, 1, 'sleep', '{}', 'queued',"
            " 'cpu', 0, 0, 3, 0.0, '', '2026-01-01 00:00:00', 0, 1, 'k-1')"))
        conn.execute(sa.text("INSERT INTO job_events (job_id, seq, ts, type, data) VALUES"
                             " (1, 1, '2026-01-01 00:00:00', 'state', '{\"to\": \"queued\"}')"))

    def columns() -> set[str]:
        return {c["name"] for c in sa.inspect(engine).get_columns("jobs")}

    def rows() -> tuple:
        with engine.connect() as conn:
            return (conn.execute(sa.text("SELECT id, idempotency_key FROM jobs")).all(),
                    conn.execute(sa.text("SELECT job_id, seq FROM job_events")).all())

    kept = rows()
    command.upgrade(cfg, "head")
    assert "request_sha256" in columns()
    assert rows() == kept
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT request_sha256 FROM jobs")).scalar_one() is None
    command.downgrade(cfg, "0004")
    assert "request_sha256" not in columns()
    assert rows() == kept
    engine.dispose()
