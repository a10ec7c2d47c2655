"""encryption at rest: per-tenant wrapped data keys

Creates `tenant_data_keys`: one random 256-bit data key per tenant, stored wrapped
(AES-GCM) by the master key MEDMAAS_ENCRYPTION_KEY, whose fingerprint is `master_key_id`.
`medmaas encryption rotate-master` re-wraps every row and sets `rewrapped_at`. A new
table: nothing existing is rebuilt.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 01:10:00.000000
"""
from alembic import op
import sqlalchemy as sa

from app.models import UTCDateTime

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('tenant_data_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('tenant_id', sa.Integer(), nullable=False),
    sa.Column('master_key_id', sa.String(length=32), nullable=False),
    sa.Column('wrapped_key', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', UTCDateTime(timezone=True), nullable=False),
    sa.Column('rewrapped_at', UTCDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_tenant_data_keys_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenant_data_keys')),
    sa.UniqueConstraint('tenant_id', name=op.f('uq_tenant_data_keys_tenant_id'))
    )


def downgrade() -> None:
    op.drop_table('tenant_data_keys')
