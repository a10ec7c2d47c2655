"""The lighter job path (issue 13): state changes in one UPDATE ... RETURNING plus their
event, a claim that returns what the worker needs, API keys cached for a few seconds with
revocation still effective, reads audited by one INSERT and sealed into the chain later,
and a dropped database connection that gives the job's attempt back instead of failing it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, text, update

from app import audit, auth, jobs
from app.db import Database
from app.models import ApiKey, AuditEvent, Job, JobEvent, JobState, KeyRole, utcnow
from tests.conftest import flush_read_audit, use_template

# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture()
def db(tmp_path, broker_url, sqlite_template):  # noqa: ANN001, ANN201
    from app.config import from_env

    settings = from_env({}, home=tmp_path / "home", broker_url=broker_url)
    use_template(settings, sqlite_template)
    database = Database(settings.sqlalchemy_url)
    yield database
    database.dispose()


@contextmanager
def statements(database: Database) -> Iterator[list[str]]:
    """The SQL statements sent while the block runs (first word of each, upper case)."""
    seen: list[str] = []

    def note(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(statement.split(None, 1)[0].upper())

    event.listen(database.engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(database.engine, "before_cursor_execute", note)


def new_job(database: Database) -> tuple[int, int]:
    """(tenant id, job id) of a queued `sleep` job."""
    with database.session() as s:
        tenant = auth.create_tenant(s, f"path-{time.monotonic_ns()}")
        job, _ = jobs.submit(s, tenant_id=tenant.id, kind="sleep", spec={"seconds": 0}, queue="cpu")
        return tenant.id, job.id


def events(database: Database, job_id: int) -> list[tuple[int, str, dict[str, Any]]]:
    with database.session() as s:
        rows = s.execute(
            select(JobEvent.seq, JobEvent.type, JobEvent.data).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        ).all()
        return [(seq, type_, data) for seq, type_, data in rows]


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def new_tenant(app) -> tuple[int, str, str]:  # noqa: ANN001
    """(tenant id, tenant name, admin secret)."""
    with app.extensions["medmaas.db"].session() as s:
        tenant = auth.create_tenant(s, f"lab-{time.monotonic_ns()}")
        return tenant.id, tenant.name, auth.new_key(s, tenant.id, "admin", KeyRole.admin)[1]


def audit_rows(app, tenant_id: int) -> list[AuditEvent]:  # noqa: ANN001
    flush_read_audit(app)
    with app.extensions["medmaas.db"].session() as s:
        found = list(s.scalars(select(AuditEvent).where(AuditEvent.tenant_id == tenant_id).order_by(AuditEvent.id)))
        s.expunge_all()
        return found


def verify(app, name: str) -> audit.ChainReport:  # noqa: ANN001
    flush_read_audit(app)
    with app.extensions["medmaas.db"].session() as s:
        return audit.verify(s, name)[0]


# -- the job path -----------------------------------------------------------------------------


def test_a_claim_is_one_update_and_its_event_and_returns_the_job(db: Database) -> None:
    _tenant, job_id = new_job(db)
    with statements(db) as sent, db.session() as s:
        claimed = jobs.claim_job(s, job_id, "w1", max_running=0)
    assert isinstance(claimed, jobs.Claimed) and claimed.attempt == 1
    assert (claimed.job.id, claimed.job.kind, claimed.job.spec["seconds"], claimed.job.queue) == (
        job_id,
        "sleep",
        0,
        "cpu",
    )
    assert claimed.job.started_at is not None
    assert [x for x in sent if x not in ("BEGIN", "COMMIT")] == ["UPDATE", "INSERT"]  # no re-select
    assert events(db, job_id)[-1][1:] == ("state", {"to": "running", "attempt": 1, "from": "queued", "worker": "w1"})

    with db.session() as s:  # a second delivery loses, and changes nothing
        assert jobs.claim_job(s, job_id, "w2", max_running=0) is None


def test_finishing_needs_no_select_when_the_worker_knows_its_start(db: Database) -> None:
    _tenant, job_id = new_job(db)
    with db.session() as s:
        claimed = jobs.claim_job(s, job_id, "w", max_running=0)
    assert isinstance(claimed, jobs.Claimed)
    with statements(db) as sent, db.session() as s:
        assert jobs.succeed(s, job_id, claimed.attempt, {"ok": True}, started_at=claimed.job.started_at)
    assert [x for x in sent if x not in ("BEGIN", "COMMIT")] == ["UPDATE", "INSERT"]
    with db.session() as s:
        job = s.get_one(Job, job_id)
        assert job.state == JobState.succeeded and job.duration_s is not None and job.duration_s >= 0
    # the events are numbered without gaps, each committed with its transition
    assert [(seq, data.get("to")) for seq, _type, data in events(db, job_id)] == [
        (1, "queued"),
        (2, "running"),
        (3, "succeeded"),
    ]


def test_progress_and_events_of_a_lost_attempt_are_refused(db: Database) -> None:
    _tenant, job_id = new_job(db)
    with db.session() as s:
        attempt = jobs.claim(s, job_id, "w")
    assert attempt == 1
    with db.session() as s:
        assert jobs.report_progress(s, job_id, attempt, 0.5, "half")
        assert jobs.report_event(s, job_id, attempt, "log", {"message": "hi"})
        assert not jobs.report_progress(s, job_id, attempt + 1, 0.6)
        assert not jobs.report_event(s, job_id, attempt + 1, "log", {})
        assert jobs.request_cancel(s, job_id) == JobState.running
    assert [t for _seq, t, _data in events(db, job_id)] == ["state", "state", "progress", "log", "cancel_requested"]


def test_a_claim_waits_while_the_tenant_is_at_its_limit(db: Database) -> None:
    with db.session() as s:
        tenant = auth.create_tenant(s, "busy")
        ids = [jobs.submit(s, tenant_id=tenant.id, kind="sleep", spec={}, queue="cpu")[0].id for _ in range(3)]
    with db.session() as s:
        assert isinstance(jobs.claim_job(s, ids[0], "w", max_running=2), jobs.Claimed)
        assert isinstance(jobs.claim_job(s, ids[1], "w", max_running=2), jobs.Claimed)
    with db.session() as s:
        waiting = jobs.claim_job(s, ids[2], "w", max_running=2)
    assert waiting == jobs.Waiting(jobs.waiting_message(2, "cpu"))
    with db.session() as s:
        job = s.get_one(Job, ids[2])
        assert job.state == JobState.queued and job.published_at is None and job.attempts == 0
        assert jobs.claim_job(s, ids[0], "w", max_running=2) is None  # running already: not claimable


# -- the API key cache ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def key_cache(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(auth, "KEYS", auth.KeyCache(ttl_s=5.0, clock=clock))
    return clock


def test_a_cached_key_needs_no_select_and_a_revocation_elsewhere_counts_within_the_ttl(
    app,
    key_cache: Clock,  # noqa: ANN001
) -> None:
    database = app.extensions["medmaas.db"]
    _tid, _name, secret = new_tenant(app)
    with database.session() as s:
        key_id = auth.verify(s, secret).id
    with statements(database) as sent, database.session() as s:
        assert auth.verify(s, secret).id == key_id
    assert "SELECT" not in sent

    # revoked by another process (a row edited behind this process's back)
    with database.engine.begin() as conn:
        conn.execute(update(ApiKey).where(ApiKey.id == key_id).values(revoked_at=utcnow()))
    key_cache.now += 4.9
    with database.session() as s:
        assert auth.verify(s, secret).id == key_id  # still cached
    key_cache.now += 0.2  # the TTL has passed
    with database.session() as s, pytest.raises(auth.KeyRefused, match="revoked"):
        auth.verify(s, secret)


def test_a_revocation_in_this_process_and_an_expiry_count_at_once(app, client, key_cache: Clock) -> None:  # noqa: ANN001
    database = app.extensions["medmaas.db"]
    tid, _name, admin = new_tenant(app)
    with database.session() as s:
        other, other_secret = auth.new_key(s, tid, "ci", KeyRole.member, expires_in_days=1)
        other_id = other.id
    assert client.get("/api/v1/jobs", headers=bearer(other_secret)).status_code == 200  # now cached
    assert client.delete(f"/api/v1/keys/{other_id}", headers=bearer(admin)).status_code == 204
    r = client.get("/api/v1/jobs", headers=bearer(other_secret))
    assert r.status_code == 401 and r.get_json()["error"]["message"] == "API key revoked"

    with database.session() as s:
        soon, soon_secret = auth.new_key(s, tid, "soon", KeyRole.viewer, expires_in_days=1)
        soon_id = soon.id
    assert client.get("/api/v1/jobs", headers=bearer(soon_secret)).status_code == 200
    with database.session() as s:  # the cached row holds expires_at; a key past it is refused
        cached = auth.KEYS.get(s.get_one(ApiKey, soon_id).key_hash)
    assert cached is not None
    cached["expires_at"] = utcnow() - timedelta(seconds=1)
    r = client.get("/api/v1/jobs", headers=bearer(soon_secret))
    assert r.status_code == 401 and r.get_json()["error"]["message"] == "API key expired"


def test_a_cached_key_still_records_when_it_was_used(app, client, key_cache: Clock) -> None:  # noqa: ANN001
    database = app.extensions["medmaas.db"]
    _tid, _name, secret = new_tenant(app)
    assert client.get("/api/v1/jobs", headers=bearer(secret)).status_code == 200
    assert client.get("/api/v1/jobs", headers=bearer(secret)).status_code == 200  # from the cache
    with database.session() as s:
        key = auth.verify(s, secret)
        assert key.last_used_at is not None and (utcnow() - key.last_used_at).total_seconds() < 60


# -- reads in the audit trail -----------------------------------------------------------------


def test_rows_are_appended_unsealed_and_verify_seals_them_first(app, client) -> None:  # noqa: ANN001
    tid, name, secret = new_tenant(app)
    job = client.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}}, headers=bearer(secret))
    assert job.status_code == 202
    for _ in range(3):
        assert client.get(f"/api/v1/jobs/{job.get_json()['id']}", headers=bearer(secret)).status_code == 200
    rows = audit_rows(app, tid)
    # the write's row is committed with its job, the reads' before their answers; none chained yet
    assert [(r.action, r.seq) for r in rows] == [("job.create", None)] + [("job.read", None)] * 3
    assert rows[1].status == 200 and rows[1].hash is None

    report = verify(app, name)
    assert report.intact and report.rows == 4 and report.last_seq == 4
    sealed = audit_rows(app, tid)
    assert [r.seq for r in sealed] == [1, 2, 3, 4]  # in id order
    assert [r.prev_hash for r in sealed] == [audit.GENESIS] + [r.hash for r in sealed[:-1]]


def test_tampering_with_a_sealed_read_is_detected(app, client) -> None:  # noqa: ANN001
    tid, name, secret = new_tenant(app)
    for _ in range(3):
        assert client.get("/api/v1/jobs", headers=bearer(secret)).status_code == 200
    flush_read_audit(app)
    assert audit.seal(app.extensions["medmaas.db"].engine, tid) == 3
    target = audit_rows(app, tid)[1]
    with app.extensions["medmaas.db"].engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET status = 404 WHERE id = :id"), {"id": target.id})
    report = verify(app, name)
    assert not report.intact and report.broken_seq == 2 and "was edited" in (report.problem or "")


def test_the_export_seals_first_and_lists_the_whole_chain(app, client) -> None:  # noqa: ANN001
    tid, _name, secret = new_tenant(app)
    for _ in range(2):
        client.get("/api/v1/jobs", headers=bearer(secret))
    export = client.get("/api/v1/audit/export", headers=bearer(secret))
    lines = export.get_data(as_text=True).splitlines()
    assert len(lines) == 2 and all('"seq": null' not in line for line in lines)  # the reads' rows, written first
    assert [(r.action, r.seq) for r in audit_rows(app, tid)] == [("job.list", 1), ("job.list", 2), ("audit.export", None)]


def test_a_read_whose_audit_row_cannot_be_written_answers_503(app, client, monkeypatch) -> None:  # noqa: ANN001
    """Reads' rows are written in batches: once a batch cannot be written, reads write their
    own row before answering, and answer 503 while that fails; the batch is kept, not lost."""
    from app.api.auditing import READ_TRAIL

    tid, _name, secret = new_tenant(app)
    trail = app.extensions[READ_TRAIL]

    def broken(session, rows) -> None:  # noqa: ANN001
        raise RuntimeError("audit table unavailable")

    monkeypatch.setattr(audit, "append_rows", broken)
    assert client.get("/api/v1/jobs", headers=bearer(secret)).status_code == 200  # its row is batched
    assert trail.flush() == 0 and not trail.healthy  # the batch could not be written
    r = client.get("/api/v1/jobs", headers=bearer(secret))
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "audit_unavailable"
    monkeypatch.undo()
    assert trail.pending() == 1
    assert [r.status for r in audit_rows(app, tid)] == [200]  # the first read's row, written at last
    assert trail.healthy
    assert client.get("/api/v1/jobs", headers=bearer(secret)).status_code == 200


def test_a_web_process_seals_a_tenant_after_many_reads(app, client, monkeypatch) -> None:  # noqa: ANN001
    from app.api import auditing

    monkeypatch.setattr(auditing, "_SEALS", audit.SealSchedule(after=3))
    tid, _name, secret = new_tenant(app)
    for i in range(3):
        r = client.get("/api/v1/jobs", headers=bearer(secret))
        r.close()  # the seal runs once the response is closed (sent)
        unsealed = [x for x in audit_rows(app, tid) if x.seq is None]
        assert len(unsealed) == (i + 1 if i < 2 else 0)


def test_the_maintenance_tick_seals_every_tenant(app, client) -> None:  # noqa: ANN001
    a, _na, sa = new_tenant(app)
    b, _nb, sb = new_tenant(app)
    for secret in (sa, sb, sa):
        client.get("/api/v1/jobs", headers=bearer(secret))
    flush_read_audit(app)
    assert audit.seal(app.extensions["medmaas.db"].engine, batch=1) == 3  # in batches of one
    assert [r.seq for r in audit_rows(app, a)] == [1, 2] and [r.seq for r in audit_rows(app, b)] == [1]
    assert audit.seal(app.extensions["medmaas.db"].engine) == 0


# -- the pool ---------------------------------------------------------------------------------


def test_a_job_whose_database_connection_drops_gives_its_attempt_back(db: Database, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """A database restart or fail-over under a running job is not the job's failure: the attempt
    is released (queued again, to resume from its checkpoint), never failed."""
    from sqlalchemy.exc import OperationalError

    from app.config import from_env
    from app.models import Job, JobState
    from workers import tasks

    class Dropped:
        def run(self, ctx: Any, spec: Any) -> Any:
            raise OperationalError(
                "UPDATE jobs ...", {}, Exception("terminating connection"), connection_invalidated=True
            )

    _tenant, job_id = new_job(db)
    monkeypatch.setattr(tasks, "kind_for", lambda kind: Dropped())
    assert tasks.execute_job(db, from_env({}, home=tmp_path), None, job_id) == "released"
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.state, job.error) == (JobState.queued, None)
        assert "database connection was lost" in (job.message or "")
    assert not tasks.lost_database_connection(ValueError("a bug in the job"))


# -- the online predict route's model look-up ------------------------------------------------


def add_version(database: Database, tenant_id: int, name: str, number: int, alias: str | None = None) -> None:
    from app.models import ModelAlias, ModelVersion

    with database.session() as s:
        s.add(
            ModelVersion(
                tenant_id=tenant_id,
                name=name,
                version=number,
                arch="rnn",
                task="regression",
                input_kind="smiles",
                artifact_uri=f"models/{name}/v{number}",
            )
        )
        if alias is not None:
            s.add(ModelAlias(tenant_id=tenant_id, name=name, alias=alias, version=number))


def test_a_warm_version_look_up_sends_no_sql_and_an_alias_moved_elsewhere_counts_within_the_ttl(db) -> None:  # noqa: ANN001
    from app.models import ModelAlias
    from app.registry import ModelNotFound, VersionCache

    clock = Clock()
    cache = VersionCache(ttl_s=2.0, clock=clock)
    with db.session() as s:
        tenant_id = auth.create_tenant(s, "lab").id
    add_version(db, tenant_id, "sol", 1, alias="prod")
    add_version(db, tenant_id, "sol", 2)
    with db.session() as s:
        assert cache.resolve(s, tenant_id, "sol", alias="prod").version == 1
    with statements(db) as sent, db.session() as s:
        mv = cache.resolve(s, tenant_id, "sol", alias="prod")
    assert sent == [] and (mv.version, mv.artifact_uri) == (1, "models/sol/v1")
    # moved by another process (a row changed behind this one's back)
    with db.engine.begin() as conn:
        conn.execute(update(ModelAlias).where(ModelAlias.alias == "prod").values(version=2))
    clock.now += 1.9
    with db.session() as s:
        assert cache.resolve(s, tenant_id, "sol", alias="prod").version == 1  # still trusted
    clock.now += 0.2
    with db.session() as s:
        assert cache.resolve(s, tenant_id, "sol", alias="prod").version == 2
        with pytest.raises(ModelNotFound):
            cache.resolve(s, tenant_id, "sol", version=3)
        with pytest.raises(ModelNotFound):  # another tenant's model: never from the cache
            cache.resolve(s, tenant_id + 1000, "sol", alias="prod")


def test_the_predict_route_sees_an_alias_moved_or_a_version_deleted_in_its_process_at_once(app, client) -> None:  # noqa: ANN001
    database = app.extensions["medmaas.db"]
    tenant_id, _name, secret = new_tenant(app)
    add_version(database, tenant_id, "sol", 1, alias="prod")
    add_version(database, tenant_id, "sol", 2)

    def predicted_with() -> str:
        body = {"inputs": ["CCO"], "alias": "prod", "timeout": 0}  # timeout 0: a job, whose spec names the version
        r = client.post("/api/v1/models/sol/predict", json=body, headers=bearer(secret))
        assert r.status_code == 202, r.get_json()
        job = r.get_json()
        assert client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=bearer(secret)).status_code in (200, 202)
        return job["spec"]["model"]

    assert predicted_with() == "sol@1"
    assert predicted_with() == "sol@1"  # now from the cache
    r = client.put("/api/v1/models/sol/aliases/prod", json={"version": 2}, headers=bearer(secret))
    assert r.status_code == 200
    assert predicted_with() == "sol@2"
    assert client.delete("/api/v1/models/sol/versions/2", headers=bearer(secret)).status_code == 204
    r = client.post("/api/v1/models/sol/predict", json={"inputs": ["CCO"], "alias": "prod"}, headers=bearer(secret))
    assert r.status_code == 404 and "prod" in r.get_json()["error"]["message"]
