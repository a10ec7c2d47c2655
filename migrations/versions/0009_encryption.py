"""encryption at rest: per-tenant wrapped data keys (filled in by the encryption work)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 01:10:00.000000
"""
from alembic import op
import sqlalchemy as sa

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
