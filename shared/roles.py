"""Least-privilege database roles: each process may do what its job needs and nothing more.

``openacct db roles`` creates them (NOLOGIN group roles: a site grants them to its login users)
and grants their privileges on the current schema. No role but the owner that runs migrations
may UPDATE or DELETE a ledger row; the append-only trigger stands behind that as well.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

LEDGER = ("ledger_transactions", "ledger_entries")
CENTER = ("systems", "services", "service_rates", "users", "projects", "project_members",
          "membership_events", "accounts", "service_grants", "allocations", "aliases",
          "resource_services", "charge_multipliers")

# role -> [(privileges, tables)]
ROLES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    # Everything is readable: reports, statements, balances.
    "openacct_reader": [("SELECT", CENTER + LEDGER + ("account_balances", "jobs", "processed_events",
                                                      "parked_events", "task_deliveries", "alerts_sent",
                                                      "usage_daily", "open_holds"))],
    # The workers (charger, refunder, reporter) and the admission service write jobs, the inbox, dead letters, ledger rows
    # and alerts; they lock accounts (FOR NO KEY UPDATE needs UPDATE on the table) but change
    # no center data.
    "openacct_charger": [
        ("SELECT", CENTER + LEDGER + ("account_balances", "jobs", "processed_events", "parked_events",
                                      "task_deliveries", "alerts_sent")),
        ("INSERT", LEDGER + ("jobs", "processed_events", "parked_events", "task_deliveries", "account_balances",
                             "alerts_sent")),
        ("UPDATE", ("jobs", "account_balances", "task_deliveries", "accounts", "alerts_sent")),
        # the usage rollup replaces a day's rows whole
        ("SELECT, INSERT, DELETE", ("usage_daily",)),
        # holds still open, kept by the ledger beside the journal (admission runs as this role)
        ("SELECT, INSERT, UPDATE, DELETE", ("open_holds",)),
    ],
    # Administrators model the center and move money by hand; still no UPDATE or DELETE on the
    # ledger itself.
    "openacct_admin": [
        ("SELECT", CENTER + LEDGER + ("account_balances", "jobs", "processed_events", "parked_events",
                                      "task_deliveries", "alerts_sent", "usage_daily")),
        ("INSERT, UPDATE", CENTER + ("jobs", "processed_events", "parked_events", "account_balances",
                                     "task_deliveries")),
        ("DELETE", ("project_members",)),
        ("INSERT", LEDGER),
        ("SELECT, INSERT, UPDATE, DELETE", ("open_holds",)),
    ],
}


def statements() -> list[str]:
    sql = []
    for role, grants in ROLES.items():
        sql.append(f"DO $$ BEGIN CREATE ROLE {role} NOLOGIN; "
                   "EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        sql.append(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}")
        sql.append(f"GRANT USAGE ON SCHEMA public TO {role}")
        for privileges, tables in grants:
            sql.append(f"GRANT {privileges} ON {', '.join(tables)} TO {role}")
    return sql


def apply(connection: Connection) -> None:
    for statement in statements():
        connection.execute(text(statement))
