"""Least-privilege database roles: each process may do what its job needs and nothing more.

``openacct db roles`` (run by a superuser, or a login with CREATEROLE that owns the tables)
creates NOLOGIN group roles, which a site grants to its login users:

- ``openacct_owner`` owns every table and the ledger's functions. Nobody logs in as it; the
  login that runs ``openacct db upgrade`` is made a member, and migrations run under it.
- ``openacct_reader`` reads everything.
- ``openacct_charger`` runs the workers, the relay and admission: it writes jobs, the inbox, dead
  letters, ledger rows and reports' bookkeeping. It changes no running balance (the database adds
  them up from the entries, migration 0011), no account setting and no center data, and it may not
  give money: a ledger entry of its own never touches what an allocation was given.
- ``openacct_admin`` models the center and moves money by hand, through ledger rows too.

No role may UPDATE, DELETE or TRUNCATE a ledger row; the owner could, were it not for the
triggers that refuse it (migrations 0001 and 0011).

The grants are made anew by every ``openacct db upgrade`` once the roles are in place, so a table a
migration adds gets its privileges without anyone remembering to.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

OWNER = "openacct_owner"
LEDGER = ("ledger_transactions", "ledger_entries")
CENTER = ("systems", "services", "service_rates", "users", "projects", "project_members",
          "membership_events", "accounts", "service_grants", "allocations", "aliases",
          "resource_services", "charge_multipliers")
RECORDS = ("account_balances", "jobs", "processed_events", "parked_events", "task_deliveries", "alerts_sent",
           "usage_daily", "open_holds", "statements_issued")

# role -> [(privileges, tables)]
ROLES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "openacct_reader": [("SELECT", CENTER + LEDGER + RECORDS)],
    "openacct_charger": [
        ("SELECT", CENTER + LEDGER + RECORDS),
        ("INSERT", LEDGER + ("jobs", "processed_events", "parked_events", "task_deliveries", "alerts_sent",
                             "statements_issued")),
        ("UPDATE", ("jobs", "task_deliveries", "alerts_sent")),
        # the usage rollup replaces a day's rows whole
        ("INSERT, DELETE", ("usage_daily",)),
        # holds still open, kept by the ledger beside the journal (admission runs as this role)
        ("INSERT, UPDATE, DELETE", ("open_holds",)),
    ],
    "openacct_admin": [
        ("SELECT", CENTER + LEDGER + RECORDS),
        ("INSERT, UPDATE", CENTER + ("jobs", "processed_events", "parked_events", "task_deliveries")),
        ("DELETE", ("project_members",)),
        ("INSERT", LEDGER),
        ("INSERT, UPDATE, DELETE", ("open_holds",)),
    ],
}
# The ledger's functions that a role calls itself (trigger functions are called by the triggers).
FUNCTIONS = {"openacct_lock_accounts(integer[])": ("openacct_charger", "openacct_admin")}
# Who may write which ledger entries (row-level security; the owner is not subject to it).
ENTRY_POLICIES = {
    "openacct_charger": "bucket <> 'allocated'",  # charges, refunds and holds: never money given
    "openacct_admin": "true",
}

_MISSING_ROLE = ("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') "
                 "THEN CREATE ROLE {role} NOLOGIN; END IF; END $$")
# Everything in the schema, and the ledger's functions, to the owner (a no-op where it is already).
_OWN = f"""
DO $$
DECLARE
    object record;
BEGIN
    FOR object IN
        SELECT format('ALTER %s %s OWNER TO {OWNER}',
                      CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' ELSE 'TABLE' END,
                      c.oid::regclass) AS statement
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'S')
           AND pg_get_userbyid(c.relowner) <> '{OWNER}'
           AND NOT (c.relkind = 'S' AND EXISTS (SELECT FROM pg_depend d WHERE d.objid = c.oid
                                                AND d.deptype IN ('a', 'i')))
        UNION ALL
        SELECT format('ALTER FUNCTION %s OWNER TO {OWNER}', p.oid::regprocedure)
          FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
         WHERE n.nspname = 'public' AND p.proname LIKE 'openacct\\_%' AND pg_get_userbyid(p.proowner) <> '{OWNER}'
    LOOP
        EXECUTE object.statement;
    END LOOP;
END $$
"""


def create_statements() -> list[str]:
    """The roles, and the schema and its objects handed to the owner: a superuser's work."""
    return [
        *(_MISSING_ROLE.format(role=role) for role in (OWNER, *ROLES)),
        f"GRANT USAGE, CREATE ON SCHEMA public TO {OWNER}",
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
        _OWN,
    ]


def grant_statements() -> list[str]:
    """Privileges, function rights and the ledger's row policies: the owner's work, idempotent."""
    sql = []
    for role, grants in ROLES.items():
        sql.append(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}")
        sql.append(f"GRANT USAGE ON SCHEMA public TO {role}")
        for privileges, tables in grants:
            sql.append(f"GRANT {privileges} ON {', '.join(tables)} TO {role}")
    for function, callers in FUNCTIONS.items():  # once its migration has made it
        sql.append(f"DO $$ BEGIN IF to_regprocedure('{function}') IS NOT NULL THEN "
                   f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC; "
                   f"GRANT EXECUTE ON FUNCTION {function} TO {', '.join(callers)}; END IF; END $$")
    sql.append("ALTER TABLE ledger_entries ENABLE ROW LEVEL SECURITY")
    sql.append("DROP POLICY IF EXISTS openacct_read ON ledger_entries")
    sql.append("CREATE POLICY openacct_read ON ledger_entries FOR SELECT USING (true)")
    for role, check in ENTRY_POLICIES.items():
        sql.append(f"DROP POLICY IF EXISTS {role}_writes ON ledger_entries")
        sql.append(f"CREATE POLICY {role}_writes ON ledger_entries FOR INSERT TO {role} WITH CHECK ({check})")
    return sql


def statements(*, create: bool = True) -> list[str]:
    return (create_statements() if create else []) + grant_statements()


def apply(connection: Connection, *, create: bool = True) -> None:
    """``openacct db roles``; with ``create=False``, what every upgrade does after migrating."""
    for statement in statements(create=create):
        connection.execute(text(statement))


def in_place(connection: Connection) -> bool:
    """Whether ``openacct db roles`` has run on this database: the owner owns its tables."""
    return bool(connection.scalar(text(
        "SELECT pg_get_userbyid(relowner) = :owner FROM pg_class WHERE oid = to_regclass('public.alembic_version')"
    ), {"owner": OWNER}))


def migrate_as_owner(connection: Connection) -> bool:
    """Run what follows on this transaction as the owner, where the roles are in place (so that
    what a migration creates is the owner's): whether it does."""
    if not in_place(connection):
        return False
    connection.execute(text(f"SET LOCAL ROLE {OWNER}"))
    return True
