"""initial schema: center model, append-only ledger, inbox and dead letters

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

LEDGER_TABLES = ("ledger_transactions", "ledger_entries")

# History is never rewritten: a correction is a new row (refund, release, adjustment).
APPEND_ONLY = """
CREATE FUNCTION openacct_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger table % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$
"""


def upgrade() -> None:
    op.create_table('parked_events',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('event_id', sa.String(length=200), nullable=True),
    sa.Column('kind', sa.String(length=64), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('payload', sa.LargeBinary(), nullable=False),
    sa.Column('source', sa.Text(), server_default='', nullable=False),
    sa.Column('parked_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('replayed_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_parked_events'))
    )
    op.create_index(op.f('ix_parked_events_event_id'), 'parked_events', ['event_id'], unique=False)
    op.create_table('systems',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_systems')),
    sa.UniqueConstraint('name', name=op.f('uq_systems_name'))
    )
    op.create_table('users',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('full_name', sa.Text(), server_default='', nullable=False),
    sa.Column('email', sa.Text(), server_default='', nullable=False),
    sa.Column('active', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('name', name=op.f('uq_users_name'))
    )
    op.create_table('projects',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('pi_id', sa.Integer(), nullable=False),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.Column('active', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('parent_id <> id', name=op.f('ck_projects_not_own_parent')),
    sa.ForeignKeyConstraint(['parent_id'], ['projects.id'], name=op.f('fk_projects_parent_id_projects')),
    sa.ForeignKeyConstraint(['pi_id'], ['users.id'], name=op.f('fk_projects_pi_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_projects')),
    sa.UniqueConstraint('name', name=op.f('uq_projects_name'))
    )
    op.create_table('services',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('system_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('units', sa.String(length=64), nullable=False),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['system_id'], ['systems.id'], name=op.f('fk_services_system_id_systems')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_services')),
    sa.UniqueConstraint('system_id', 'name', name='uq_services_system_name')
    )
    op.create_table('accounts',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('is_default', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('active', sa.Boolean(), server_default=sa.text('true'), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_accounts_project_id_projects')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_accounts')),
    sa.UniqueConstraint('name', name=op.f('uq_accounts_name'))
    )
    op.create_index(op.f('ix_accounts_project_id'), 'accounts', ['project_id'], unique=False)
    op.create_index('uq_accounts_default_per_project', 'accounts', ['project_id'], unique=True, postgresql_where=sa.text('is_default'))
    op.create_table('membership_events',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('actor', sa.Text(), server_default='', nullable=False),
    sa.CheckConstraint("kind IN ('added', 'removed', 'pi_changed')", name=op.f('ck_membership_events_kind')),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_membership_events_project_id_projects')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_membership_events_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_membership_events'))
    )
    op.create_index(op.f('ix_membership_events_project_id'), 'membership_events', ['project_id'], unique=False)
    op.create_table('project_members',
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('added_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_project_members_project_id_projects')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_project_members_user_id_users')),
    sa.PrimaryKeyConstraint('project_id', 'user_id', name=op.f('pk_project_members'))
    )
    op.create_table('service_rates',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('service_id', sa.Integer(), nullable=False),
    sa.Column('rate', sa.Numeric(precision=24, scale=10), nullable=False),
    sa.Column('effective_from', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('rate >= 0', name=op.f('ck_service_rates_rate_not_negative')),
    sa.ForeignKeyConstraint(['service_id'], ['services.id'], name=op.f('fk_service_rates_service_id_services')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_service_rates')),
    sa.UniqueConstraint('service_id', 'effective_from', name='uq_service_rates_service_from')
    )
    op.create_table('allocations',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('amount', sa.Numeric(precision=24, scale=6), nullable=False),
    sa.Column('credit_limit', sa.Numeric(precision=24, scale=6), server_default='0', nullable=False),
    sa.Column('starts_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ends_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('amount >= 0', name=op.f('ck_allocations_amount_not_negative')),
    sa.CheckConstraint('credit_limit >= 0', name=op.f('ck_allocations_credit_limit_not_negative')),
    sa.CheckConstraint('ends_at IS NULL OR ends_at > starts_at', name=op.f('ck_allocations_ends_after_start')),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_allocations_account_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_allocations'))
    )
    op.create_index(op.f('ix_allocations_account_id'), 'allocations', ['account_id'], unique=False)
    op.create_table('jobs',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('system_id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('array_job_id', sa.String(length=64), nullable=True),
    sa.Column('array_task_id', sa.Integer(), nullable=True),
    sa.Column('het_offset', sa.Integer(), nullable=True),
    sa.Column('submit_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('start_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('end_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('account_id', sa.Integer(), nullable=True),
    sa.Column('partition', sa.String(length=64), nullable=True),
    sa.Column('qos', sa.String(length=64), nullable=True),
    sa.Column('state', sa.String(length=32), nullable=True),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.Column('node_count', sa.Integer(), nullable=True),
    sa.Column('node_list', sa.Text(), nullable=True),
    sa.Column('cpus', sa.Integer(), nullable=True),
    sa.Column('gpus', sa.Integer(), nullable=True),
    sa.Column('memory_mb', sa.BigInteger(), nullable=True),
    sa.Column('time_limit_minutes', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('end_time IS NULL OR start_time IS NULL OR end_time >= start_time', name=op.f('ck_jobs_ends_after_start')),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_jobs_account_id_accounts')),
    sa.ForeignKeyConstraint(['system_id'], ['systems.id'], name=op.f('fk_jobs_system_id_systems')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_jobs_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_index(op.f('ix_jobs_account_id'), 'jobs', ['account_id'], unique=False)
    op.create_index('uq_jobs_natural_key', 'jobs', ['system_id', 'job_id', 'array_task_id', 'het_offset', 'submit_time'], unique=True, postgresql_nulls_not_distinct=True)
    op.create_table('service_grants',
    sa.Column('id', sa.Integer(), sa.Identity(always=False), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('service_id', sa.Integer(), nullable=False),
    sa.Column('granted_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_service_grants_account_id_accounts')),
    sa.ForeignKeyConstraint(['service_id'], ['services.id'], name=op.f('fk_service_grants_service_id_services')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_service_grants'))
    )
    op.create_index('uq_service_grants_open', 'service_grants', ['account_id', 'service_id'], unique=True, postgresql_where=sa.text('revoked_at IS NULL'))
    op.create_table('account_balances',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('allocation_id', sa.Integer(), nullable=True),
    sa.Column('allocated', sa.Numeric(precision=24, scale=6), server_default='0', nullable=False),
    sa.Column('charged', sa.Numeric(precision=24, scale=6), server_default='0', nullable=False),
    sa.Column('refunded', sa.Numeric(precision=24, scale=6), server_default='0', nullable=False),
    sa.Column('held', sa.Numeric(precision=24, scale=6), server_default='0', nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_account_balances_account_id_accounts')),
    sa.ForeignKeyConstraint(['allocation_id'], ['allocations.id'], name=op.f('fk_account_balances_allocation_id_allocations')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_account_balances'))
    )
    op.create_index('uq_account_balances_account_allocation', 'account_balances', ['account_id', 'allocation_id'], unique=True, postgresql_nulls_not_distinct=True)
    op.create_table('ledger_transactions',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=False),
    sa.Column('request_hash', sa.String(length=64), nullable=False),
    sa.Column('amount', sa.Numeric(precision=24, scale=6), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('counterparty_account_id', sa.Integer(), nullable=True),
    sa.Column('service_id', sa.Integer(), nullable=True),
    sa.Column('job_id', sa.BigInteger(), nullable=True),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('quantity', sa.Numeric(precision=24, scale=6), nullable=True),
    sa.Column('rate', sa.Numeric(precision=24, scale=10), nullable=True),
    sa.Column('refers_to_id', sa.BigInteger(), nullable=True),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.Column('details', postgresql.JSONB(astext_type=sa.Text()), server_default='{}', nullable=False),
    sa.Column('actor', sa.Text(), server_default='', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('effective_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("kind IN ('deposit', 'charge', 'refund', 'hold', 'release', 'transfer', 'adjustment')", name=op.f('ck_ledger_transactions_kind')),
    sa.CheckConstraint('amount >= 0', name=op.f('ck_ledger_transactions_amount_not_negative')),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_ledger_transactions_account_id_accounts')),
    sa.ForeignKeyConstraint(['counterparty_account_id'], ['accounts.id'], name=op.f('fk_ledger_transactions_counterparty_account_id_accounts')),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_ledger_transactions_job_id_jobs')),
    sa.ForeignKeyConstraint(['refers_to_id'], ['ledger_transactions.id'], name=op.f('fk_ledger_transactions_refers_to_id_ledger_transactions')),
    sa.ForeignKeyConstraint(['service_id'], ['services.id'], name=op.f('fk_ledger_transactions_service_id_services')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_ledger_transactions_user_id_users')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_transactions')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_ledger_transactions_idempotency_key'))
    )
    op.create_index('ix_ledger_transactions_account_effective', 'ledger_transactions', ['account_id', 'effective_at'], unique=False)
    op.create_index(op.f('ix_ledger_transactions_job_id'), 'ledger_transactions', ['job_id'], unique=False)
    op.create_index(op.f('ix_ledger_transactions_refers_to_id'), 'ledger_transactions', ['refers_to_id'], unique=False)
    op.create_table('ledger_entries',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('transaction_id', sa.BigInteger(), nullable=False),
    sa.Column('account_id', sa.Integer(), nullable=False),
    sa.Column('allocation_id', sa.Integer(), nullable=True),
    sa.Column('bucket', sa.String(length=16), nullable=False),
    sa.Column('amount', sa.Numeric(precision=24, scale=6), nullable=False),
    sa.Column('effective_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("bucket IN ('allocated', 'charged', 'refunded', 'held')", name=op.f('ck_ledger_entries_bucket')),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_ledger_entries_account_id_accounts')),
    sa.ForeignKeyConstraint(['allocation_id'], ['allocations.id'], name=op.f('fk_ledger_entries_allocation_id_allocations')),
    sa.ForeignKeyConstraint(['transaction_id'], ['ledger_transactions.id'], name=op.f('fk_ledger_entries_transaction_id_ledger_transactions')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_entries'))
    )
    op.create_index('ix_ledger_entries_account_bucket', 'ledger_entries', ['account_id', 'allocation_id', 'bucket'], unique=False)
    op.create_index(op.f('ix_ledger_entries_transaction_id'), 'ledger_entries', ['transaction_id'], unique=False)
    op.create_table('processed_events',
    sa.Column('event_id', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=64), nullable=False),
    sa.Column('processed_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('transaction_id', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['transaction_id'], ['ledger_transactions.id'], name=op.f('fk_processed_events_transaction_id_ledger_transactions')),
    sa.PrimaryKeyConstraint('event_id', name=op.f('pk_processed_events'))
    )

    op.execute(APPEND_ONLY)
    for table in LEDGER_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION openacct_append_only()"
        )


def downgrade() -> None:
    for table in LEDGER_TABLES:
        op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
    op.execute("DROP FUNCTION openacct_append_only()")
    op.drop_table('processed_events')
    op.drop_index(op.f('ix_ledger_entries_transaction_id'), table_name='ledger_entries')
    op.drop_index('ix_ledger_entries_account_bucket', table_name='ledger_entries')
    op.drop_table('ledger_entries')
    op.drop_index(op.f('ix_ledger_transactions_refers_to_id'), table_name='ledger_transactions')
    op.drop_index(op.f('ix_ledger_transactions_job_id'), table_name='ledger_transactions')
    op.drop_index('ix_ledger_transactions_account_effective', table_name='ledger_transactions')
    op.drop_table('ledger_transactions')
    op.drop_index('uq_account_balances_account_allocation', table_name='account_balances', postgresql_nulls_not_distinct=True)
    op.drop_table('account_balances')
    op.drop_index('uq_service_grants_open', table_name='service_grants', postgresql_where=sa.text('revoked_at IS NULL'))
    op.drop_table('service_grants')
    op.drop_index('uq_jobs_natural_key', table_name='jobs', postgresql_nulls_not_distinct=True)
    op.drop_index(op.f('ix_jobs_account_id'), table_name='jobs')
    op.drop_table('jobs')
    op.drop_index(op.f('ix_allocations_account_id'), table_name='allocations')
    op.drop_table('allocations')
    op.drop_table('service_rates')
    op.drop_table('project_members')
    op.drop_index(op.f('ix_membership_events_project_id'), table_name='membership_events')
    op.drop_table('membership_events')
    op.drop_index('uq_accounts_default_per_project', table_name='accounts', postgresql_where=sa.text('is_default'))
    op.drop_index(op.f('ix_accounts_project_id'), table_name='accounts')
    op.drop_table('accounts')
    op.drop_table('services')
    op.drop_table('projects')
    op.drop_table('users')
    op.drop_table('systems')
    op.drop_index(op.f('ix_parked_events_event_id'), table_name='parked_events')
    op.drop_table('parked_events')
