"""audit trail: hash-chained audit_events (filled in by the audit work)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 01:10:00.000000
"""
from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
