"""A commit's position in the commit's own round trip (I/O on the committing connection).

Read-your-writes needs the position of every commit made through the
router. Read after ``COMMIT`` returned, it costs a round trip of its own.
On psycopg 3 (PostgreSQL, sync and async engines), libpq's pipeline mode
sends ``COMMIT`` and the position query together, behind one Sync: the
server runs them in order, so the position is taken right after the commit
exactly as the two-step query would take it, and both answers come back in
one round trip. :func:`pipeline_commits` wraps the primary dialect's
``do_commit`` to do this; the after-commit path (:func:`capture_commit`)
then finds the position in the connection's info instead of asking.

Every commit of a primary connection is pipelined, written or not: the
commit cannot know whether the session wrote (SQLAlchemy's session decides
that after ``COMMIT``), and the position query adds no round trip. The
after-commit path keeps deciding whether the position counts, as before.

Where the driver cannot pipeline (psycopg2, asyncpg, pg8000, a libpq
without pipeline support, MariaDB and MySQL clients), nothing is wrapped
and the position is read after the commit, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy.engine import Engine

from ._listeners import Listeners
from .causal import CAPTURED_KEY
from .positions import PositionBackend, SQLRunner
from .positions.postgresql import PostgresPositions

__all__ = ["PIPELINED_KEY", "PipelinedCapture", "capture_commit", "pipeline_commits"]

#: Set in a primary connection's info by every commit of it: the outcome of
#: the position query pipelined with that ``COMMIT`` (absent when the commit
#: was not pipelined). Consumed by :func:`capture_commit`.
PIPELINED_KEY: Final = "sqlalchemy_replicas.pipelined_capture"


@dataclass(frozen=True, slots=True)
class PipelinedCapture:
    """What the position query pipelined with a ``COMMIT`` gave.

    :ivar acknowledged: ``time.monotonic()`` before the commit was sent:
        every commit the position does not cover came later.
    :ivar position: the commit's position, when the query succeeded.
    :ivar error: why the query failed (the commit itself succeeded).
    """

    acknowledged: float
    position: Any | None
    error: Exception | None


def capture_commit(backend: PositionBackend, primary: SQLRunner) -> tuple[float, Any | None]:
    """The position of the commit just made on ``primary`` (the committing
    connection), and the ``time.monotonic()`` before it was read: the one
    pipelined with the ``COMMIT`` if there is one (no I/O), else asked now.

    :raises Exception: the error of the position query, pipelined or not.
    """
    info = getattr(primary, "info", None)
    pipelined = None if info is None else info.pop(PIPELINED_KEY, None)
    if pipelined is None:
        acknowledged = time.monotonic()
        return acknowledged, backend.capture(primary)
    if pipelined.error is not None:
        raise pipelined.error
    return pipelined.acknowledged, pipelined.position


def pipeline_commits(engine: Engine, listeners: Listeners) -> bool:
    """Make every commit of ``engine`` (a router's primary, a sync engine or
    an async engine's ``sync_engine``) carry its position query when the
    driver can pipeline; ``listeners`` takes it back. Returns whether it does.

    Engines the application passed in are changed on their dialect instance
    (their own, one per engine); several routers on one engine share one wrapper.
    """
    dialect = engine.dialect
    if dialect.name != "postgresql" or dialect.driver not in ("psycopg", "psycopg_async"):
        return False
    import psycopg

    if not psycopg.Pipeline.is_supported():  # a libpq older than 14
        return False
    current = dialect.__dict__.get("do_commit")
    if isinstance(current, _PipelinedCommit):
        current.users += 1
        wrapper = current
    else:
        wrapper = _PipelinedCommit(dialect.do_commit, is_async=bool(dialect.is_async))
        dialect.do_commit = wrapper  # type: ignore[method-assign]

    def undo() -> None:
        wrapper.users -= 1
        if wrapper.users == 0 and dialect.__dict__.get("do_commit") is wrapper:
            del dialect.do_commit

    listeners.on_remove(undo)
    # A two-phase commit does not go through do_commit: the position of an
    # earlier commit on the connection must not stand for it.
    listeners.listen(engine, "commit_twophase", _forget_pipelined)
    return True


def _forget_pipelined(connection: Any, xid: Any, is_prepared: bool) -> None:
    connection.info.pop(PIPELINED_KEY, None)


_BACKEND: Final = PostgresPositions()


class _PipelinedCommit:
    """``dialect.do_commit`` that pipelines the position query behind ``COMMIT``."""

    def __init__(self, original: Callable[[Any], None], *, is_async: bool) -> None:
        from psycopg.pq import TransactionStatus

        self._original = original
        self._in_transaction = TransactionStatus.INTRANS
        self._is_async = is_async
        self.users = 1

    def __call__(self, dbapi_connection: Any) -> None:
        # SQLAlchemy passes the pool's proxied connection: its info is the
        # one the after-commit path and the pool's check-in read.
        info = dbapi_connection.info
        info.pop(PIPELINED_KEY, None)
        driver = dbapi_connection.driver_connection
        if (
            info.get(CAPTURED_KEY)  # the router's own connection: nothing to capture
            or driver is None
            or driver.autocommit  # AUTOCOMMIT isolation: COMMIT is a no-op
            or driver.info.transaction_status != self._in_transaction
        ):
            self._original(dbapi_connection)
            return
        acknowledged = time.monotonic()
        if self._is_async:
            from sqlalchemy.util import await_only

            row, error = await_only(_commit_and_capture_async(driver))
        else:
            row, error = _commit_and_capture(driver)
        position = None
        if row is not None:
            try:
                position = _BACKEND.captured(row)
            except Exception as exc:  # a malformed answer: the position is unknown
                error = exc
        info[PIPELINED_KEY] = PipelinedCapture(acknowledged, position, error)
        # The transaction is over (the driver's commit() sends nothing now),
        # but the dialect's commit keeps its own bookkeeping.
        self._original(dbapi_connection)


def _commit_and_capture(connection: Any) -> tuple[Any, Exception | None]:
    """Send ``COMMIT`` and the position query in one pipeline on a psycopg
    connection: (the query's row, None), or (None, its error) when only the
    query failed.

    :raises psycopg.Error: when the ``COMMIT`` failed (or its outcome is unknown).
    """
    import psycopg

    commit, capture = connection.cursor(), connection.cursor()
    try:
        with connection.pipeline():
            # Executed, not connection.commit(): that one syncs at once, a
            # round trip before the query could be sent. Never prepared:
            # COMMIT has nothing to plan.
            commit.execute("COMMIT", prepare=False)
            capture.execute(_BACKEND.capture_statement)
    except psycopg.Error as error:
        if not _committed(commit):
            raise
        return None, error
    return capture.fetchone(), None


async def _commit_and_capture_async(connection: Any) -> tuple[Any, Exception | None]:
    """:func:`_commit_and_capture` on a psycopg ``AsyncConnection``."""
    import psycopg

    commit, capture = connection.cursor(), connection.cursor()
    try:
        async with connection.pipeline():
            await commit.execute("COMMIT", prepare=False)
            await capture.execute(_BACKEND.capture_statement)
    except psycopg.Error as error:
        if not _committed(commit):
            raise
        return None, error
    return await capture.fetchone(), None


def _committed(commit: Any) -> bool:
    """Whether the pipelined ``COMMIT`` (``commit``, its cursor) succeeded: psycopg
    attaches a command's result to its cursor only when it is not an error."""
    import psycopg

    result = commit.pgresult
    return result is not None and result.status == psycopg.pq.ExecStatus.COMMAND_OK
