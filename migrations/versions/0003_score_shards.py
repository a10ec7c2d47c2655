"""score shards: row blocks of a `score` job, claimed by any worker on the job's queue

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 23:30:00.000000
"""
from alembic import op
import sqlalchemy as sa
import app.models
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('score_shards',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('start_row', sa.BigInteger(), nullable=False),
    sa.Column('stop_row', sa.BigInteger(), nullable=False),
    sa.Column('offset', sa.BigInteger(), nullable=True),
    sa.Column('state', sa.Enum('pending', 'running', 'done', 'failed', 'cancelled', name='shard_state', native_enum=False, length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=255), nullable=True),
    sa.Column('heartbeat_at', app.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('started_at', app.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('finished_at', app.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('published_at', app.models.UTCDateTime(timezone=True), nullable=True),
    sa.Column('rows_done', sa.BigInteger(), nullable=False),
    sa.Column('rows', sa.BigInteger(), nullable=True),
    sa.Column('valid', sa.BigInteger(), nullable=True),
    sa.Column('output_uri', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('stats', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_score_shards_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_score_shards')),
    sa.UniqueConstraint('job_id', 'index', name='uq_score_shards_job_index')
    )
    with op.batch_alter_table('score_shards', schema=None) as batch_op:
        batch_op.create_index('ix_score_shards_state_heartbeat', ['state', 'heartbeat_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('score_shards', schema=None) as batch_op:
        batch_op.drop_index('ix_score_shards_state_heartbeat')

    op.drop_table('score_shards')
