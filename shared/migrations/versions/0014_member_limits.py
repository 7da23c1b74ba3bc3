"""member limits: the most a member may spend in a project per calendar month or allocation

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('member_limits',
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('amount', sa.Numeric(precision=24, scale=6), nullable=False),
    sa.Column('period', sa.String(length=16), nullable=False),
    sa.Column('set_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('actor', sa.Text(), server_default='', nullable=False),
    sa.CheckConstraint('amount >= 0', name=op.f('ck_member_limits_amount_not_negative')),
    sa.CheckConstraint("period IN ('month', 'allocation')", name=op.f('ck_member_limits_period')),
    # A limit is the membership's: removing the member removes it.
    sa.ForeignKeyConstraint(['project_id', 'user_id'], ['project_members.project_id', 'project_members.user_id'],
                            name=op.f('fk_member_limits_project_id_project_members'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('project_id', 'user_id', name=op.f('pk_member_limits'))
    )


def downgrade() -> None:
    op.drop_table('member_limits')
