"""Errors raised by sqlalchemy-replicas.

Every error subclasses SQLAlchemy's own hierarchy, so code that already
catches ``sqlalchemy.exc.SQLAlchemyError`` keeps working::

    sqlalchemy.exc.SQLAlchemyError
    ├── sqlalchemy.exc.ArgumentError
    │   └── ConfigurationError      bad router/session/topology arguments
    └── sqlalchemy.exc.InvalidRequestError
        └── ReplicasError           everything else raised at run time
            ├── PrimaryUnavailable  no primary to write to
            └── TopologyError       a local test topology failed
                └── ServerBinaryNotFound

Configuration errors are raised where the bad value is given (for example by
``ReplicaRouter(...)`` itself), never later on the first query.
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc

__all__ = [
    "ConfigurationError",
    "PrimaryUnavailable",
    "ReplicasError",
    "ServerBinaryNotFound",
    "TopologyError",
]


class ConfigurationError(sa_exc.ArgumentError):
    """A router, session or topology was given an invalid argument.

    The message names the argument, the value and the fix.
    """


class ReplicasError(sa_exc.InvalidRequestError):
    """Base class of run-time errors raised by sqlalchemy-replicas."""


class PrimaryUnavailable(ReplicasError):
    """No primary could be connected to: the configured primary (and every
    ``primary_candidates`` URL) is down or read-only.

    Raised where a primary connection is needed: writes, ``strong`` reads,
    and reads with no replica to go to. The message lists each candidate
    and what was wrong with it; ``__cause__`` is the last driver error.
    """


class TopologyError(ReplicasError):
    """A local test topology (:mod:`sqlalchemy_replicas.testing`) failed.

    The message carries the tail of the failing server's log.
    """


class ServerBinaryNotFound(TopologyError):
    """The database server binaries needed for a test topology are missing.

    The message lists where they were looked for and how to install them.
    """
