"""usage rolled up per day, system, service, project, account, user and partition

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('usage_daily',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('system_id', sa.Integer(), nullable=False),
    sa.Column('service_id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('partition', sa.String(length=64), server_default='', nullable=False),
    sa.Column('jobs', sa.Integer(), nullable=False),
    sa.Column('quantity', sa.Numeric(precision=24, scale=6), nullable=False),
    sa.Column('charged', sa.Numeric(precision=24, scale=6), nullable=False),
    sa.Column('refunded', sa.Numeric(precision=24, scale=6), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_usage_daily'))
    )
    op.create_index('uq_usage_daily_key', 'usage_daily',
                    ['day', 'system_id', 'service_id', 'project_id', 'account_id', 'user_id', 'partition'],
                    unique=True, postgresql_nulls_not_distinct=True)


def downgrade() -> None:
    op.drop_index('uq_usage_daily_key', table_name='usage_daily')
    op.drop_table('usage_daily')
