"""Least-privilege database roles: each process may do what its job needs and nothing more.

``openacct db roles`` (run by a superuser) creates NOLOGIN group roles, which a site grants to
login roles of its own, one per process:

- ``openacct_owner`` owns every table and the ledger's functions. Nobody logs in as it; the
  login that runs ``openacct db upgrade`` is made a member, and migrations run under it.
- ``openacct_reader`` reads everything (the relay, reports).
- ``openacct_charger`` runs the workers (charger, refunder, reporter): it writes jobs, the inbox,
  dead letters, ledger rows and reports' bookkeeping. It changes no running balance (the database
  adds them up from the entries, migration 0011), no account setting and no center data, and it
  may not give money: a ledger entry of its own never touches what an allocation was given.
- ``openacct_admission`` is the admission service's, on the scheduler's host: what the charger
  may, but its ledger entries only hold money and release it, so that host cannot refund.
- ``openacct_admin`` models the center and moves money by hand, through ledger rows too.
- ``openacct_api`` is ``openacct api serve``'s: it reads everything and writes membership, the
  managers a PI names and the API's tokens (that a token was used), and no ledger row: nothing
  the API offers moves money.

No role may UPDATE, DELETE or TRUNCATE a ledger row, and the owner may not either, short of
dropping the triggers that refuse it (migrations 0001 and 0011). The database takes a
transaction's entries whole, on its own account, adding up to its amount (migration 0011).

The grants are made anew by every ``openacct db upgrade`` once the roles are in place, so a table
a migration adds gets its privileges without anyone remembering to.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import Connection, text

OWNER = "openacct_owner"
LEDGER = ("ledger_transactions", "ledger_entries")
CENTER = ("systems", "services", "service_rates", "users", "projects", "project_members",
          "membership_events", "accounts", "service_grants", "allocations", "aliases",
          "resource_services", "charge_multipliers",
          "member_limits")  # what a PI caps a member's spending at (read by admission control)
# Who may reach the API and manage a project's membership besides its PI.
ACCESS = ("api_tokens", "project_managers")
RECORDS = ("account_balances", "jobs", "processed_events", "parked_events", "task_deliveries", "alerts_sent",
           "usage_daily", "usage_rollups", "open_holds", "statements_issued", "ledger_misshapen",
           "alembic_version")  # read by `openacct health`: is the schema at head?
WORKER: list[tuple[str, tuple[str, ...]]] = [
    ("SELECT", CENTER + LEDGER + RECORDS),
    ("INSERT", LEDGER + ("jobs", "processed_events", "parked_events", "task_deliveries", "alerts_sent",
                         "statements_issued")),
    ("UPDATE", ("jobs", "task_deliveries", "alerts_sent")),
    # the usage rollup replaces a day's rows whole, and notes when it did
    ("INSERT, DELETE", ("usage_daily",)),
    ("INSERT, UPDATE", ("usage_rollups",)),
    # holds still open, kept by the ledger beside the journal
    ("INSERT, UPDATE, DELETE", ("open_holds",)),
]

# role -> [(privileges, tables)]
ROLES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "openacct_reader": [("SELECT", CENTER + LEDGER + RECORDS + ACCESS)],
    "openacct_charger": WORKER,
    "openacct_admission": WORKER,
    "openacct_admin": [
        ("SELECT", CENTER + LEDGER + RECORDS + ACCESS),
        ("INSERT, UPDATE", CENTER + ACCESS + ("jobs", "processed_events", "parked_events", "task_deliveries",
                                              "alerts_sent")),
        ("DELETE", ("project_members", "project_managers", "member_limits")),
        ("INSERT", LEDGER + ("statements_issued",)),
        # reports run by hand: the usage rollup, holds expired
        ("INSERT, DELETE", ("usage_daily",)),
        ("INSERT, UPDATE", ("usage_rollups",)),
        ("INSERT, UPDATE, DELETE", ("open_holds",)),
    ],
    "openacct_api": [
        ("SELECT", CENTER + LEDGER + RECORDS + ACCESS),
        ("INSERT, DELETE", ("project_members", "project_managers")),
        ("INSERT", ("membership_events",)),
        ("UPDATE (last_used_at)", ("api_tokens",)),  # never its hash, scope, expiry or revocation
        ("INSERT, UPDATE, DELETE", ("member_limits",)),  # a PI caps a member's spending
    ],
}
# The ledger's functions that a role calls itself (trigger functions are called by the triggers).
FUNCTIONS = {"openacct_lock_accounts(integer[])": ("openacct_charger", "openacct_admission", "openacct_admin")}
# Who may write which ledger entries (row-level security; the owner is not subject to it).
ENTRY_POLICIES = {
    "openacct_charger": "bucket <> 'allocated'",  # charges, refunds and holds: never money given
    "openacct_admission": "bucket = 'held'",  # holds and their release only
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
        # Roles are the server's, not the database's: a login of another database on this server
        # may not connect to this one, nor make temporary tables in it.
        "DO $$ BEGIN EXECUTE format('REVOKE CONNECT, TEMPORARY ON DATABASE %I FROM PUBLIC', current_database()); "
        f"EXECUTE format('GRANT CONNECT ON DATABASE %I TO {', '.join((OWNER, *ROLES))}', current_database()); END $$",
        _OWN,
    ]


# Row-level security, set only where it is not already: ALTER TABLE and CREATE POLICY lock the
# ledger against every writer, which an upgrade with nothing to change must not do. A policy's
# name ends in a digest of what it says, so a changed rule is a new name: the old one is dropped.
_POLICY = """
DO $$ DECLARE
    old record;
BEGIN
    IF NOT EXISTS (SELECT FROM pg_policies WHERE schemaname = 'public' AND tablename = 'ledger_entries'
                   AND policyname = '{name}') THEN
        FOR old IN SELECT policyname FROM pg_policies WHERE schemaname = 'public' AND tablename = 'ledger_entries'
                    AND policyname LIKE '{prefix}%' LOOP
            EXECUTE format('DROP POLICY %I ON ledger_entries', old.policyname);
        END LOOP;
        CREATE POLICY {name} ON ledger_entries {rule};
    END IF;
END $$
"""


def _policy(prefix: str, rule: str) -> str:
    name = f"{prefix}_{hashlib.sha256(rule.encode()).hexdigest()[:8]}"
    return _POLICY.format(name=name, prefix=prefix.replace("_", "\\_"), rule=rule)


def grant_statements(tables: set[str] | None = None) -> list[str]:
    """Privileges, function rights and the ledger's row policies: the owner's work, idempotent.
    ``tables``: those that exist (an older revision has fewer); None, all."""
    sql = ["REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA public FROM PUBLIC"]
    for role, grants in ROLES.items():
        sql.append(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}")
        sql.append(f"GRANT USAGE ON SCHEMA public TO {role}")
        for privileges, named in grants:
            present = [t for t in named if tables is None or t in tables]
            if present:
                sql.append(f"GRANT {privileges} ON {', '.join(present)} TO {role}")
    for function, callers in FUNCTIONS.items():  # once its migration has made it
        sql.append(f"DO $$ BEGIN IF to_regprocedure('{function}') IS NOT NULL THEN "
                   f"GRANT EXECUTE ON FUNCTION {function} TO {', '.join(callers)}; END IF; END $$")
    sql.append("DO $$ BEGIN IF NOT (SELECT relrowsecurity FROM pg_class WHERE oid = 'public.ledger_entries'::regclass) "
               "THEN ALTER TABLE ledger_entries ENABLE ROW LEVEL SECURITY; END IF; END $$")
    sql.append(_policy("openacct_read", "FOR SELECT USING (true)"))
    for role, check in ENTRY_POLICIES.items():
        sql.append(_policy(f"{role}_writes", f"FOR INSERT TO {role} WITH CHECK ({check})"))
    return sql


def statements(*, create: bool = True, tables: set[str] | None = None) -> list[str]:
    return (create_statements() if create else []) + grant_statements(tables)


def apply(connection: Connection, *, create: bool = True) -> None:
    """``openacct db roles``; with ``create=False``, what every upgrade does after migrating."""
    tables = set(connection.scalars(text(
        "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v')")))
    for statement in statements(create=create, tables=tables):
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
