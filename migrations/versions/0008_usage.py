"""usage metering: one row per (tenant, UTC day, metric, model, version) with a quantity

Workers and the API add to `quantity` with INSERT ... ON CONFLICT DO UPDATE on the primary
key (app/stores/usage.py), so the primary key is the natural key and there is no surrogate id.
`model` '' and `version` 0 mean "not attributed to a model" (no NULLs in a primary key).
The allowed metrics come from app.models.UsageMetric (CHECK ck_usage_metric).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 01:10:00.000000
"""
from alembic import op
import sqlalchemy as sa

from app.models import UsageMetric, UTCDateTime, in_enum_sql

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'usage',
        sa.Column('tenant_id', sa.Integer(), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('metric', sa.Enum(*[m.value for m in UsageMetric], name='usage_metric', native_enum=False,
                                    length=16), nullable=False),
        sa.Column('model', sa.String(length=128), nullable=False),
        sa.Column('version', sa.Integer(), nullable=False),
        sa.Column('quantity', sa.Float(), nullable=False),
        sa.Column('updated_at', UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint(in_enum_sql('metric', UsageMetric), name=op.f('ck_usage_metric')),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_usage_tenant_id_tenants'),
                                ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('tenant_id', 'day', 'metric', 'model', 'version', name=op.f('pk_usage')),
    )


def downgrade() -> None:
    op.drop_table('usage')
