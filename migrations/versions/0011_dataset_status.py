"""datasets parsed by a worker: a dataset's status (filled in by the ingest work)

Adds `datasets.status` (NOT NULL, server default 'ready', so every existing dataset is
ready), `datasets.error` (one sentence when the ingest job failed) and `datasets.job_id`
(the ingest job that parses a large upload; no foreign key, the job may be erased later).
Only columns are added: on SQLite this is ALTER TABLE ADD COLUMN, no table rebuild.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 01:40:00.000000
"""
from alembic import op
import sqlalchemy as sa

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('status', sa.Enum('ready', 'processing', 'failed', name='dataset_status',
                                                        native_enum=False, length=16),
                                      server_default='ready', nullable=False))
        batch_op.add_column(sa.Column('error', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('job_id', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('job_id')
        batch_op.drop_column('error')
        batch_op.drop_column('status')
