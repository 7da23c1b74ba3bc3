"""Errors a user can cause and fix. The CLI prints each as one line; none is a bug."""


class OpenAcctError(Exception):
    """Base of every error that is the caller's to fix (bad input, unknown name, no funds)."""


class NotFound(OpenAcctError):
    pass


class AlreadyExists(OpenAcctError):
    pass


class InvalidInput(OpenAcctError):
    pass


class IdempotencyConflict(OpenAcctError):
    """The same idempotency key came back with a different request."""


class InsufficientFunds(OpenAcctError):
    pass


class ConfigError(OpenAcctError):
    pass


class AlreadyRefunded(InvalidInput):
    """A re-pricing of a charge that was refunded: its refunds were measured against its price."""


class LocalInstanceError(OpenAcctError):
    """The local instance's embedded PostgreSQL or Redis cannot be started or reached."""
