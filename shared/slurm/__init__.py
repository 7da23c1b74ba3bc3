"""Slurm's side of OpenAcct, in one place, so that another scheduler's adapter can sit beside it:

- the hook side, standard library only (it runs beside slurmctld, and a hook must start in
  milliseconds): Slurm's records read into job events (``records``, ``values``), the hooks
  themselves (``hook``: jobcomp/script, PrologSlurmctld, EpilogSlurmctld), the prolog's admission
  check (``admission``), the start the ctld hooks carry from prolog to epilog (``ctld_state``),
  and the receiver of the jobcomp/elasticsearch plugin (``receiver``);
- the center side: sacct read (``sacct``) and reconciled with the ledger (``reconcile``),
  Slurm's associations kept in step (``sync``) and their limits set from what accounts can pay
  (``limits``).

Nothing here is imported at this package's top: the hooks import ``records`` without
SQLAlchemy, pydantic or Celery.
"""
