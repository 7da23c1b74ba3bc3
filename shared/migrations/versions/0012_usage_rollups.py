"""usage rollups: when each day was last rolled up, so that a report adds up from the ledger the
days the rollup has not settled (today, days never rolled up since they ended)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('usage_rollups',
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('rolled_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('day', name=op.f('pk_usage_rollups'))
    )


def downgrade() -> None:
    op.drop_table('usage_rollups')
