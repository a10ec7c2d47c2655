"""Migration 0004 (CHECK constraints on job / shard states) against databases that already hold
data, on SQLite (a temp file) and PostgreSQL (a throwaway database per test): rows, foreign keys
and indexes survive, invalid states are then refused, invalid existing rows stop the upgrade with
a clear message, and downgrade / upgrade again both work."""
from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import CheckConstraint, MetaData, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

import app.models  # noqa: F401  (registers the tables on Base.metadata)
from app.db import Base, make_engine
from app.migrate import alembic_config
from tests.conftest import throwaway_pg_database

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
TABLES = ("tenants", "jobs", "job_events", "score_shards", "model_versions")
REBUILT = ("jobs", "score_shards")  # the tables 0004 alters (SQLite copies them)
MODEL_CHECKS = {t: {c.name for c in Base.metadata.tables[t].constraints if isinstance(c, CheckConstraint)}
                for t in REBUILT}


@pytest.fixture
def pg_db_url() -> str:
    """A throwaway PostgreSQL database for one test (the session's pg_url is already at head)."""
    with throwaway_pg_database("medmaas_mig") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'medmaas.db'}"
    return request.getfixturevalue("pg_db_url")


def migrate(url: str, revision: str) -> None:
    """Upgrade, or downgrade when `revision` is below the database's current one."""
    current = version(url)
    if revision != "head" and current and revision < current:
        command.downgrade(alembic_config(url), revision)
    else:
        command.upgrade(alembic_config(url), revision)


def version(url: str) -> str:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return ""
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    finally:
        engine.dispose()


def reflect(engine: Engine) -> MetaData:
    """Tables as the database has them now: inserts through these need no app.models."""
    md = MetaData()
    md.reflect(engine)
    return md


def insert(conn, table, rows: list[dict[str, Any]]) -> None:
    for row in rows:  # one by one: the rows set different columns
        conn.execute(table.insert().values(**row))


def seed(url: str, with_shards: bool = True) -> dict[str, int]:
    """A tenant, jobs in every state with events, a model version made by a job, and shards."""
    engine = make_engine(url)
    md = reflect(engine)
    t = md.tables
    job_defaults = {"tenant_id": 1, "kind": "sleep", "spec": {"seconds": 1}, "queue": "cpu", "priority": 0,
                    "attempts": 0, "max_attempts": 3, "progress": 0.0, "message": "", "created_at": T0,
                    "cancel_requested": False, "event_seq": 0}
    jobs = [
        {"id": 1, "state": "queued"},
        {"id": 2, "state": "running", "attempts": 1, "progress": 0.5, "started_at": T0, "heartbeat_at": T0,
         "worker": "w1"},
        {"id": 3, "state": "succeeded", "attempts": 1, "progress": 1.0, "result": {"steps": 3}, "started_at": T0,
         "finished_at": T0 + timedelta(seconds=3), "duration_s": 3.0, "idempotency_key": "k-3"},
        {"id": 4, "state": "failed", "attempts": 3, "progress": 0.25, "error": "worker lost", "finished_at": T0},
        {"id": 5, "state": "cancelled", "cancel_requested": True, "finished_at": T0},
    ]
    with engine.begin() as conn:
        insert(conn, t["tenants"], [{"id": 1, "name": "acme", "created_at": T0}])
        insert(conn, t["jobs"], [{**job_defaults, **j} for j in jobs])
        events = []
        for j in jobs:
            for seq, to in enumerate(["queued", "running", j["state"]][: 1 if j["state"] == "queued" else 3], 1):
                events.append({"job_id": j["id"], "seq": seq, "ts": T0 + timedelta(seconds=seq), "type": "state",
                               "data": {"to": to}})
        insert(conn, t["job_events"], events)
        conn.execute(t["jobs"].update().where(t["jobs"].c.id == 2).values(event_seq=3))
        insert(conn, t["model_versions"], [{
            "id": 1, "tenant_id": 1, "name": "m", "version": 1, "arch": "mlp", "task": "regression",
            "input_kind": "smiles", "spec": {}, "dataset_id": None, "dataset_sha256": "", "metrics": {"rmse": 0.5},
            "artifact_uri": "file:///m/1", "job_id": 3, "created_at": T0}])
        if with_shards:
            insert(conn, t["score_shards"], [
                {"id": 1, "job_id": 2, "index": 0, "start_row": 0, "stop_row": 1000, "offset": 0, "state": "done",
                 "attempts": 1, "rows_done": 1000, "rows": 1000, "valid": 998, "output_uri": "file:///p/0",
                 "stats": {"n": 1000}},
                {"id": 2, "job_id": 2, "index": 1, "start_row": 1000, "stop_row": 1500, "offset": 4096,
                 "state": "running", "attempts": 1, "worker": "w1", "heartbeat_at": T0, "rows_done": 10, "stats": {}},
                {"id": 3, "job_id": 2, "index": 2, "start_row": 1500, "stop_row": 1500, "state": "pending",
                 "attempts": 0, "rows_done": 0, "stats": {}},
            ])
        if engine.dialect.name == "postgresql":  # the explicit ids above did not advance the sequences
            for name in md.tables:
                if "id" in md.tables[name].c:
                    conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), "
                                      f"(SELECT coalesce(max(id), 0) + 1 FROM {name}), false)"))
    engine.dispose()
    return {"jobs": len(jobs), "job_events": len(events), "score_shards": 3 if with_shards else 0}


def snapshot(url: str) -> dict[str, Any]:
    """Every row of the seeded tables, plus the schema objects that a table copy could lose."""
    engine = make_engine(url)
    md = reflect(engine)
    out: dict[str, Any] = {}
    with engine.connect() as conn:
        insp = inspect(conn)
        for name in TABLES:
            if name not in md.tables:
                continue
            table = md.tables[name]
            out[name] = [dict(r._mapping) for r in conn.execute(select(table).order_by(table.c.id))]
            out[f"{name}.fks"] = sorted((fk["name"], tuple(fk["constrained_columns"]), fk["referred_table"],
                                         tuple(fk["referred_columns"]), (fk.get("options") or {}).get("ondelete"))
                                        for fk in insp.get_foreign_keys(name))
            out[f"{name}.indexes"] = sorted((ix["name"], tuple(ix["column_names"]), bool(ix["unique"]))
                                            for ix in insp.get_indexes(name))
            out[f"{name}.uniques"] = sorted((uq["name"], tuple(uq["column_names"]))
                                            for uq in insp.get_unique_constraints(name))
            out[f"{name}.pk"] = insp.get_pk_constraint(name)["constrained_columns"]
    engine.dispose()
    return out


def check_names(url: str) -> dict[str, set[str]]:
    engine = make_engine(url)
    with engine.connect() as conn:
        insp = inspect(conn)
        names = {t: {c["name"] for c in insp.get_check_constraints(t)} for t in REBUILT}
    engine.dispose()
    return names


def assert_schema_objects_kept(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key, value in before.items():
        assert after[key] == value, key
    # the ones that matter most, spelled out
    assert ("fk_jobs_tenant_id_tenants", ("tenant_id",), "tenants", ("id",), "CASCADE") in after["jobs.fks"]
    assert ("fk_score_shards_job_id_jobs", ("job_id",), "jobs", ("id",), "CASCADE") in after["score_shards.fks"]
    assert ("fk_job_events_job_id_jobs", ("job_id",), "jobs", ("id",), "CASCADE") in after["job_events.fks"]
    assert {"ix_jobs_state_queue", "ix_jobs_tenant_created"} <= {ix[0] for ix in after["jobs.indexes"]}
    assert "ix_score_shards_state_heartbeat" in {ix[0] for ix in after["score_shards.indexes"]}
    assert ("uq_jobs_tenant_idempotency_key", ("tenant_id", "idempotency_key")) in after["jobs.uniques"]
    assert ("uq_score_shards_job_index", ("job_id", "index")) in after["score_shards.uniques"]


def assert_refused(engine: Engine, sql: str, constraint: str, **params: Any) -> None:
    with pytest.raises(IntegrityError) as exc, engine.begin() as conn:
        conn.execute(text(sql), params)
    assert constraint in str(exc.value)


NEW_JOB = ("INSERT INTO jobs (tenant_id, kind, spec, state, queue, priority, attempts, max_attempts, progress, "
           "message, created_at, cancel_requested, event_seq) VALUES (1, 'sleep', '{}', :state, 'cpu', 0, "
           ":attempts, :max_attempts, :progress, '', '2026-01-01 00:00:00+00', false, 0)")
NEW_SHARD = ('INSERT INTO score_shards (job_id, "index", start_row, stop_row, state, attempts, rows_done, stats) '
             "VALUES (2, :index, :start, :stop, :state, 0, 0, '{}')")


def assert_constraints_enforced(url: str) -> None:
    engine = make_engine(url)
    job = {"state": "queued", "attempts": 0, "max_attempts": 3, "progress": 0.0}
    assert_refused(engine, NEW_JOB, "ck_jobs_state", **{**job, "state": "bogus"})
    assert_refused(engine, NEW_JOB, "ck_jobs_progress", **{**job, "progress": 2.0})
    assert_refused(engine, NEW_JOB, "ck_jobs_progress", **{**job, "progress": -0.1})
    assert_refused(engine, NEW_JOB, "ck_jobs_attempts", **{**job, "attempts": -1})
    assert_refused(engine, NEW_JOB, "ck_jobs_max_attempts", **{**job, "max_attempts": 0})
    assert_refused(engine, "UPDATE jobs SET state = 'bogus' WHERE id = 1", "ck_jobs_state")
    assert_refused(engine, "UPDATE jobs SET progress = 2.0 WHERE id = 2", "ck_jobs_progress")
    assert_refused(engine, NEW_SHARD, "ck_score_shards_state", index=10, start=0, stop=1, state="bogus")
    assert_refused(engine, NEW_SHARD, "ck_score_shards_rows", index=11, start=5, stop=4, state="pending")
    assert_refused(engine, "UPDATE score_shards SET state = 'bogus' WHERE id = 1", "ck_score_shards_state")
    assert_refused(engine, "UPDATE score_shards SET attempts = -1 WHERE id = 1", "ck_score_shards_attempts")
    # foreign keys are still enforced on the copied tables
    with pytest.raises(IntegrityError), engine.begin() as conn:
        conn.execute(text("INSERT INTO job_events (job_id, seq, ts, type, data) "
                          "VALUES (999, 1, '2026-01-01 00:00:00+00', 'state', '{}')"))
    # valid values still go in, and nothing above left a trace
    with engine.begin() as conn:
        assert conn.execute(text("UPDATE jobs SET state = 'running', progress = 1.0, attempts = 1 WHERE id = 1")
                            ).rowcount == 1
        conn.execute(text(NEW_SHARD), {"index": 12, "start": 7, "stop": 7, "state": "cancelled"})
        assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == 5
        # ON DELETE CASCADE still reaches events and shards of a deleted job
        conn.execute(text("DELETE FROM jobs WHERE id = 2"))
        assert conn.execute(text("SELECT count(*) FROM job_events WHERE job_id = 2")).scalar_one() == 0
        assert conn.execute(text("SELECT count(*) FROM score_shards WHERE job_id = 2")).scalar_one() == 0
    engine.dispose()


def test_upgrade_keeps_data_and_refuses_invalid_states(url: str) -> None:
    migrate(url, "0003")
    counts = seed(url)
    before = snapshot(url)
    assert check_names(url) == {"jobs": set(), "score_shards": set()}

    migrate(url, "0004")

    assert version(url) == "0004"
    after = snapshot(url)
    assert len(after["jobs"]) == counts["jobs"]
    assert len(after["job_events"]) == counts["job_events"]
    assert len(after["score_shards"]) == counts["score_shards"]
    assert after["model_versions"][0]["job_id"] == 3  # not SET NULL by a table copy
    assert {j["id"]: j["state"] for j in after["jobs"]} == {1: "queued", 2: "running", 3: "succeeded", 4: "failed",
                                                            5: "cancelled"}
    assert after["jobs"][2]["result"] == {"steps": 3}
    assert after["score_shards"][0]["stats"] == {"n": 1000}
    assert_schema_objects_kept(before, after)
    # the migration and app/models.py declare the same constraints
    assert check_names(url) == MODEL_CHECKS == {
        "jobs": {"ck_jobs_state", "ck_jobs_progress", "ck_jobs_attempts", "ck_jobs_max_attempts"},
        "score_shards": {"ck_score_shards_state", "ck_score_shards_attempts", "ck_score_shards_rows"},
    }
    assert_constraints_enforced(url)

    kept = snapshot(url)
    migrate(url, "head")  # and the migrations after 0004 keep the rows too
    latest = snapshot(url)
    for table in ("jobs", "job_events", "score_shards", "model_versions"):
        assert len(latest[table]) == len(kept[table]), table
    assert latest["model_versions"][0]["job_id"] == 3


def test_downgrade_then_upgrade_again(url: str) -> None:
    migrate(url, "0003")
    seed(url)
    before = snapshot(url)
    migrate(url, "0004")

    migrate(url, "0003")
    assert version(url) == "0003"
    assert check_names(url) == {"jobs": set(), "score_shards": set()}
    assert_schema_objects_kept(before, snapshot(url))
    engine = make_engine(url)
    with engine.begin() as conn:  # no constraint any more
        conn.execute(text("UPDATE jobs SET state = 'bogus', progress = 2.0 WHERE id = 1"))
        conn.execute(text("UPDATE jobs SET state = 'queued', progress = 0.0 WHERE id = 1"))
    engine.dispose()

    migrate(url, "0004")
    assert version(url) == "0004"
    assert check_names(url) == MODEL_CHECKS
    assert_schema_objects_kept(before, snapshot(url))
    assert_constraints_enforced(url)


def test_upgrade_refuses_existing_invalid_rows_and_changes_nothing(url: str) -> None:
    migrate(url, "0003")
    seed(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET state = 'bogus' WHERE id IN (1, 4)"))
        conn.execute(text("UPDATE jobs SET progress = 1.5 WHERE id = 2"))
        conn.execute(text("UPDATE score_shards SET state = 'weird' WHERE id = 3"))
    engine.dispose()
    before = snapshot(url)

    with pytest.raises(RuntimeError) as exc:
        migrate(url, "0004")

    message = str(exc.value)
    assert "table jobs: 2 row(s) violate ck_jobs_state" in message
    assert "table jobs: 1 row(s) violate ck_jobs_progress" in message
    assert "table score_shards: 1 row(s) violate ck_score_shards_state" in message
    assert "ck_jobs_attempts" not in message
    assert version(url) == "0003"
    assert check_names(url) == {"jobs": set(), "score_shards": set()}
    assert snapshot(url) == before

    engine = make_engine(url)
    with engine.begin() as conn:  # fixed, the upgrade goes through
        conn.execute(text("UPDATE jobs SET state = 'failed' WHERE state = 'bogus'"))
        conn.execute(text("UPDATE jobs SET progress = 1.0 WHERE id = 2"))
        conn.execute(text("UPDATE score_shards SET state = 'pending' WHERE id = 3"))
    engine.dispose()
    migrate(url, "0004")
    assert version(url) == "0004"
    assert check_names(url) == MODEL_CHECKS


def test_upgrade_from_0002_in_one_run_keeps_events(url: str) -> None:
    """0003 and 0004 in one alembic run over existing rows. On SQLite a table copy with foreign
    keys on would cascade-delete job_events and null model_versions.job_id."""
    migrate(url, "0002")
    counts = seed(url, with_shards=False)
    before = snapshot(url)

    migrate(url, "0004")

    assert version(url) == "0004"
    after = snapshot(url)
    assert len(after["job_events"]) == counts["job_events"]
    assert after["model_versions"][0]["job_id"] == 3
    assert_schema_objects_kept(before, after)
    assert check_names(url) == MODEL_CHECKS


def test_sqlite_refuses_to_copy_tables_inside_an_open_transaction(tmp_path) -> None:
    """A caller's connection with a write in flight: SQLite cannot turn foreign keys off there,
    so 0004 stops instead of letting the table copy cascade into job_events."""
    url = f"sqlite:///{tmp_path / 'medmaas.db'}"
    migrate(url, "0003")
    counts = seed(url)
    engine = make_engine(url)
    cfg = alembic_config(url)
    with engine.connect() as conn:
        conn.execute(text("UPDATE jobs SET message = 'in flight' WHERE id = 1"))
        cfg.attributes["connection"] = conn
        with pytest.raises(RuntimeError, match="open transaction"):
            command.upgrade(cfg, "head")
        conn.rollback()
    engine.dispose()
    assert version(url) == "0003"
    assert len(snapshot(url)["job_events"]) == counts["job_events"]
