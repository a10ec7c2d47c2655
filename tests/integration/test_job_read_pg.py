"""GET /api/v1/jobs/{id} on PostgreSQL: the Core read path answers what JobSchema dumps (in
autocommit: no BEGIN / COMMIT round trips), its audit row is written in the read trail's next
batch, and the connection goes back to the pool transactional again."""
from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select, update

from app import auth
from app.api.jobs import JobSchema
from app.models import AuditEvent, Job, JobState, KeyRole, utcnow
from tests.conftest import flush_read_audit

pytestmark = pytest.mark.integration


def new_key(app) -> tuple[int, dict[str, str]]:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        tenant = auth.create_tenant(s, f"read-{uuid.uuid4().hex[:8]}")
        return tenant.id, {"Authorization": f"Bearer {auth.new_key(s, tenant.id, 'k', KeyRole.viewer)[1]}"}


def test_job_detail_on_postgresql(pg_app) -> None:  # noqa: ANN001
    db = pg_app.extensions["medmaas.db"]
    client = pg_app.test_client()
    tenant_id, headers = new_key(pg_app)
    _other, other_headers = new_key(pg_app)
    with db.session() as s:
        job = Job(tenant_id=tenant_id, kind="sleep", spec={"seconds": 0}, queue="cpu", state=JobState.queued)
        s.add(job)
        s.flush()
        job_id = job.id
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(
            state=JobState.succeeded, result={"x": [1, 2.5]}, started_at=utcnow(), finished_at=utcnow(),
            duration_s=0.25, tags=["t"], progress=1))

    for _ in range(2):  # the second from a pooled connection the first one used
        r = client.get(f"/api/v1/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.get_data(as_text=True)
        with db.session() as s:
            assert r.get_json() == JobSchema().dump(s.get_one(Job, job_id))
    r = client.get(f"/api/v1/jobs/{job_id}", headers=other_headers)
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"

    flush_read_audit(pg_app)
    with db.session() as s:  # committed, seen from another connection
        rows = s.execute(select(AuditEvent.action, AuditEvent.tenant_id, AuditEvent.status, AuditEvent.outcome)
                         .where(AuditEvent.object_id == str(job_id), AuditEvent.action == "job.read")
                         .order_by(AuditEvent.id)).all()
    assert [tuple(r) for r in rows] == [("job.read", tenant_id, 200, "ok")] * 2 + [
        ("job.read", _other, 404, "denied")]

    # pooled connections are transactional again: a write that is rolled back leaves nothing
    with db.sessionmaker() as s:
        assert not s.connection().connection.driver_connection.autocommit
        s.execute(update(Job).where(Job.id == job_id).values(message="not kept"))
        s.rollback()
    with db.session() as s:
        assert s.scalar(select(Job.message).where(Job.id == job_id)) != "not kept"
