"""request sha256: jobs remember what an idempotent submit asked for

Adds the nullable column `jobs.request_sha256`: the sha256 of the submitted request (kind,
spec, priority, max_attempts; app.jobs.request_digest) of a job submitted with an
Idempotency-Key. Reusing the key with a different request is then refused (422
idempotency_key_reused) instead of silently answering with the old job. Existing rows keep
NULL, which means "not recorded": a key of such a job still returns it, as before.

Adding a nullable column without a server default needs no table rebuild, also on SQLite
(batch mode emits a plain ALTER TABLE ADD COLUMN), so no foreign-key care is needed. The
downgrade drops the column with ALTER TABLE DROP COLUMN (SQLite 3.35 or newer), again
without rebuilding `jobs` (a rebuild would cascade into job_events; see 0004).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 12:00:00.000000
"""
from alembic import op
import sqlalchemy as sa

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('request_sha256', sa.String(length=64), nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite that would copy the table; DROP COLUMN alters it in place.
    op.drop_column('jobs', 'request_sha256')
