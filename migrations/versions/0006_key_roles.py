"""key roles: API keys get a role (admin, member, viewer) and an optional expiry

Adds `api_keys.role` (NOT NULL, server default 'admin', so every existing key becomes an
admin key and keeps doing what it did) with the CHECK ck_api_keys_role (allowed values from
app.models.KeyRole, as 0004 does for states), and the nullable `api_keys.expires_at`
(NULL: never expires).

On SQLite, adding a CHECK makes batch mode rebuild `api_keys` (copy, drop, rename). No table
references api_keys, so the DROP cascades into nothing and no foreign-key care is needed
(unlike 0004's rebuild of jobs). Existing rows are copied with role = 'admin'.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 23:30:00.000000
"""
from alembic import op
import sqlalchemy as sa

from app.models import KeyRole, UTCDateTime, in_enum_sql

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('role', sa.Enum('viewer', 'member', 'admin', name='key_role', native_enum=False,
                                                      length=16), server_default='admin', nullable=False))
        batch_op.add_column(sa.Column('expires_at', UTCDateTime(timezone=True), nullable=True))
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_check_constraint(op.f('ck_api_keys_role'), in_enum_sql('role', KeyRole))


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_constraint(op.f('ck_api_keys_role'), type_='check')
        batch_op.drop_column('expires_at')
        batch_op.drop_column('role')
