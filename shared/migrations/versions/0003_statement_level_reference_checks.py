"""reference checks on the hot tables per statement, not per row

A row-level foreign key looks up, and share-locks, the referenced row for every row written.
The charger writes thousands of jobs, transactions and entries per batch, all pointing at the
same few accounts, users and services: those checks were a third of the database's time, and
the share locks of two workers on one account row turned into multixacts. These tables now check
their references once per statement, against the statement's transition table.

The lock a foreign key takes only guards against the referenced row being deleted meanwhile.
Systems, users, accounts, services, allocations and jobs are never deleted (they are deactivated;
no role may delete them), and a trigger on each now refuses it outright, so no lock is needed.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# table -> (column, referenced table) pairs whose row-level foreign keys become statement checks
CHECKED = {
    "jobs": [("system_id", "systems"), ("user_id", "users"), ("account_id", "accounts")],
    "ledger_transactions": [("account_id", "accounts"), ("counterparty_account_id", "accounts"),
                            ("service_id", "services"), ("job_id", "jobs"), ("user_id", "users")],
    "ledger_entries": [("transaction_id", "ledger_transactions"), ("account_id", "accounts"),
                       ("allocation_id", "allocations")],
}
NEVER_DELETED = ("systems", "users", "accounts", "services", "allocations", "jobs")

CHECK_REFERENCES = """
CREATE FUNCTION openacct_check_references() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    i integer := 0;
    missing text;
BEGIN
    -- TG_ARGV holds (column, referenced table) pairs; new_rows is the statement's transition table.
    WHILE i < TG_NARGS LOOP
        EXECUTE format(
            'SELECT n.%1$I::text FROM new_rows n WHERE n.%1$I IS NOT NULL '
            'AND NOT EXISTS (SELECT FROM %2$I r WHERE r.id = n.%1$I) LIMIT 1',
            TG_ARGV[i], TG_ARGV[i + 1]) INTO missing;
        IF missing IS NOT NULL THEN
            RAISE EXCEPTION USING ERRCODE = 'foreign_key_violation',
                MESSAGE = format('%s.%s = %s refers to no row of %s',
                                 TG_TABLE_NAME, TG_ARGV[i], missing, TG_ARGV[i + 1]);
        END IF;
        i := i + 2;
    END LOOP;
    RETURN NULL;
END $$
"""

REFUSE_DELETE = """
CREATE FUNCTION openacct_never_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'restrict_violation',
        MESSAGE = format('rows of %s are never deleted: the ledger refers to them (deactivate instead)',
                         TG_TABLE_NAME);
END $$
"""


def _fk_name(table: str, column: str, referenced: str) -> str:
    return f"fk_{table}_{column}_{referenced}"


def upgrade() -> None:
    op.execute(CHECK_REFERENCES)
    op.execute(REFUSE_DELETE)
    for table, references in CHECKED.items():
        for column, referenced in references:
            op.drop_constraint(_fk_name(table, column, referenced), table, type_="foreignkey")
        arguments = ", ".join(f"'{name}'" for pair in references for name in pair)
        # Transition tables allow one event per trigger; jobs are also updated (upserts).
        for event in ("INSERT", "UPDATE") if table == "jobs" else ("INSERT",):
            op.execute(
                f"CREATE TRIGGER {table}_references_{event.lower()} AFTER {event} ON {table} "
                "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
                f"EXECUTE FUNCTION openacct_check_references({arguments})"
            )
    for table in NEVER_DELETED:
        op.execute(f"CREATE TRIGGER {table}_never_deleted BEFORE DELETE ON {table} "
                   "FOR EACH STATEMENT EXECUTE FUNCTION openacct_never_deleted()")


def downgrade() -> None:
    for table in NEVER_DELETED:
        op.execute(f"DROP TRIGGER {table}_never_deleted ON {table}")
    for table, references in CHECKED.items():
        for event in ("INSERT", "UPDATE") if table == "jobs" else ("INSERT",):
            op.execute(f"DROP TRIGGER {table}_references_{event.lower()} ON {table}")
        for column, referenced in references:
            op.create_foreign_key(_fk_name(table, column, referenced), table, referenced, [column], ["id"])
    op.execute("DROP FUNCTION openacct_never_deleted()")
    op.execute("DROP FUNCTION openacct_check_references()")
