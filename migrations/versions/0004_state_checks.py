"""state checks: the database refuses invalid job / shard states, progress and counters

Adds CHECK constraints to `jobs` and `score_shards` (the same ones app/models.py declares).
Existing rows are checked first: if any would violate a constraint the upgrade stops with a
message naming the table, the constraint and the number of bad rows, and changes nothing.

On SQLite, batch mode rebuilds both tables (copy, drop, rename). SQLite's DROP TABLE with
PRAGMA foreign_keys=ON first deletes every row, which would fire ON DELETE CASCADE / SET NULL
in job_events, score_shards and model_versions, so foreign-key enforcement is switched off
for the rebuild (see _sqlite_foreign_keys_off) and the result is verified with
PRAGMA foreign_key_check.

The allowed states come from the Python enums (app.models.in_enum_sql). A later migration
that adds a state must drop and re-create ck_jobs_state / ck_score_shards_state.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 12:00:00.000000
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from app.models import JobState, ShardState, in_enum_sql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

# table -> [(full constraint name, CHECK condition)]; names follow app.db's naming convention
# ("ck_%(table_name)s_%(constraint_name)s") applied to the short names in app/models.py.
CHECKS = {
    'jobs': [
        ('ck_jobs_state', in_enum_sql('state', JobState)),
        ('ck_jobs_progress', 'progress >= 0 AND progress <= 1'),
        ('ck_jobs_attempts', 'attempts >= 0'),
        ('ck_jobs_max_attempts', 'max_attempts >= 1'),
    ],
    'score_shards': [
        ('ck_score_shards_state', in_enum_sql('state', ShardState)),
        ('ck_score_shards_attempts', 'attempts >= 0'),
        ('ck_score_shards_rows', 'stop_row >= start_row'),
    ],
}


class InvalidRowsError(RuntimeError):
    """Existing rows violate a constraint this migration adds; nothing was changed."""


def _check_existing_rows(bind: Connection) -> None:
    problems = []
    for table, checks in CHECKS.items():
        for name, condition in checks:
            # NOT (NULL) is not true, matching CHECK's "passes unless false" rule.
            bad = bind.execute(sa.text(f'SELECT count(*) FROM {table} WHERE NOT ({condition})')).scalar_one()
            if bad:
                problems.append(f'table {table}: {bad} row(s) violate {name} ({condition}); '
                                f'see SELECT * FROM {table} WHERE NOT ({condition})')
    if problems:
        raise InvalidRowsError('cannot add CHECK constraints, existing rows are invalid (nothing was changed; '
                               'fix or delete these rows, then upgrade again):\n  ' + '\n  '.join(problems))


def _sqlite_foreign_keys_off(bind: Connection) -> None:
    """Turn off FK enforcement on this SQLite connection before batch mode drops and re-creates
    tables that others reference (else the DROP cascades into their rows). The pragma is a
    no-op inside a transaction; alembic runs each SQLite revision in its own transaction and
    pysqlite only opens one at the first write, so nothing is open yet unless a caller passed
    in a connection mid-transaction, which is refused. Enforcement stays off for the rest of
    this migration connection, later revisions of the same run included (app.migrate opens and
    disposes its own; every new connection of app.db.make_engine turns it on again)."""
    if not bind.exec_driver_sql('PRAGMA foreign_keys').scalar():
        return
    if not bind.connection.driver_connection.in_transaction:
        bind.exec_driver_sql('PRAGMA foreign_keys=OFF')
    if bind.exec_driver_sql('PRAGMA foreign_keys').scalar():
        raise RuntimeError('cannot turn off SQLite foreign keys inside an open transaction, and rebuilding '
                           'jobs with them on would cascade-delete job_events and score_shards; '
                           'run this migration on a connection without an open transaction')


def _sqlite_verify_foreign_keys(bind: Connection) -> None:
    dangling = bind.exec_driver_sql('PRAGMA foreign_key_check').fetchall()
    if dangling:
        raise RuntimeError(f'foreign keys broken after rebuilding tables: {dangling[:10]}')


def upgrade() -> None:
    bind = op.get_bind()
    _check_existing_rows(bind)
    sqlite = bind.dialect.name == 'sqlite'
    if sqlite:
        _sqlite_foreign_keys_off(bind)
    for table, checks in CHECKS.items():
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name, condition in checks:
                batch_op.create_check_constraint(op.f(name), condition)
    if sqlite:
        _sqlite_verify_foreign_keys(bind)


def downgrade() -> None:
    bind = op.get_bind()
    sqlite = bind.dialect.name == 'sqlite'
    if sqlite:
        _sqlite_foreign_keys_off(bind)
    for table, checks in reversed(list(CHECKS.items())):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for name, _condition in reversed(checks):
                batch_op.drop_constraint(op.f(name), type_='check')
    if sqlite:
        _sqlite_verify_foreign_keys(bind)
