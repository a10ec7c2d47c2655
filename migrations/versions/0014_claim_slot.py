"""medmaas_claim_slot(): a worker's claim of a job under its tenant's running-jobs limit, in
one statement on PostgreSQL

A claim under the limit used to take a row lock on the tenant (SELECT ... FOR UPDATE) in a
statement of its own, so that the count in the claim's UPDATE, a later statement, saw every
claim committed while it waited: four round trips (BEGIN, lock, claim, COMMIT). This function,
called in the claim's WHERE, takes a transaction-level advisory lock per tenant and then
counts the tenant's running jobs on the queue. Being VOLATILE, its count runs on a snapshot
taken after the lock was granted (PostgreSQL, "Function Volatility Categories"), so it sees
the claims committed meanwhile, and the claim is one statement run in autocommit. SQLite
serialises writers and keeps the plain count (app/jobs.py). PostgreSQL only.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03 08:45:00.000000
"""

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# The first key of the advisory lock (the second is the tenant id): no other code of the
# project takes advisory locks; the constant keeps these apart from any other application's.
CLAIM_LOCK_CLASS = 7302


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"""
        CREATE OR REPLACE FUNCTION medmaas_claim_slot(p_tenant integer, p_queue varchar, p_limit integer)
        RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock({CLAIM_LOCK_CLASS}, p_tenant);
            RETURN (
                SELECT count(*) FROM jobs WHERE tenant_id = p_tenant AND queue = p_queue AND state = 'running'
            ) < p_limit;
        END
        $$
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION IF EXISTS medmaas_claim_slot(integer, varchar, integer)")
