"""The audit trail on PostgreSQL: concurrent requests of one tenant (threads of the real app,
each on its own connection) append to one unbroken chain, and the real `medmaas audit verify`
(a subprocess) finds a row edited or deleted by hand in SQL and names it."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid

import pytest
from sqlalchemy import select, text

from app import audit, auth
from app.config import to_env
from app.models import AuditEvent, KeyRole
from tests.conftest import ROOT, flush_read_audit

pytestmark = pytest.mark.integration


def new_tenant(app) -> tuple[int, str, str]:  # noqa: ANN001
    """(tenant id, tenant name, admin secret)."""
    name = f"audit-{uuid.uuid4().hex[:8]}"
    with app.extensions["medmaas.db"].session() as s:
        tenant = auth.create_tenant(s, name)
        return tenant.id, name, auth.new_key(s, tenant.id, "admin", KeyRole.admin)[1]


def chain(app, tenant_id: int) -> list[AuditEvent]:  # noqa: ANN001
    with app.extensions["medmaas.db"].session() as s:
        found = list(s.scalars(select(AuditEvent).where(AuditEvent.tenant_id == tenant_id).order_by(AuditEvent.seq)))
        s.expunge_all()
        return found


def verify_cli(settings, tenant: str) -> subprocess.CompletedProcess:  # noqa: ANN001
    env = {**os.environ, **to_env(settings)}
    return subprocess.run([sys.executable, "-m", "medmaas.cli", "audit", "verify", "--tenant", tenant], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_concurrent_requests_keep_one_unbroken_chain(pg_app) -> None:  # noqa: ANN001
    tenant_id, name, secret = new_tenant(pg_app)
    headers = {"Authorization": f"Bearer {secret}"}
    job = pg_app.test_client().post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}}, headers=headers)
    assert job.status_code == 202
    job_id = job.get_json()["id"]
    threads, per_thread = 8, 15
    statuses: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def work(i: int) -> None:
        client = pg_app.test_client()
        start.wait()
        for n in range(per_thread):
            if n % 5 == 0:  # writes (job.create in the action's transaction) among the reads
                r = client.post("/api/v1/jobs", json={"kind": "sleep", "spec": {"seconds": 0}}, headers=headers)
            else:
                r = client.get(f"/api/v1/jobs/{job_id}", headers=headers)
            with lock:
                statuses.append(r.status_code)

    engine = pg_app.extensions["medmaas.db"].engine
    done = threading.Event()

    def sealer() -> None:  # the maintenance tick chaining reads while writes chain themselves
        while not done.wait(0.005):
            audit.seal(engine, tenant_id, batch=7)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    sealing = threading.Thread(target=sealer)
    sealing.start()
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    done.set()
    sealing.join(60)
    assert sorted(set(statuses)) == [200, 202] and len(statuses) == threads * per_thread

    flush_read_audit(pg_app)  # the reads' rows still in this process's batch
    audit.seal(engine, tenant_id)  # the reads appended after the sealer's last pass
    rows = chain(pg_app, tenant_id)
    assert len(rows) == 1 + threads * per_thread  # every request, none lost
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    assert [r.prev_hash for r in rows] == [audit.GENESIS] + [r.hash for r in rows[:-1]]  # no fork
    result = verify_cli(pg_app.extensions["medmaas.settings"], name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(rows)} audit rows, chain intact" in result.stdout


def test_verify_cli_names_rows_edited_or_deleted_in_sql(pg_app) -> None:  # noqa: ANN001
    settings = pg_app.extensions["medmaas.settings"]
    client = pg_app.test_client()
    engine = pg_app.extensions["medmaas.db"].engine
    edited_id, edited_name, edited_secret = new_tenant(pg_app)
    deleted_id, deleted_name, deleted_secret = new_tenant(pg_app)
    for secret in (edited_secret, deleted_secret):
        for _ in range(4):
            assert client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    # verify seals the reads' rows first; tampering is detectable once they are chained
    assert verify_cli(settings, edited_name).returncode == 0
    assert verify_cli(settings, deleted_name).returncode == 0

    target = chain(pg_app, edited_id)[2]
    with engine.begin() as conn:  # someone covering their tracks: the key that read becomes another
        conn.execute(text("UPDATE audit_events SET key_id = key_id + 1 WHERE id = :id"), {"id": target.id})
    result = verify_cli(settings, edited_name)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"row seq 3 (id {target.id}) was edited" in result.stderr

    with engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE tenant_id = :t AND seq = 2"), {"t": deleted_id})
    result = verify_cli(settings, deleted_name)
    assert result.returncode == 1 and "row seq 2 is missing (deleted)" in result.stderr, result.stdout + result.stderr

    # the untouched chains of other tenants still verify (here: a fresh one)
    _fresh_id, fresh_name, fresh_secret = new_tenant(pg_app)
    client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {fresh_secret}"})
    assert verify_cli(settings, fresh_name).returncode == 0


def test_a_batch_by_copy_stores_what_single_inserts_store(pg_app) -> None:  # noqa: ANN001
    """A big batch goes in by COPY (audit.COPY_MIN_ROWS), a small one by INSERT: the same
    columns read back, and the chain over both verifies."""
    tenant_id, name, _secret = new_tenant(pg_app)
    db = pg_app.extensions["medmaas.db"]

    def entry(i: int) -> audit.Entry:
        return audit.Entry(
            tenant_id=tenant_id, actor=audit.Actor("key", "api", 7, "mk_ab"), action="job.read", object_type="job",
            object_id=str(i), details={"q": {"z": [1, 2.5, None]}, "name": "Ünïcode ✓ \x00 'quoted'", "i": i},
            client_addr=None if i % 2 else "10.0.0.1", request_id=f"r-{i}", status=200,
        )

    batch = [audit.unsealed_row(entry(i)) for i in range(audit.COPY_MIN_ROWS)]
    single = [dict(row) for row in batch[:2]]  # the same rows, stamps included
    with db.session() as s:
        audit.append_rows(s, batch)  # COPY
        audit.append_rows(s, single)  # INSERT
    columns = [c for c in AuditEvent.__table__.columns if c.name not in ("id", "seq", "prev_hash", "hash")]
    with db.session() as s:
        stored = [tuple(r) for r in s.execute(select(*columns).where(AuditEvent.tenant_id == tenant_id)
                                              .order_by(AuditEvent.id))]
    assert len(stored) == len(batch) + len(single)
    assert stored[:2] == stored[-2:]  # rows 0 and 1 by COPY, then by INSERT: equal column for column
    assert stored[0][columns.index(AuditEvent.__table__.c.details)]["name"] == "Ünïcode ✓ \ufffd 'quoted'"
    audit.seal(db.engine, tenant_id)
    with db.session() as s:
        assert audit.verify(s, name)[0].intact
