"""a transaction's entries are on its own account, and come with it

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07

Two ways a login allowed to write ledger rows could still move money past the shape rule of
migrations 0011 and 0017 (found by review, each older than 0017):

- **An entry could sit on the counterparty of any kind.** The rule let every transaction's
  entries go on its account or its counterparty's, where only a transfer has a counterparty: a
  charge of account A naming B as counterparty, its entry on B, passed the trigger and
  ``ledger verify``. Now only a transfer's entries may be on its counterparty.
- **A transaction without entries took them later.** A charge of nothing has no entries (the
  ledger draws none), so the whole-check, which counts earlier entries, saw none, and a later
  statement could add entries that sum to nothing: money moved between the account's allocations.
  A transaction's entries are now taken only in the database transaction that wrote it
  (``created_at``, which defaults to ``now()``, is that transaction's start), as the ledger
  always writes them.

The view keeps 0017's text but for the one clause of ``own``; the trigger's query is 0017's
with the new clause and the time check.
"""

from alembic import op

from shared.migrate import earlier_revision

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


R0017 = earlier_revision("0017_shapes_checked_whole_and_null_safe.py")
OWN_0017 = "bool_and(coalesce(e.account_id = t.account_id OR e.account_id = t.counterparty_account_id, false)) AS own"
OWN = ("bool_and(coalesce(e.account_id = t.account_id\n"
       "                             OR (t.kind = 'transfer' AND e.account_id = t.counterparty_account_id), false)) AS own")
assert OWN_0017 in R0017.SHAPE, "0017's shape is not the one this revision changes"
SHAPE = R0017.SHAPE.replace(OWN_0017, OWN)
MISSHAPEN = R0017.MISSHAPEN.replace(R0017.SHAPE, SHAPE)
assert MISSHAPEN != R0017.MISSHAPEN
EARLIER = "'entries were added to it after it was written'"

# 0017's query, with the new shape, and an entry refused unless its transaction was written in
# this very database transaction (IS DISTINCT FROM: a NULL time is not this one either).
SHAPED = f"""SELECT s.transaction_id,
                       CASE WHEN NOT s.has_row THEN {R0017.NO_TRANSACTION}
                            WHEN s.earlier THEN {EARLIER} ELSE p.problem END AS problem
                  FROM (SELECT e.transaction_id, t.id IS NOT NULL AS has_row,
                               t.created_at IS DISTINCT FROM now() AS earlier, {SHAPE}
                          FROM added e LEFT JOIN public.ledger_transactions t ON t.id = e.transaction_id
                         GROUP BY e.transaction_id, t.id) s
                 CROSS JOIN LATERAL (SELECT CASE WHEN s.has_row THEN {R0017.PROBLEM} END AS problem) p
                 WHERE NOT s.has_row OR s.earlier OR p.problem IS NOT NULL
                 LIMIT 1"""
assert R0017.SHAPED in R0017.WHOLE
WHOLE = R0017.WHOLE.replace(R0017.SHAPED, SHAPED)


def upgrade() -> None:
    op.execute(MISSHAPEN)
    op.execute(WHOLE)


def downgrade() -> None:
    op.execute(R0017.WHOLE)
    op.execute(R0017.MISSHAPEN)
