"""OpenAcct's common library: configuration, schema, ledger and the embedded dev servers.

Every process (CLI, hooks' relay, charger, refunder, reporter) builds on this package; the ledger
module in it is the only code that writes ledger rows.
"""
