"""Errors raised by sqlalchemy-replicas.

Every error subclasses SQLAlchemy's own hierarchy, so code that already
catches ``sqlalchemy.exc.SQLAlchemyError`` keeps working::

    sqlalchemy.exc.SQLAlchemyError
    ├── sqlalchemy.exc.ArgumentError
    │   └── ConfigurationError      bad router/session/topology arguments
    │       └── MissingDependency   a driver or greenlet is not installed
    └── sqlalchemy.exc.InvalidRequestError
        └── ReplicasError           everything else raised at run time
            ├── PrimaryUnavailable  no primary to write to
            └── TopologyError       a local test topology failed
                └── ServerBinaryNotFound

Configuration errors are raised where the bad value is given (for example by
``ReplicaRouter(...)`` itself), never later on the first query.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import exc as sa_exc

__all__ = [
    "ConfigurationError",
    "MissingDependency",
    "PrimaryUnavailable",
    "ReplicasError",
    "ServerBinaryNotFound",
    "TopologyError",
    "describe_error",
]


class ConfigurationError(sa_exc.ArgumentError):
    """A router, session or topology was given an invalid argument.

    The message names the argument, the value and the fix.
    """


class MissingDependency(ConfigurationError):
    """What was asked for needs a Python package that is not installed: a
    database driver (psycopg, PyMySQL, aiomysql) or, for asyncio, greenlet.

    Raised at once where the need shows (``ReplicaRouter(...)``, a test
    topology's ``start()``, the demo), never later on a first query. The
    message names the missing module and the ``pip install`` that brings it.

    :ivar module: the module that could not be imported, e.g. ``"psycopg"``.
    :ivar extra: the sqlalchemy-replicas extra that installs it, e.g.
        ``"postgresql"``, or None when no extra does.
    """

    def __init__(self, message: str, *, module: str = "", extra: str | None = None) -> None:
        super().__init__(message)
        self.module = module
        self.extra = extra

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only state survives pickling (multiprocessing, task queues).
        return (type(self), (str(self),), {"module": self.module, "extra": self.extra})


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


def describe_error(error: BaseException) -> str:
    """One line naming ``error`` for a log or a status report: the driver's
    exception (``error.orig``), not SQLAlchemy's wrapper, its text on one
    line and cut at 200 characters. It may still name a server or a user:
    scrub it before showing it outside (the status CLI does)."""
    orig = getattr(error, "orig", None) or error
    text = " ".join(str(orig).split())
    return f"{type(orig).__name__}: {text[:200]}"
