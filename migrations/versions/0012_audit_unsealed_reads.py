"""audit trail: reads are appended unsealed and chained later

A read's audit row is now written with one INSERT and no lock on the tenant's head; the
sealer (the maintenance tick, `verify`, `export`, and a bounded seal inline once a process
has appended many) gives those rows their seq, prev_hash and hash in id order. Until then
the three columns are NULL, so they become nullable, and a partial index finds the rows
still to seal. On SQLite the column change rebuilds the table (batch mode).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 05:10:00.000000
"""
import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

UNSEALED = sa.text('seq IS NULL')


def upgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.alter_column('seq', existing_type=sa.BigInteger(), nullable=True)
        batch_op.alter_column('prev_hash', existing_type=sa.String(length=64), nullable=True)
        batch_op.alter_column('hash', existing_type=sa.String(length=64), nullable=True)
        batch_op.create_index('ix_audit_events_unsealed', ['tenant_id', 'id'], unique=False,
                              postgresql_where=UNSEALED, sqlite_where=UNSEALED)


def downgrade() -> None:
    # Rows still unsealed cannot satisfy NOT NULL: seal them first (`medmaas audit verify` does).
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_unsealed')
        batch_op.alter_column('hash', existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column('prev_hash', existing_type=sa.String(length=64), nullable=False)
        batch_op.alter_column('seq', existing_type=sa.BigInteger(), nullable=False)
