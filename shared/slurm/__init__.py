"""Slurm's side of OpenAcct, in one place: Slurm's records read into job events (``records``,
``values``; the hooks' side, standard library only), the start the ctld hooks carry from prolog
to epilog (``ctld_state``), sacct read (``sacct``) and reconciled with the ledger (``reconcile``),
and Slurm's associations kept in step (``sync``).

Nothing here is imported at this package's top: the hooks import ``records`` without
SQLAlchemy, pydantic or Celery.
"""
