"""How a run fails, as the user sees it. Each error is an ``AsteroidError`` and also the builtin
error the same failure raised before (callers that catch ``RuntimeError``, ``TimeoutError`` or
``ConnectionError`` keep working)."""

from __future__ import annotations

from asteroid_fx.ir.errors import AsteroidError


class RunFailed(AsteroidError, RuntimeError):
    """A worker failed, no worker finished, or a worker's program differs from the launcher's; the
    message names the device and shows its log's tail."""


class RunTimedOut(AsteroidError, TimeoutError):
    """Something the run waits for did not happen in time; the message says what, and where the logs are."""


class CoordinatorUnreachable(AsteroidError, ConnectionError):
    """A worker cannot reach the run's store within its timeout."""


class CannotListen(AsteroidError, OSError):
    """The run's store cannot listen on the address it was given (not this machine's, or taken)."""


class StoreValueRejected(AsteroidError, RuntimeError):
    """A value in the run's store is not signed with the run's secret, or does not have the shape its
    key promises; the message names the key and the writer it claims."""
