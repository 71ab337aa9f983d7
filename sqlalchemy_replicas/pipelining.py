"""A commit's position in the commit's own round trip (I/O on the committing connection).

Read-your-writes needs the position of every commit made through the
router. Read after ``COMMIT`` returned, it costs a round trip of its own
(three with psycopg: the query opens a transaction, which the pool's
check-in rolls back). Where the driver can, the position query travels
with the ``COMMIT``; the server runs it right after the commit, on the same
connection, exactly as the two-step query would, and both answers come
back in one round trip:

* psycopg 3 (PostgreSQL, sync and async engines): libpq's pipeline mode
  sends ``COMMIT`` and the query behind one Sync.
* PyMySQL and aiomysql on MariaDB, on connections that allow several
  statements per query (``client_flag`` with ``CLIENT.MULTI_STATEMENTS``,
  which the application sets: it is not turned on behind its back, see
  docs/round-trips.md): ``COMMIT; SELECT @@last_gtid, @@gtid_binlog_pos``.

:func:`pipeline_commits` wraps the primary dialect's ``do_commit`` to do
this; the after-commit path (:func:`capture_commit`) then finds the
position in the connection's info instead of asking.

Every commit of a primary connection carries the query, written or not:
the commit cannot know whether the session wrote (the session decides that
after ``COMMIT``), and the query adds no round trip. The after-commit path
keeps deciding whether the position counts, as before.

Where the driver cannot (psycopg2, asyncpg, pg8000, a libpq without
pipeline mode, mysqlclient, asyncmy, MySQL, a MariaDB connection without
multiple statements), the commit is the dialect's own and the position is
read after it, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from sqlalchemy.engine import Engine

from ._listeners import Listeners
from .causal import CAPTURED_KEY
from .positions import PositionBackend, SQLRunner
from .positions.mariadb import MariaDBPositions
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
    """Make the commits of ``engine`` (a router's primary, a sync engine or
    an async engine's ``sync_engine``) carry their position query where the
    driver can; ``listeners`` takes it back. Returns whether it may (for
    MariaDB, each connection's flags decide at its commits).

    Engines the application passed in are changed on their dialect instance
    (their own, one per engine); several routers on one engine share one wrapper.
    """
    dialect = engine.dialect
    strategy: _Strategy
    if dialect.name == "postgresql" and dialect.driver in ("psycopg", "psycopg_async"):
        import psycopg

        if not psycopg.Pipeline.is_supported():  # a libpq older than 14
            return False
        strategy = _PostgresPipeline(is_async=bool(dialect.is_async))
    elif dialect.name in ("mysql", "mariadb") and dialect.driver in ("pymysql", "aiomysql"):
        strategy = _MariaDBMultiStatement(dialect, is_async=bool(dialect.is_async))
    else:
        return False
    current = dialect.__dict__.get("do_commit")
    if isinstance(current, _CommitWithCapture):
        current.users += 1
        wrapper = current
    else:
        wrapper = _CommitWithCapture(dialect.do_commit, strategy)
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


#: Row, or the error of the position query when only the query failed.
_Answer = tuple[Any, Exception | None]


class _Strategy(Protocol):
    @property
    def backend(self) -> PostgresPositions | MariaDBPositions:
        """Whose query the commit carries, and who reads its answer."""

    def applies(self, driver: Any) -> bool:
        """Whether the commit of ``driver`` (the driver's connection) can carry the query."""

    def commit_and_capture(self, driver: Any) -> _Answer:
        """Commit on ``driver`` with the position query.

        :raises Exception: the driver's error when the ``COMMIT`` failed.
        """


class _CommitWithCapture:
    """``dialect.do_commit`` that sends the position query with ``COMMIT``."""

    def __init__(self, original: Callable[[Any], None], strategy: _Strategy) -> None:
        self._original = original
        self._strategy = strategy
        self.users = 1

    def __call__(self, dbapi_connection: Any) -> None:
        # SQLAlchemy passes the pool's proxied connection: its info is the
        # one the after-commit path and the pool's check-in read.
        info = dbapi_connection.info
        info.pop(PIPELINED_KEY, None)
        driver = dbapi_connection.driver_connection
        strategy = self._strategy
        if (
            info.get(CAPTURED_KEY)  # the router's own connection: nothing to capture
            or driver is None
            or not strategy.applies(driver)
        ):
            self._original(dbapi_connection)
            return
        acknowledged = time.monotonic()
        # The transaction is over once this returns: the dialect's own
        # commit is not called (PyMySQL would send a second COMMIT).
        row, error = strategy.commit_and_capture(driver)
        position = None
        if error is None:
            try:
                position = strategy.backend.captured(row)
            except Exception as exc:  # a malformed answer: the position is unknown
                error = exc
        info[PIPELINED_KEY] = PipelinedCapture(acknowledged, position, error)


class _PostgresPipeline:
    """psycopg 3: ``COMMIT`` and the query in one pipeline."""

    def __init__(self, *, is_async: bool) -> None:
        from psycopg.pq import ExecStatus, TransactionStatus

        self.backend = PostgresPositions()
        self._is_async = is_async
        self._in_transaction = TransactionStatus.INTRANS
        self._command_ok = ExecStatus.COMMAND_OK

    def applies(self, driver: Any) -> bool:
        # Not in AUTOCOMMIT (COMMIT is a no-op there), nor outside a
        # transaction or in a failed one: the driver's own commit knows those.
        return not driver.autocommit and driver.info.transaction_status == self._in_transaction

    def commit_and_capture(self, driver: Any) -> _Answer:
        if self._is_async:
            from sqlalchemy.util import await_only

            answer: _Answer = await_only(self._commit_and_capture_async(driver))
            return answer
        import psycopg

        commit, capture = driver.cursor(), driver.cursor()
        try:
            with driver.pipeline():
                # Executed, not connection.commit(): that one syncs at once,
                # a round trip before the query could be sent. Never
                # prepared: COMMIT has nothing to plan.
                commit.execute("COMMIT", prepare=False)
                capture.execute(self.backend.capture_statement)
        except psycopg.Error as error:
            if not self._committed(commit):
                raise
            return None, error
        return capture.fetchone(), None

    async def _commit_and_capture_async(self, driver: Any) -> _Answer:
        import psycopg

        commit, capture = driver.cursor(), driver.cursor()
        try:
            async with driver.pipeline():
                await commit.execute("COMMIT", prepare=False)
                await capture.execute(self.backend.capture_statement)
        except psycopg.Error as error:
            if not self._committed(commit):
                raise
            return None, error
        return await capture.fetchone(), None

    def _committed(self, commit: Any) -> bool:
        """Whether the pipelined ``COMMIT`` (``commit``, its cursor) succeeded:
        psycopg attaches a command's result to its cursor only when it is not
        an error (a failed COMMIT also aborts the query behind it)."""
        result = commit.pgresult
        return result is not None and result.status == self._command_ok


class _MariaDBMultiStatement:
    """PyMySQL, aiomysql on MariaDB: ``COMMIT; SELECT ...`` in one query."""

    def __init__(self, dialect: Any, *, is_async: bool) -> None:
        from pymysql.constants import CLIENT

        self.backend = MariaDBPositions()
        self._dialect = dialect
        self._is_async = is_async
        self._multi_statements = CLIENT.MULTI_STATEMENTS
        self._statement = f"COMMIT; {self.backend.capture_statement}"

    def applies(self, driver: Any) -> bool:
        return (
            bool(getattr(self._dialect, "is_mariadb", False))  # MySQL: @@last_gtid is MariaDB's
            and bool(driver.client_flag & self._multi_statements)
            and not driver.get_autocommit()  # from the last status flags: no I/O
        )

    def commit_and_capture(self, driver: Any) -> _Answer:
        if self._is_async:
            from sqlalchemy.util import await_only

            answer: _Answer = await_only(self._commit_and_capture_async(driver))
            return answer
        import pymysql

        cursor = driver.cursor()
        try:
            # The COMMIT's result is read here: its error raises.
            cursor.execute(self._statement)
            try:
                cursor.nextset()  # the query's result, read behind the COMMIT's
                row = cursor.fetchone()
            except pymysql.Error as error:
                return None, error
            return row, None
        finally:
            cursor.close()

    async def _commit_and_capture_async(self, driver: Any) -> _Answer:
        import pymysql

        cursor = await driver.cursor()
        try:
            await cursor.execute(self._statement)
            try:
                await cursor.nextset()
                row = await cursor.fetchone()
            except pymysql.Error as error:
                return None, error
            return row, None
        finally:
            await cursor.close()
