"""Rating: what a use of a service costs, written once for every path that prices.

- ``price``: quantities, rates, multipliers and the one function that multiplies them;
- ``directory``: a scheduler's names (cluster, user, account) mapped to OpenAcct's;
- ``jobs``: a job event made into the job's row and its charges (the charger's and reconcile's);
- ``quote``: what a job may cost at most, and whether its account can pay (admission, ``quote``).

The charger, quotes, admission, re-rating, refunds and reconcile all price through here; the
ledger writes what they priced. This package imports nothing at its top so that the ledger can
import ``shared.rating.price`` while ``shared.rating.quote`` imports the ledger.
"""
