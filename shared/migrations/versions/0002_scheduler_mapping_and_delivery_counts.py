"""scheduler mapping and delivery counts

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('task_deliveries',
    sa.Column('task_id', sa.String(length=64), nullable=False),
    sa.Column('deliveries', sa.Integer(), server_default='1', nullable=False),
    sa.Column('first_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('task_id', name=op.f('pk_task_deliveries'))
    )
    op.create_table('aliases',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('system_id', sa.Integer(), nullable=True),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('target_id', sa.Integer(), nullable=False),
    sa.CheckConstraint("(kind = 'system') = (system_id IS NULL)", name=op.f('ck_aliases_system_scope')),
    sa.CheckConstraint("kind IN ('system', 'user', 'account')", name=op.f('ck_aliases_kind')),
    sa.ForeignKeyConstraint(['system_id'], ['systems.id'], name=op.f('fk_aliases_system_id_systems')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_aliases'))
    )
    op.create_index('uq_aliases_kind_system_alias', 'aliases', ['kind', 'system_id', 'alias'], unique=True, postgresql_nulls_not_distinct=True)
    op.create_table('charge_multipliers',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('system_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('multiplier', sa.Numeric(precision=12, scale=6), nullable=False),
    sa.CheckConstraint("kind IN ('partition', 'qos')", name=op.f('ck_charge_multipliers_kind')),
    sa.CheckConstraint('multiplier >= 0', name=op.f('ck_charge_multipliers_multiplier_not_negative')),
    sa.ForeignKeyConstraint(['system_id'], ['systems.id'], name=op.f('fk_charge_multipliers_system_id_systems')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_charge_multipliers')),
    sa.UniqueConstraint('system_id', 'kind', 'name', name='uq_charge_multipliers_system_kind_name')
    )
    op.create_table('resource_services',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('system_id', sa.Integer(), nullable=False),
    sa.Column('resource', sa.String(length=16), nullable=False),
    sa.Column('service_id', sa.Integer(), nullable=False),
    sa.CheckConstraint("resource IN ('cpu', 'gpu', 'node')", name=op.f('ck_resource_services_resource')),
    sa.ForeignKeyConstraint(['service_id'], ['services.id'], name=op.f('fk_resource_services_service_id_services')),
    sa.ForeignKeyConstraint(['system_id'], ['systems.id'], name=op.f('fk_resource_services_system_id_systems')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_resource_services')),
    sa.UniqueConstraint('system_id', 'resource', name='uq_resource_services_system_resource')
    )
    op.add_column('jobs', sa.Column('charge_policy', sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'charge_policy')
    op.drop_table('resource_services')
    op.drop_table('charge_multipliers')
    op.drop_index('uq_aliases_kind_system_alias', table_name='aliases', postgresql_nulls_not_distinct=True)
    op.drop_table('aliases')
    op.drop_table('task_deliveries')
