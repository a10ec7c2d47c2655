"""tags on jobs and model versions, model cards, and the job a job was cloned from

Adds `jobs.tags` and `model_versions.tags` (JSON lists of short labels, NOT NULL, server
default '[]', so every existing row has none), `model_versions.card` (JSON: what the user
wrote about the version, intended use, out-of-scope use, limitations, and the software
versions the worker recorded at training time; server default '{}'), and `jobs.cloned_from`
(the job a "run again with changes" copied its spec from; no foreign key: that job may be
erased later). Only columns are added, with plain ALTER TABLE (no rebuild, also on SQLite).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 08:40:00.000000
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    # Plain ALTER TABLE, never batch mode: on SQLite a batch add of a NOT NULL column copies the
    # table, and dropping the old `jobs` cascades into job_events (see 0004, 0005).
    op.add_column("jobs", sa.Column("tags", _json(), server_default=sa.text("'[]'"), nullable=False))
    op.add_column("jobs", sa.Column("cloned_from", sa.Integer(), nullable=True))
    op.add_column("model_versions", sa.Column("tags", _json(), server_default=sa.text("'[]'"), nullable=False))
    op.add_column("model_versions", sa.Column("card", _json(), server_default=sa.text("'{}'"), nullable=False))


def downgrade() -> None:
    # ALTER TABLE DROP COLUMN (SQLite 3.35 or newer), in place for the same reason.
    op.drop_column("model_versions", "card")
    op.drop_column("model_versions", "tags")
    op.drop_column("jobs", "cloned_from")
    op.drop_column("jobs", "tags")
