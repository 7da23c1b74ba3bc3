"""``openacct hook NAME``: scheduler hooks that spool job events. Standard library only.

``openacct.entry`` runs them without importing the CLI (typer, pydantic, SQLAlchemy would cost
more start-up time than the whole hook). Slurm runs hooks without arguments, so point it at a
two-line wrapper script, e.g. for ``JobCompLoc=/usr/local/sbin/openacct-jobcomp``::

    #!/bin/sh
    exec /opt/openacct/bin/openacct hook slurm-jobcomp

slurm-jobcomp     JobCompType=jobcomp/script: job.completed, with Slurm's own times and state.
slurm-prologctld  PrologSlurmctld: job.started, at the hook's clock.
slurm-epilogctld  EpilogSlurmctld: job.completed, from the prolog's start to the hook's clock.
"""

from __future__ import annotations

import os
import sys

# Annotations only: collections.abc costs a hook run the import of collections.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

HOOKS = ("slurm-jobcomp", "slurm-prologctld", "slurm-epilogctld")
USAGE = f"usage: openacct hook {{{'|'.join(HOOKS)}}}"


def main(argv: Sequence[str]) -> int:
    if list(argv) in (["-h"], ["--help"]):
        print(f"{USAGE}\n\n{__doc__}")
        return 0
    if len(argv) != 1 or argv[0] not in HOOKS:
        # A wrong hook name is a deployment mistake, not input: say so loudly, at once.
        print(USAGE, file=sys.stderr)
        return 2
    from shared.slurm.hook import run

    return run(argv[0], os.environb)
