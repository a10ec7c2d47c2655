"""server-side web sessions (filled in by the sessions work)

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 01:10:00.000000
"""
from alembic import op
import sqlalchemy as sa

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
