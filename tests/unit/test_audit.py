"""The audit trail (issue 11, item 1): every /api/v1 route and every page that reads or changes
tenant data leaves a row (who, what, when, from where, request id) written in the action's own
transaction; rows are hash-chained per tenant, so `medmaas audit verify` names a row edited or
deleted by hand; admins read it at GET /api/v1/audit (filters, paging), as JSON lines, and on
the audit page."""
from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import event, func, select, text

from app import audit, auth
from app.api.auditing import audited, describe
from app.config import to_env
from app.models import ApiKey, AuditEvent, Job, KeyRole, ModelVersion
from tests.conftest import flush_read_audit
from tests.unit.test_roles import minimal_request, routes

# -- helpers ----------------------------------------------------------------------------------


def new_tenant(app, name: str, role: str = "admin") -> tuple[int, int, str]:  # noqa: ANN001
    """(tenant id, key id, secret) of a new tenant's key."""
    with app.extensions["medmaas.db"].session() as s:
        tenant = auth.create_tenant(s, name)
        key, secret = auth.new_key(s, tenant.id, role, KeyRole(role))
        return tenant.id, key.id, secret


def add_key(app, tenant_id: int, role: str) -> tuple[int, str]:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        key, secret = auth.new_key(s, tenant_id, role, KeyRole(role))
        return key.id, secret


def bearer(secret: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}", **extra}


def rows(app, tenant_id: int | None = None) -> list[AuditEvent]:  # noqa: ANN001
    flush_read_audit(app)
    with app.extensions["medmaas.db"].session() as s:
        q = select(AuditEvent).order_by(AuditEvent.id)
        if tenant_id is not None:
            q = q.where(AuditEvent.tenant_id == tenant_id)
        out = list(s.scalars(q))
        s.expunge_all()
        return out


def last_row(app, tenant_id: int) -> AuditEvent:  # noqa: ANN001
    found = rows(app, tenant_id)
    assert found, "no audit row"
    return found[-1]


def sql(app, statement: str, **params: Any) -> None:  # noqa: ANN001
    """A hand edit, the way someone with database access would make it."""
    with app.extensions["medmaas.db"].engine.begin() as conn:
        conn.execute(text(statement), params)


def job_count(app) -> int:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        return s.scalar(select(func.count()).select_from(Job)) or 0


def cli(app, *args: str):  # noqa: ANN001, ANN201
    from medmaas.cli import main

    env = to_env(app.extensions["medmaas.settings"])
    return CliRunner().invoke(main, list(args), env=env)


def entry(tenant_id: int, action: str = "dataset.read", **kw: Any) -> audit.Entry:
    return audit.Entry(tenant_id, audit.Actor("key", "api", 7, "abcdef123456"), action, "dataset", "1", **kw)


def verify(app, tenant: str) -> audit.ChainReport:  # noqa: ANN001
    flush_read_audit(app)
    with app.extensions["medmaas.db"].session() as s:
        return audit.verify(s, tenant)[0]


def csrf_of(client) -> str:  # noqa: ANN001
    with client.session_transaction() as sess:
        return sess["csrf"]


def sign_in(client, secret: str) -> None:  # noqa: ANN001
    client.get("/login")
    r = client.post("/login", data={"api_key": secret, "csrf_token": csrf_of(client)})
    assert r.status_code == 302, r.get_data(as_text=True)


# -- the chain ---------------------------------------------------------------------------------


def test_rows_chain_per_tenant_and_verify_passes(app) -> None:  # noqa: ANN001
    a, _, _ = new_tenant(app, "lab-a")
    b, _, _ = new_tenant(app, "lab-b")
    with app.extensions["medmaas.db"].session() as s:
        for i in range(3):
            audit.record(s, entry(a, details={"i": i}))
            audit.record(s, entry(b))
    chain_a = rows(app, a)
    assert [r.seq for r in chain_a] == [1, 2, 3]
    assert chain_a[0].prev_hash == audit.GENESIS
    assert [r.prev_hash for r in chain_a[1:]] == [r.hash for r in chain_a[:-1]]
    assert all(audit.row_hash(r) == r.hash for r in chain_a)
    assert [r.seq for r in rows(app, b)] == [1, 2, 3]  # each tenant its own chain
    assert verify(app, "lab-a").intact and verify(app, "lab-a").rows == 3

    result = cli(app, "audit", "verify")
    assert result.exit_code == 0, result.output
    assert "every chain intact" in result.output and "lab-a: 3 audit rows" in result.output


def test_verify_names_a_row_edited_by_hand(app) -> None:  # noqa: ANN001
    a, _, _ = new_tenant(app, "lab")
    with app.extensions["medmaas.db"].session() as s:
        for _ in range(4):
            audit.record(s, entry(a))
    target = rows(app, a)[1]
    sql(app, "UPDATE audit_events SET object_id = '99' WHERE id = :id", id=target.id)

    report = verify(app, "lab")
    assert not report.intact and report.broken_seq == 2 and "edited" in (report.problem or "")
    result = cli(app, "audit", "verify", "--tenant", "lab")
    assert result.exit_code == 1
    assert "seq 2" in result.output and f"id {target.id}" in result.output and "edited" in result.output


def test_verify_catches_an_edit_that_also_rewrote_the_rows_hash(app) -> None:  # noqa: ANN001
    a, _, _ = new_tenant(app, "lab")
    with app.extensions["medmaas.db"].session() as s:
        for _ in range(3):
            audit.record(s, entry(a))
    with app.extensions["medmaas.db"].session() as s:
        row = s.scalars(select(AuditEvent).where(AuditEvent.seq == 2)).one()
        row.action = "dataset.list"
        row.hash = audit.row_hash(row)  # a careful forger: the row is self-consistent again
    report = verify(app, "lab")
    assert not report.intact and report.broken_seq == 3, report.problem  # the next row no longer follows


def test_verify_names_a_row_deleted_by_hand(app) -> None:  # noqa: ANN001
    a, _, _ = new_tenant(app, "lab")
    with app.extensions["medmaas.db"].session() as s:
        for _ in range(5):
            audit.record(s, entry(a))
    sql(app, "DELETE FROM audit_events WHERE tenant_id = :t AND seq = 3", t=a)

    report = verify(app, "lab")
    assert not report.intact and report.broken_seq == 3 and "seq 3 is missing" in (report.problem or "")
    result = cli(app, "audit", "verify")
    assert result.exit_code == 1 and "seq 3 is missing" in result.output


def test_verify_finds_rows_deleted_from_the_end(app) -> None:  # noqa: ANN001
    a, _, _ = new_tenant(app, "lab")
    with app.extensions["medmaas.db"].session() as s:
        for _ in range(4):
            audit.record(s, entry(a))
    sql(app, "DELETE FROM audit_events WHERE tenant_id = :t AND seq >= 3", t=a)
    report = verify(app, "lab")
    assert report.broken_seq == 3 and "seq 3 to 4 is missing" in (report.problem or "")


def test_cli_export_writes_json_lines_and_is_itself_recorded(app, tmp_path) -> None:  # noqa: ANN001
    a, _, _ = new_tenant(app, "lab")
    with app.extensions["medmaas.db"].session() as s:
        for _ in range(2):
            audit.record(s, entry(a))
    out = tmp_path / "audit.jsonl"
    result = cli(app, "audit", "export", "--tenant", "lab", "--output", str(out))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seq"] for r in lines] == [1, 2] and lines[1]["prev_hash"] == lines[0]["hash"]
    exported = last_row(app, a)
    assert (exported.action, exported.actor, exported.via, exported.details) == ("audit.export", "cli", "cli", {"rows": 2})
    assert cli(app, "audit", "export", "--tenant", "nosuch").exit_code != 0
    assert cli(app, "audit", "verify", "--tenant", "lab").exit_code == 0


# -- what requests record ----------------------------------------------------------------------


def test_a_read_records_key_action_object_address_and_request_id(app, client) -> None:  # noqa: ANN001
    tid, kid, secret = new_tenant(app, "lab")
    job = client.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}}, headers=bearer(secret)).get_json()

    r = client.get(f"/api/v1/jobs/{job['id']}", headers=bearer(secret, **{"X-Request-ID": "trace-42"}))
    assert r.status_code == 200 and r.headers["X-Request-ID"] == "trace-42"
    row = last_row(app, tid)
    assert (row.action, row.object_type, row.object_id) == ("job.read", "job", str(job["id"]))
    assert (row.actor, row.via, row.key_id) == ("key", "api", kid) and secret.startswith(f"mm_{row.key_prefix}_")
    assert (row.outcome, row.status, row.client_addr, row.request_id) == ("ok", 200, "127.0.0.1", "trace-42")

    generated = client.get("/api/v1/jobs", headers=bearer(secret, **{"X-Request-ID": "bad id <script>"}))
    rid = generated.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid) and last_row(app, tid).request_id == rid


def test_a_write_is_recorded_with_its_commit_naming_what_it_created(app, client) -> None:  # noqa: ANN001
    tid, _, secret = new_tenant(app, "lab")
    r = client.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}}, headers=bearer(secret))
    assert r.status_code == 202
    row = last_row(app, tid)
    assert (row.action, row.object_type, row.object_id) == ("job.create", "job", str(r.get_json()["id"]))
    assert row.outcome == "ok" and row.status is None  # written before the answer existed
    assert row.details == {"kind": "sleep"}  # what was submitted, not the spec

    # the same Idempotency-Key again: nothing new committed, and the trail says so
    for _ in range(2):
        again = client.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}},
                            headers=bearer(secret, **{"Idempotency-Key": "k1"}))
    assert again.status_code == 200
    row = last_row(app, tid)
    assert (row.action, row.outcome, row.status) == ("job.create", "unchanged", 200)


@pytest.mark.parametrize("fail_at", ["flush", "commit"])
def test_a_rolled_back_action_leaves_no_row_saying_it_happened(app, client, fail_at: str) -> None:  # noqa: ANN001
    """The action fails while flushing its rows, or at commit after its audit row was added:
    either way neither the job nor an `ok` row remains, only the failed attempt."""
    tid, _, secret = new_tenant(app, "lab")
    db = app.extensions["medmaas.db"]
    failures = []

    def refuse_jobs(session, *_args) -> None:  # noqa: ANN001
        if fail_at == "flush" and any(isinstance(o, Job) for o in session.new):
            raise RuntimeError("disk full")
        entry = audit.pending(session)
        if fail_at == "commit" and entry is not None and entry.in_transaction and not failures:
            failures.append(entry.action)  # once: the failed attempt's own row may then be written
            raise RuntimeError("disk full")

    hook = "before_flush" if fail_at == "flush" else "before_commit"  # after the audit hook's
    event.listen(db.sessionmaker, hook, refuse_jobs)
    try:
        r = client.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}}, headers=bearer(secret))
    finally:
        event.remove(db.sessionmaker, hook, refuse_jobs)
    assert r.status_code == 500 and job_count(app) == 0
    assert failures == (["job.create"] if fail_at == "commit" else [])
    assert [(x.action, x.outcome, x.status, x.object_id, x.details) for x in rows(app, tid)] == [
        ("job.create", "failed", 500, None, {"kind": "sleep"})]  # names no job that never was
    assert verify(app, "lab").intact


def test_an_action_whose_audit_row_cannot_be_written_is_not_committed(app, client, monkeypatch) -> None:  # noqa: ANN001
    tid, _, secret = new_tenant(app, "lab")

    def broken(session, entry) -> None:  # noqa: ANN001
        raise RuntimeError("audit table unavailable")

    monkeypatch.setattr(audit, "record", broken)  # a write's row, chained with its commit
    monkeypatch.setattr(audit, "append_rows", broken)  # a read's (or a failure's) row, and batches of reads'
    r = client.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}}, headers=bearer(secret))
    assert r.status_code >= 500 and job_count(app) == 0
    # the failure's row could not be written either: reads now write their own before answering
    read = client.get("/api/v1/jobs", headers=bearer(secret))
    assert read.status_code == 503 and read.get_json()["error"]["code"] == "audit_unavailable"  # nothing unrecorded is served
    monkeypatch.undo()
    assert rows(app, tid) == []


def test_predict_inputs_are_recorded_hashed_never_stored(app, client) -> None:  # noqa: ANN001
    tid, _, secret = new_tenant(app, "lab")
    with app.extensions["medmaas.db"].session() as s:
        s.add(ModelVersion(tenant_id=tid, name="sol", version=2, arch="rnn", task="regression", input_kind="smiles",
                           spec={"arch": "rnn", "max_len": 64}, artifact_uri="file:///nowhere"))
    inputs = ["CC(=O)Oc1ccccc1C(=O)O", "PATIENT-DOE-JOHN"]
    r = client.post("/api/v1/models/sol/predict", json={"inputs": inputs, "timeout": 0}, headers=bearer(secret))
    assert r.status_code == 202, r.get_json()
    row = last_row(app, tid)
    assert (row.action, row.object_type, row.object_id) == ("model.predict", "model", "sol@2")
    assert row.details["inputs"] == 2 and row.details["inputs_sha256"] == audit.sha256_json(inputs)
    assert row.details["created"] == {"job": [r.get_json()["id"]]}
    with app.extensions["medmaas.db"].engine.connect() as conn:
        dump = json.dumps([list(x) for x in conn.execute(text("SELECT * FROM audit_events"))], default=str)
    assert "PATIENT-DOE-JOHN" not in dump and "CC(=O)O" not in dump


def test_refused_attempts_are_recorded_as_denied(app, client) -> None:  # noqa: ANN001
    tid, _, _ = new_tenant(app, "lab")
    viewer_id, viewer = add_key(app, tid, "viewer")
    other, _, other_secret = new_tenant(app, "other")
    job = client.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}},
                      headers=bearer(other_secret)).get_json()

    assert client.post("/api/v1/keys", json={"role": "admin"}, headers=bearer(viewer)).status_code == 403
    row = last_row(app, tid)
    assert (row.action, row.outcome, row.status, row.key_id) == ("key.create", "denied", 403, viewer_id)

    assert client.get(f"/api/v1/jobs/{job['id']}", headers=bearer(viewer)).status_code == 404
    row = last_row(app, tid)  # recorded in the caller's trail; the other tenant's shows nothing
    assert (row.action, row.object_id, row.outcome, row.status) == ("job.read", str(job["id"]), "denied", 404)
    assert [x.action for x in rows(app, other)] == ["job.create"]

    assert client.get("/api/v1/jobs", headers=bearer("mm_000000000000_nope")).status_code == 401  # no tenant: no row


def test_key_lifecycle_is_recorded(app, client) -> None:  # noqa: ANN001
    tid, _, secret = new_tenant(app, "lab")
    created = client.post("/api/v1/keys", json={"role": "viewer", "name": "ci"}, headers=bearer(secret)).get_json()
    rotated = client.post(f"/api/v1/keys/{created['id']}/rotate", headers=bearer(secret)).get_json()
    assert client.delete(f"/api/v1/keys/{rotated['id']}", headers=bearer(secret)).status_code == 204
    got = [(r.action, r.object_id, r.details.get("created")) for r in rows(app, tid)]
    assert got == [
        ("key.create", str(created["id"]), None),
        ("key.rotate", str(created["id"]), {"key": [rotated["id"]]}),
        ("key.revoke", str(rotated["id"]), None),
    ]
    assert rows(app, tid)[0].details == {"role": "viewer"}
    assert all(created["secret"] not in json.dumps(r.details) for r in rows(app, tid))


# -- every route is audited --------------------------------------------------------------------


def test_routes_added_later_get_a_readable_action_without_edits() -> None:
    assert describe("datasets.delete_dataset", "/api/v1/datasets/<id:dataset_id>", "DELETE",
                    {"dataset_id": 4}).action == "dataset.delete"
    d = describe("models.delete_model_version", "/api/v1/models/<string:name>/versions/<id:version>", "DELETE",
                 {"name": "sol", "version": 3})
    assert (d.action, d.object_type, d.object_id) == ("model.version.delete", "model", "sol@3")
    assert describe("models.delete_model", "/api/v1/models/<string:name>", "DELETE", {"name": "sol"}).action == \
        "model.delete"
    assert describe("jobs.delete_job", "/api/v1/jobs/<id:job_id>", "DELETE", {"job_id": 1}).action == "job.delete"
    assert describe("usage.usage", "/api/v1/usage", "GET", {}).action == "usage.list"


def test_every_api_route_is_audited(app, client) -> None:  # noqa: ANN001
    tid, _, secret = new_tenant(app, "walk")
    add_key(app, tid, "admin")  # so revoking a walked key is never the last admin
    ops = routes(client)
    assert len(ops) >= 20 and ("GET", "/api/v1/audit", ) in {(m, p) for m, p, _ in ops}
    for method, path, op in ops:
        target, _ = add_key(app, tid, "viewer")
        url, kw = minimal_request(path, op, target)
        before = len(rows(app, tid))
        resp = client.open(url, method=method, headers=bearer(secret), **kw)
        resp.close()
        after = rows(app, tid)
        assert len(after) > before, f"{method} {path} ({resp.status_code}) left no audit row"
        assert after[-1].action and after[-1].request_id == resp.headers["X-Request-ID"], (method, path)
    assert verify(app, "walk").intact


def _page_url(rule) -> str:  # noqa: ANN001
    """A concrete URL naming objects that do not exist (so a walked POST changes nothing)."""
    values = {a: ("999999" if a.endswith("id") or a in ("version", "index", "rank") else ("weights" if a == "which" else "nosuch"))
              for a in rule.arguments}
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", lambda m: values[m.group(1)], rule.rule)


def test_every_page_that_touches_tenant_data_is_audited(app, client) -> None:  # noqa: ANN001
    tid, kid, secret = new_tenant(app, "web")
    sign_in(client, secret)
    login = last_row(app, tid)
    assert (login.action, login.via, login.key_id, login.object_id, login.outcome) == ("login", "web", kid, str(kid),
                                                                                      "ok")
    page_rules = [r for r in app.url_map.iter_rules() if r.endpoint.startswith("web.")]
    walked = 0
    for rule in page_rules:
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            if not audited(rule.endpoint) or rule.endpoint in ("web.login", "web.logout"):
                continue
            before = len(rows(app, tid))
            kw: dict[str, Any] = {"data": {"csrf_token": csrf_of(client)}} if method == "POST" else {}
            resp = client.open(_page_url(rule), method=method, **kw)
            resp.close()
            after = rows(app, tid)
            assert len(after) > before, f"{method} {rule.rule} ({resp.status_code}) left no audit row"
            assert after[-1].via == "web" and after[-1].key_id == kid
            walked += 1
    assert walked >= 20
    assert client.post("/logout", data={"csrf_token": csrf_of(client)}).status_code == 302
    assert (last_row(app, tid).action, last_row(app, tid).outcome) == ("logout", "ok")
    not_audited = sorted({r.endpoint for r in app.url_map.iter_rules() if not audited(r.endpoint)})
    assert not_audited == ["api-docs.openapi_json", "health.healthz", "health.metrics", "health.readyz", "static",
                           "web.index"]


# -- reading the trail -------------------------------------------------------------------------


def test_audit_api_filters_pages_and_exports(app, client) -> None:  # noqa: ANN001
    tid, kid, secret = new_tenant(app, "lab")
    job = client.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}}, headers=bearer(secret)).get_json()
    for _ in range(3):
        client.get(f"/api/v1/jobs/{job['id']}", headers=bearer(secret))

    page = client.get("/api/v1/audit?action=job.read&limit=2", headers=bearer(secret)).get_json()
    assert [e["action"] for e in page["items"]] == ["job.read", "job.read"] and page["next_cursor"]
    rest = client.get(f"/api/v1/audit?action=job.read&limit=2&cursor={page['next_cursor']}",
                      headers=bearer(secret)).get_json()
    assert len(rest["items"]) == 1 and rest["next_cursor"] is None
    by_object = client.get(f"/api/v1/audit?object_type=job&object_id={job['id']}&key_id={kid}",
                           headers=bearer(secret)).get_json()["items"]
    assert {e["action"] for e in by_object} == {"job.create", "job.read"}
    assert client.get("/api/v1/audit?action=job.&until=2000-01-01T00:00:00", headers=bearer(secret)).get_json()[
        "items"] == []
    assert client.get("/api/v1/audit?since=yesterday", headers=bearer(secret)).status_code == 422

    export = client.get("/api/v1/audit/export", headers=bearer(secret))
    assert export.status_code == 200 and export.mimetype == "application/x-ndjson"
    lines = [json.loads(line) for line in export.get_data(as_text=True).splitlines()]
    assert [x["seq"] for x in lines] == list(range(1, len(lines) + 1)) and lines[0]["action"] == "job.create"

    chain = client.get("/api/v1/audit/verify", headers=bearer(secret)).get_json()
    assert chain["intact"] and chain["rows"] >= 7

    _, member = add_key(app, tid, "member")
    assert client.get("/api/v1/audit", headers=bearer(member)).status_code == 403
    doc = client.get("/api/v1/openapi.json").get_json()
    assert "application/x-ndjson" in doc["paths"]["/api/v1/audit/export"]["get"]["responses"]["200"]["content"]


def test_audit_page_is_for_admins(app) -> None:  # noqa: ANN001
    tid, _, admin = new_tenant(app, "lab")
    _, viewer = add_key(app, tid, "viewer")
    browser = app.test_client()
    sign_in(browser, admin)
    browser.get("/jobs")
    page = browser.get("/audit?action=job.list")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and 'href="/audit"' in html and "<code>job.list</code>" in html
    assert "<code>login</code>" not in html  # filtered
    export = browser.get("/audit/export")
    assert export.mimetype == "application/x-ndjson" and '"action": "login"' in export.get_data(as_text=True)
    assert browser.get("/audit?since=never").status_code == 422

    other = app.test_client()
    sign_in(other, viewer)
    assert 'href="/audit"' not in other.get("/jobs").get_data(as_text=True)
    denied = other.get("/audit")
    assert denied.status_code == 403
    assert (last_row(app, tid).action, last_row(app, tid).outcome) == ("audit.read", "denied")


def test_upload_records_the_created_dataset(app, client) -> None:  # noqa: ANN001
    tid, _, secret = new_tenant(app, "lab")
    r = client.post("/api/v1/datasets", data={"kind": "sequences", "file": (io.BytesIO(b"smiles,y\nCCO,1\nCCC,2\n"), "d.csv")},
                    headers=bearer(secret), content_type="multipart/form-data")
    assert r.status_code == 201, r.get_json()
    row = last_row(app, tid)
    assert (row.action, row.object_type, row.object_id, row.outcome) == ("dataset.create", "dataset",
                                                                        str(r.get_json()["id"]), "ok")


def test_revoked_key_rows_keep_the_key_id(app, client) -> None:  # noqa: ANN001
    tid, _, admin = new_tenant(app, "lab")
    kid, viewer = add_key(app, tid, "viewer")
    client.get("/api/v1/jobs", headers=bearer(viewer))
    with app.extensions["medmaas.db"].session() as s:
        auth.revoke(s, s.get_one(ApiKey, kid))
    assert [r.key_id for r in rows(app, tid)] == [kid] and verify(app, "lab").intact


@pytest.mark.parametrize("status,write,expected", [(200, False, "ok"), (200, True, "unchanged"), (302, True, "unchanged"),
                                                   (403, False, "denied"), (404, True, "denied"), (409, True, "failed"),
                                                   (500, False, "failed")])
def test_outcome_of_requests_that_committed_nothing(status: int, write: bool, expected: str) -> None:
    assert audit.outcome_for(status, write) == expected


def test_cli_key_commands_are_recorded_as_cli(app) -> None:  # noqa: ANN001
    tid, _, _ = new_tenant(app, "lab")
    created = cli(app, "keys", "create", "--tenant", "lab", "--role", "viewer")
    assert created.exit_code == 0, created.output
    key_id = next(r.object_id for r in rows(app, tid) if r.action == "key.create")
    assert cli(app, "keys", "revoke", str(key_id)).exit_code == 0
    got = [(r.action, r.actor, r.via, r.key_id, r.object_id) for r in rows(app, tid)]
    assert got == [("key.create", "cli", "cli", None, key_id), ("key.revoke", "cli", "cli", None, key_id)]
    assert created.output.strip() not in json.dumps([r.details for r in rows(app, tid)])


def test_hostile_path_values_are_recorded_safely(app, client) -> None:  # noqa: ANN001
    tid, _, secret = new_tenant(app, "lab")
    assert client.get("/api/v1/models/a%00b", headers=bearer(secret)).status_code == 404
    row = last_row(app, tid)
    assert (row.action, row.object_id, row.outcome) == ("model.read", "a\ufffdb", "denied")
    assert client.get("/api/v1/audit?object_id=a%00b", headers=bearer(secret)).status_code == 422
    assert client.get("/api/v1/audit?action=mod%25.", headers=bearer(secret)).get_json()["items"] == []
    assert verify(app, "lab").intact


def test_page_predict_records_hashed_inputs(app, client, monkeypatch) -> None:  # noqa: ANN001
    from app.web import library

    monkeypatch.setattr(library, "PREDICT_WAIT_S", 0.0)  # no worker here: the page links the job at once
    tid, _, secret = new_tenant(app, "lab")
    with app.extensions["medmaas.db"].session() as s:
        s.add(ModelVersion(tenant_id=tid, name="sol", version=1, arch="rnn", task="regression", input_kind="smiles",
                           spec={"arch": "rnn", "max_len": 64}, artifact_uri="file:///nowhere"))
    sign_in(client, secret)
    r = client.post("/models/sol/predict", data={"inputs": "CCO\nPATIENT-DOE-JANE\n", "ref": "",
                                                 "csrf_token": csrf_of(client)})
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    row = last_row(app, tid)
    assert (row.action, row.via, row.object_id) == ("model.predict", "web", "sol")
    assert row.details["inputs_sha256"] == audit.sha256_json(["CCO", "PATIENT-DOE-JANE"])  # as the API hashes them
    assert "PATIENT-DOE-JANE" not in json.dumps(row.details)
