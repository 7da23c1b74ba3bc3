"""The ``openacct`` program. ``openacct hook ...`` runs on every job, so it imports the hooks alone
(standard library only); everything else gets the full CLI."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["hook"]:
        from openacct.hooks import main as hook

        sys.exit(hook(sys.argv[2:]))
    from openacct.cli import main as cli

    cli()
