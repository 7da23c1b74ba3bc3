"""usage by job size: the rollup keeps the size (CPUs) class of each job

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

KEY = ['day', 'system_id', 'service_id', 'project_id', 'account_id', 'user_id', 'partition']


def upgrade() -> None:
    op.add_column('usage_daily', sa.Column('job_size', sa.String(length=16), server_default='', nullable=False))
    op.drop_index('uq_usage_daily_key', table_name='usage_daily')
    op.create_index('uq_usage_daily_key', 'usage_daily', [*KEY, 'job_size'], unique=True,
                    postgresql_nulls_not_distinct=True)


def downgrade() -> None:
    op.drop_index('uq_usage_daily_key', table_name='usage_daily')
    op.drop_column('usage_daily', 'job_size')
    op.create_index('uq_usage_daily_key', 'usage_daily', KEY, unique=True, postgresql_nulls_not_distinct=True)
