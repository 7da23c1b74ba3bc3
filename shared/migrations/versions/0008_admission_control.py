"""admission control: policies per system and account, and the holds still open

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

POLICIES = "admission_policy IN ('reject', 'allow', 'notify')"


def upgrade() -> None:
    for table in ('systems', 'accounts'):
        op.add_column(table, sa.Column('admission_policy', sa.String(length=16), nullable=True))
        op.create_check_constraint(op.f(f'ck_{table}_admission_policy'), table, POLICIES)
    op.create_table('open_holds',
    sa.Column('hold_id', sa.BigInteger(), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.BigInteger(), nullable=True),
    sa.Column('remaining', sa.Numeric(precision=24, scale=6), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint('remaining > 0', name=op.f('ck_open_holds_remaining_positive')),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_open_holds_account_id_accounts')),
    sa.ForeignKeyConstraint(['hold_id'], ['ledger_transactions.id'], name=op.f('fk_open_holds_hold_id_ledger_transactions')),
    sa.PrimaryKeyConstraint('hold_id', name=op.f('pk_open_holds'))
    )
    op.create_index('ix_open_holds_account_expires', 'open_holds', ['account_id', 'expires_at'])
    op.create_index('ix_open_holds_expires', 'open_holds', ['expires_at'])
    op.create_index(op.f('ix_open_holds_job_id'), 'open_holds', ['job_id'])
    # Holds written before this revision are still open if releases have not used them up.
    op.execute("""
        INSERT INTO open_holds (hold_id, account_id, job_id, remaining)
        SELECT h.id, h.account_id, h.job_id, h.amount - COALESCE(SUM(r.amount), 0)
        FROM ledger_transactions h
        LEFT JOIN ledger_transactions r ON r.refers_to_id = h.id AND r.kind = 'release'
        WHERE h.kind = 'hold'
        GROUP BY h.id
        HAVING h.amount - COALESCE(SUM(r.amount), 0) > 0
    """)


def downgrade() -> None:
    op.drop_table('open_holds')
    for table in ('accounts', 'systems'):
        op.drop_constraint(op.f(f'ck_{table}_admission_policy'), table, type_='check')
        op.drop_column(table, 'admission_policy')
