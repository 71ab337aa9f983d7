"""A commit's position in the commit's own round trip (I/O on the committing connection).

Read-your-writes needs the position of every commit made through the
router. Read after ``COMMIT`` returned, it costs a round trip of its own
(three with psycopg: the query opens a transaction, which the pool's
check-in rolls back). Where the driver can, the position query travels
with the ``COMMIT``; the server runs it right after the commit, on the same
connection, exactly as the two-step query would, and both answers come
back in one round trip:

* psycopg 3 (PostgreSQL, sync and async engines): ``COMMIT; SELECT ...``
  as one simple query, sent on the libpq connection as psycopg sends its
  own ``COMMIT`` (see :class:`_PostgresCommitAndQuery`).
* PyMySQL and aiomysql on MariaDB, on connections that allow several
  statements per query (``client_flag`` with ``CLIENT.MULTI_STATEMENTS``,
  which the application sets: it is not turned on behind its back, see
  docs/round-trips.md): ``COMMIT; SELECT @@last_gtid, @@gtid_binlog_pos``
  (aiomysql's connections always allow it).
* PyMySQL on MariaDB, other connections with ``CLIENT.SESSION_TRACK``
  (which the router adds for primaries it connects to from a URL):
  ``COMMIT`` alone, its GTID read from the OK packet, where the server
  tracking ``last_gtid`` reports it (read after the commit when it does not).

:func:`pipeline_commits` wraps the primary dialect's ``do_commit`` to do
this; the after-commit path (:func:`capture_commit`) then finds the
position in the connection's info instead of asking.

Every commit of a primary connection carries the query, written or not:
the commit cannot know whether the session wrote (the session decides that
after ``COMMIT``), and the query adds no round trip. The after-commit path
keeps deciding whether the position counts, as before.

Where the driver cannot (psycopg2, asyncpg, pg8000, mysqlclient, asyncmy,
MySQL, a PyMySQL connection to MariaDB with neither flag), the commit is the
dialect's own and the position is read after it, as before.

A read's causal wait travels the same way, ahead of the read
(:func:`pipeline_waits`): in one pipeline on psycopg 3, sync and async
engines (the async ones driven from SQLAlchemy's greenlet); as
``<wait>; <read>`` on PyMySQL and aiomysql connections to MariaDB that
allow several statements; as two commands sent one behind the other on
PyMySQL's other connections. Streamed reads (server-side cursors) on
psycopg and aiomysql keep the separate wait.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Literal, Protocol, TypeAlias, TypeVar

from sqlalchemy.engine import Connection, Engine

from ._listeners import Listeners
from .causal import CAPTURED_KEY, COMMITTED_KEY
from .positions import PositionBackend, SQLRunner
from .positions._base import WaitResult
from .positions.mariadb import WAIT_FAILED_ERROR, WAIT_FAILED_PREFIX, MariaDBPositions
from .positions.postgresql import PostgresPositions

__all__ = [
    "PIPELINED_KEY",
    "WAIT_OBSERVERS",
    "DeferredOutcome",
    "DeferredWait",
    "PipelinedCapture",
    "WaitNotReached",
    "can_defer_wait",
    "capture_commit",
    "defer_wait",
    "forget_deferred_wait",
    "pipeline_commits",
    "pipeline_waits",
]

#: Set in a primary connection's info by every commit of it: the outcome of
#: the position query pipelined with that ``COMMIT`` (absent when the commit
#: was not pipelined). Consumed by :func:`capture_commit`.
PIPELINED_KEY: Final = "sqlalchemy_replicas.pipelined_capture"

logger = logging.getLogger("sqlalchemy_replicas.causal")


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


def pipeline_commits(engine: Engine, listeners: Listeners, *, owned: bool = False) -> bool:
    """Make the commits of ``engine`` (a router's primary, a sync engine or
    an async engine's ``sync_engine``) carry their position query where the
    driver can, and mark every connection that commits (its position is
    read at check-in for Core code: ``Cluster.capture_core_commit``);
    ``listeners`` takes it back. Returns whether the position may travel
    with the ``COMMIT`` (for MariaDB, each connection's flags decide at its
    commits).

    Dialect methods, not engine events: an engine with a listener of
    SQLAlchemy's connection events dispatches events at every statement,
    begin and commit (5 to 8 microseconds of client CPU per read, 27 to 35
    per write and commit, in the measures of CHANGELOG.md).

    Engines the application passed in are changed on their dialect instance
    (their own, one per engine); several routers on one engine share one wrapper.
    On MariaDB through PyMySQL, the connections of an engine the router built
    (``owned``) ask for CLIENT.SESSION_TRACK; on any engine's connections that
    have it, the server is told to track ``last_gtid`` (:func:`_track_last_gtid`).
    """
    dialect = engine.dialect
    strategy: _Strategy | None
    if dialect.name == "postgresql" and dialect.driver in ("psycopg", "psycopg_async"):
        strategy = _PostgresCommitAndQuery(is_async=bool(dialect.is_async))
    elif dialect.name in ("mysql", "mariadb") and dialect.driver in ("pymysql", "aiomysql"):
        strategy = _MariaDBMultiStatement(dialect, is_async=bool(dialect.is_async))
        if not dialect.is_async and _MariaDBTrackedCommit.supported():
            # aiomysql always allows several statements: only PyMySQL needs it.
            strategy = _MariaDBByFlags(strategy, _MariaDBTrackedCommit(dialect))
            _track_last_gtid(engine, listeners, add_flag=owned)
    else:
        strategy = None
    _wrap_dialect(
        dialect, "do_commit", _CommitWithCapture, partial(_CommitWithCapture, strategy=strategy),
        listeners,
    )  # fmt: skip
    _wrap_dialect(dialect, "do_commit_twophase", _TwoPhaseCommit, _TwoPhaseCommit, listeners)
    return strategy is not None


class _DialectWrapper(Protocol):
    #: How many routers installed it (it goes when the last one is disposed).
    users: int


_W = TypeVar("_W", bound=_DialectWrapper)


def _wrap_dialect(
    dialect: Any,
    name: str,
    kind: type[_W],
    make: Callable[[Callable[..., Any]], _W],
    listeners: Listeners,
) -> None:
    """Replace ``dialect``'s method ``name`` by ``make(method)``, on this dialect
    instance only; ``listeners`` takes it back. Several routers on one engine
    share one wrapper of ``kind``."""
    current = dialect.__dict__.get(name)
    if isinstance(current, kind):
        current.users += 1
        wrapper = current
    else:
        wrapper = make(getattr(dialect, name))
        setattr(dialect, name, wrapper)

    def undo() -> None:
        wrapper.users -= 1
        if wrapper.users == 0 and dialect.__dict__.get(name) is wrapper:
            delattr(dialect, name)

    listeners.on_remove(undo)


#: Row, or the error of the position query when only the query failed. The
#: row is :data:`_ASK_AFTER` when the commit succeeded but brought no answer.
_Answer = tuple[Any, Exception | None]

#: A strategy's row when its ``COMMIT`` succeeded but did not bring the
#: position back: the after-commit path then asks for it, as without pipelining.
_ASK_AFTER: Final = object()


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
    """``dialect.do_commit`` that marks the connection as committed
    (:data:`~sqlalchemy_replicas.causal.COMMITTED_KEY`) and sends the
    position query with ``COMMIT`` where ``strategy`` applies (None: never)."""

    def __init__(self, original: Callable[[Any], None], *, strategy: _Strategy | None) -> None:
        self._original = original
        self._strategy = strategy
        self.users = 1

    def __call__(self, dbapi_connection: Any) -> None:
        # SQLAlchemy passes the pool's proxied connection: its info is the
        # one the after-commit path and the pool's check-in read.
        info = dbapi_connection.info
        info[COMMITTED_KEY] = True
        info.pop(PIPELINED_KEY, None)
        driver = dbapi_connection.driver_connection
        strategy = self._strategy
        if (
            strategy is None
            or info.get(CAPTURED_KEY)  # the router's own connection: nothing to capture
            or driver is None
            or not strategy.applies(driver)
        ):
            self._original(dbapi_connection)
            return
        acknowledged = time.monotonic()
        # The transaction is over once this returns: the dialect's own
        # commit is not called (PyMySQL would send a second COMMIT).
        row, error = strategy.commit_and_capture(driver)
        if row is _ASK_AFTER:  # committed, without its position: read after, as before
            return
        position = None
        if error is None:
            try:
                position = strategy.backend.captured(row)
            except Exception as exc:  # a malformed answer: the position is unknown
                error = exc
        info[PIPELINED_KEY] = PipelinedCapture(acknowledged, position, error)


class _TwoPhaseCommit:
    """``dialect.do_commit_twophase``: a two-phase commit does not go through
    ``do_commit``, so the position pipelined with an earlier commit on the
    connection must not stand for it (it is read after this commit instead)."""

    def __init__(self, original: Callable[..., None]) -> None:
        self._original = original
        self.users = 1

    def __call__(self, connection: Connection, *args: Any, **kwargs: Any) -> None:
        connection.info.pop(PIPELINED_KEY, None)
        self._original(connection, *args, **kwargs)


class _PostgresCommitAndQuery:
    """psycopg 3: ``COMMIT; <position query>`` as one simple query.

    A simple query (the protocol psycopg uses for its own ``COMMIT``) runs
    several statements and answers them in one round trip. It is sent
    straight on the libpq connection, as psycopg's own ``commit()`` sends
    its ``COMMIT``, through psycopg's ``generators.execute`` and the
    connection's ``wait()`` and lock (:func:`_psycopg_commit_internals`
    checks they exist; without them, a cursor sends it, at 35 to 55
    microseconds of client CPU more per commit). psycopg takes the
    transaction status from libpq, so a ``COMMIT`` it did not send itself
    leaves it right (its next statement begins a transaction again;
    psycopg2, which keeps its own record, is not wired). (A libpq pipeline
    does the same in one round trip too, at about 150 microseconds more.)

    The server stops at the first error. The position query is written so
    that it cannot fail (it answers NULL on a server in recovery): an error
    is the ``COMMIT``'s, raised as the dialect's own commit would. Only a
    cancel in the microseconds between the two can fail the query after a
    successful ``COMMIT``: the results say so, and the commit stands with
    its position unknown (through a cursor, which cannot tell the two
    apart, that error raises from the commit).
    """

    def __init__(self, *, is_async: bool) -> None:
        from psycopg import pq

        self.backend = PostgresPositions()
        self._is_async = is_async
        self._in_transaction = pq.TransactionStatus.INTRANS
        self._command_ok = pq.ExecStatus.COMMAND_OK
        self._tuples_ok = pq.ExecStatus.TUPLES_OK
        self._pipeline_off = pq.PipelineStatus.OFF
        self._internals = _psycopg_commit_internals()

    @property
    def _query(self) -> str:
        # Read at each commit: tests swap the backend for one answering otherwise.
        return f"COMMIT; {self.backend.capture_statement}"

    def applies(self, driver: Any) -> bool:
        # Not in AUTOCOMMIT (COMMIT is a no-op there), nor outside a
        # transaction or in a failed one, nor in the application's own
        # pipeline (no simple query there): the driver's own commit knows those.
        return (
            not driver.autocommit
            and driver.info.transaction_status == self._in_transaction
            and driver.pgconn.pipeline_status == self._pipeline_off
        )

    def commit_and_capture(self, driver: Any) -> _Answer:
        if self._is_async:
            from sqlalchemy.util import await_only

            answer: _Answer = await_only(self._commit_and_capture_async(driver))
            return answer
        if self._internals is not None:
            execute, _ = self._internals
            with driver.lock:
                driver.pgconn.send_query(self._query.encode())
                return self._answer(driver, driver.wait(execute(driver.pgconn)))
        cursor = driver.cursor()
        try:
            cursor.execute(self._query)  # the COMMIT's error
            cursor.nextset()  # the query's result, behind the COMMIT's
            return cursor.fetchone(), None
        finally:
            cursor.close()

    async def _commit_and_capture_async(self, driver: Any) -> _Answer:
        if self._internals is not None:
            execute, _ = self._internals
            async with driver.lock:
                driver.pgconn.send_query(self._query.encode())
                return self._answer(driver, await driver.wait(execute(driver.pgconn)))
        cursor = driver.cursor()
        try:
            await cursor.execute(self._query)
            cursor.nextset()
            return await cursor.fetchone(), None
        finally:
            await cursor.close()

    def _answer(self, driver: Any, results: list[Any]) -> _Answer:
        """The position query's row from the libpq ``results`` of the query,
        or (None, why) when the commit stands without it.

        :raises psycopg.Error: the ``COMMIT``'s error, as psycopg's own
            ``commit()`` raises it.
        """
        assert self._internals is not None
        _, error_from_result = self._internals
        if not results:
            import psycopg

            raise psycopg.InternalError("the server answered nothing to COMMIT")
        if results[0].status != self._command_ok:
            raise error_from_result(results[0], encoding=driver.info.encoding)
        if len(results) != 2:
            return None, ValueError(f"the position query answered {len(results) - 1} results")
        query = results[1]
        if query.status != self._tuples_ok:
            return None, error_from_result(query, encoding=driver.info.encoding)
        if query.ntuples != 1:
            return None, ValueError(f"the position query answered {query.ntuples} rows")
        values = (query.get_value(0, column) for column in range(query.nfields))
        return tuple(None if v is None else bytes(v).decode() for v in values), None


def _psycopg_commit_internals() -> tuple[Callable[[Any], Any], Callable[..., Exception]] | None:
    """psycopg's ``generators.execute`` and ``errors.error_from_result``, with
    which its connections run and check their own ``COMMIT`` (internal to
    psycopg, present from 3.0 to 3.3 at least), or None where they are
    missing: the commit then goes through a cursor."""
    try:
        from psycopg import generators
        from psycopg.errors import error_from_result
    except ImportError:
        return None
    execute = getattr(generators, "execute", None)
    if not callable(execute):
        return None
    return execute, error_from_result


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
            await cursor.execute(f"COMMIT; {self.backend.capture_statement}")
            try:
                await cursor.nextset()
                row = await cursor.fetchone()
            except pymysql.Error as error:
                return None, error
            return row, None
        finally:
            await cursor.close()


class _MariaDBTrackedCommit:
    """PyMySQL on MariaDB without multiple statements: ``COMMIT`` alone, its
    GTID read from the OK packet's session state (``last_gtid`` tracked by
    ``session_track_system_variables``, CLIENT.SESSION_TRACK).

    The tracked value is what ``SELECT @@last_gtid`` says right after the
    ``COMMIT`` (the server writes the variable's value when it builds the
    packet), and a non-empty ``@@last_gtid`` is all
    :meth:`MariaDBPositions.captured` takes from the query's row. The
    packet has it only when the commit changed it (a commit that wrote to
    the binlog); otherwise (nothing written, tracking off, an older server)
    the position is read after the commit, as without pipelining.
    """

    def __init__(self, dialect: Any) -> None:
        from pymysql.constants import CLIENT, COMMAND

        self.backend = MariaDBPositions()
        self._dialect = dialect
        self._session_track = CLIENT.SESSION_TRACK
        self._query = COMMAND.COM_QUERY

    @staticmethod
    def supported() -> bool:
        """Whether this PyMySQL has the private methods the commit uses."""
        import pymysql

        connection = pymysql.connections.Connection
        return callable(getattr(connection, "_execute_command", None)) and callable(
            getattr(connection, "_read_ok_packet", None)
        )

    def applies(self, driver: Any) -> bool:
        track = self._session_track
        return (
            bool(getattr(self._dialect, "is_mariadb", False))
            # PyMySQL sends its flags unmasked: the server must have it too.
            and bool(driver.client_flag & track)
            and bool(getattr(driver, "server_capabilities", 0) & track)
            and not driver.get_autocommit()
        )

    def commit_and_capture(self, driver: Any) -> _Answer:
        # What PyMySQL's commit() does, keeping the OK packet it drops.
        driver._execute_command(self._query, "COMMIT")
        ok = driver._read_ok_packet()  # raises the COMMIT's error
        message = getattr(ok, "message", None)
        status = getattr(ok, "server_status", 0)
        if not isinstance(message, bytes) or not status & _SESSION_STATE_CHANGED:
            return _ASK_AFTER, None
        value = _tracked_variable(message, b"last_gtid")
        if not value:
            return _ASK_AFTER, None
        try:
            text = value.decode("ascii")
            self.backend.parse(text)
        except ValueError:  # not a GTID position (UnicodeDecodeError is one)
            return _ASK_AFTER, None
        return (text, None), None  # the row of capture_statement, as it would read


class _MariaDBByFlags:
    """PyMySQL on MariaDB: per connection, by the flags it connected with,
    ``COMMIT; SELECT ...`` (CLIENT.MULTI_STATEMENTS: always one round trip),
    else the GTID tracked in the ``COMMIT``'s OK packet (CLIENT.SESSION_TRACK)."""

    def __init__(self, multi: _MariaDBMultiStatement, tracked: _MariaDBTrackedCommit) -> None:
        self.backend = multi.backend
        self._multi = multi
        self._tracked = tracked

    def applies(self, driver: Any) -> bool:
        return self._multi.applies(driver) or self._tracked.applies(driver)

    def commit_and_capture(self, driver: Any) -> _Answer:
        if self._multi.applies(driver):
            return self._multi.commit_and_capture(driver)
        return self._tracked.commit_and_capture(driver)


#: SERVER_SESSION_STATE_CHANGED: the OK packet carries session state changes.
_SESSION_STATE_CHANGED: Final = 1 << 14
#: SESSION_TRACK_SYSTEM_VARIABLES: a change of a tracked system variable.
_SYSTEM_VARIABLE: Final = 0

#: Tells the server to track ``last_gtid`` besides what it tracks already
#: ('*' tracks every variable; a name listed twice is kept once anyway).
_TRACK_LAST_GTID: Final = (
    "SET SESSION session_track_system_variables = "
    "IF(FIND_IN_SET('last_gtid', @@session_track_system_variables) "
    "OR FIND_IN_SET('*', @@session_track_system_variables), "
    "@@session_track_system_variables, "
    "CONCAT_WS(',', NULLIF(@@session_track_system_variables, ''), 'last_gtid'))"
)


def _track_last_gtid(engine: Engine, listeners: Listeners, *, add_flag: bool) -> None:
    """Let the ``COMMIT``'s OK packet of ``engine``'s new PyMySQL connections
    carry ``last_gtid``: ask for CLIENT.SESSION_TRACK when ``add_flag`` (an
    engine the router built), and on every new connection that has it, on
    MariaDB, start tracking ``last_gtid`` (one statement per connection).

    The flag only adds the session state to OK packets, which PyMySQL reads
    as it reads their info (kept whole in a result's private ``message``);
    result sets and their EOF packets are unchanged.
    """
    import pymysql
    from pymysql.constants import CLIENT

    flag = CLIENT.SESSION_TRACK

    def ask(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        # Added to the flags SQLAlchemy built from the URL (FOUND_ROWS, the
        # application's): connect_args would replace them.
        cparams["client_flag"] = int(cparams.get("client_flag", 0)) | flag

    def track(dbapi_connection: Any, record: Any) -> None:
        driver = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        if not (
            getattr(engine.dialect, "is_mariadb", False)
            and driver.client_flag & flag
            and getattr(driver, "server_capabilities", 0) & flag
        ):
            return
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(_TRACK_LAST_GTID)  # opens no transaction
        except pymysql.Error as exc:  # a proxy that refuses it: commits read their GTID after
            logger.debug("could not track last_gtid on a new connection: %s", exc)
        finally:
            cursor.close()

    if add_flag:
        listeners.listen(engine, "do_connect", ask)
    listeners.listen(engine, "connect", track)


def _tracked_variable(message: bytes, name: bytes) -> bytes | None:
    """The value of the tracked system variable ``name`` in an OK packet's
    ``message`` (pure): what follows its status flags and warning count, on
    a connection with CLIENT.SESSION_TRACK whose packet has
    SERVER_SESSION_STATE_CHANGED: the info (a length-encoded string) and the
    session state (one, of entries: a type byte and length-encoded data;
    a system variable's data is its name and value, both length-encoded).

    None when the state does not have it, or is malformed.
    """
    try:
        at, _info = _lenenc_bytes(message, 0)
        at, state = _lenenc_bytes(message, at)
        if at != len(message):
            return None
        found = None
        at = 0
        while at < len(state):
            kind = state[at]
            at, data = _lenenc_bytes(state, at + 1)
            if kind != _SYSTEM_VARIABLE:
                continue
            end, variable = _lenenc_bytes(data, 0)
            end, value = _lenenc_bytes(data, end)
            if end != len(data):
                return None
            if variable == name:
                found = value
    except ValueError:
        return None
    return found


def _lenenc_bytes(data: bytes, at: int) -> tuple[int, bytes]:
    """The length-encoded string at ``data[at:]`` and the offset after it.

    :raises ValueError: when it does not fit in ``data`` or its length is not one.
    """
    if at >= len(data):
        raise ValueError("truncated")
    first = data[at]
    if first < 0xFB:
        length, at = first, at + 1
    elif first in (0xFC, 0xFD, 0xFE):
        size = {0xFC: 2, 0xFD: 3, 0xFE: 8}[first]
        if at + 1 + size > len(data):
            raise ValueError("truncated")
        length, at = int.from_bytes(data[at + 1 : at + 1 + size], "little"), at + 1 + size
    else:  # 0xFB (NULL) and 0xFF are not lengths
        raise ValueError("not a length")
    if at + length > len(data):
        raise ValueError("truncated")
    return at + length, data[at : at + length]


# -- a causal wait and the read behind it, in one round trip -------------------------

#: Driver connection (a replica's) -> the wait to send ahead of its next
#: statement (:func:`defer_wait`). Keyed by the driver's connection, which
#: the execute hook has at hand (the pool's info is not, on a first connect);
#: entries live from a read's routing to its execution, and are always
#: removed (:func:`forget_deferred_wait`).
_DEFERRED: Final[dict[Any, DeferredWait]] = {}

#: Called as ``observer(engine, statement)`` for each wait sent ahead of a
#: read, which bypasses the engine's cursor events (``before_cursor_execute``
#: sees the read only); :class:`~sqlalchemy_replicas.testing.StatementLog`
#: records them so.
WAIT_OBSERVERS: Final[list[Callable[[Engine, str], object]]] = []


class WaitNotReached(Exception):
    """The wait sent ahead of a read did not see its position applied: the
    read's rows were discarded, and the read goes on to the plan's next step.

    :ivar outcome: ``"timed_out"``, ``"stopped"`` (the replica is not
        applying), or ``"failed"`` (the wait raised an error that does not
        say the replica is gone).
    """

    def __init__(self, outcome: str) -> None:
        super().__init__(f"the wait ahead of the read ended {outcome}")
        self.outcome = outcome


#: How a deferred wait ended: as :meth:`PositionBackend.wait_applying` says,
#: or with an error: ``"failed"`` (the replica is up), ``"gone"`` (it is not).
DeferredOutcome: TypeAlias = WaitResult | Literal["failed", "gone"]

#: Called with how a deferred wait ended and the seconds it took.
Settle: TypeAlias = Callable[[DeferredOutcome, float], object]


@dataclass(frozen=True, slots=True)
class DeferredWait:
    """A wait to send ahead of the next statement on a replica connection."""

    position: Any
    timeout: float
    settle: Settle


def can_defer_wait(connection: Connection) -> bool:
    """Whether a wait on ``connection`` (a replica's) can travel with the read
    behind it: its engine's driver can (see :func:`pipeline_waits`)."""
    wrapper = connection.dialect.__dict__.get("do_execute")
    return isinstance(wrapper, _ExecuteBehindWait) and wrapper.can_defer(connection)


def defer_wait(connection: Connection, position: Any, timeout: float, settle: Settle) -> None:
    """Send a wait for ``position`` (up to ``timeout`` seconds) ahead of the next
    statement on ``connection``, in its round trip; ``settle`` learns how it
    ended. When the position was not reached that statement raises
    :class:`WaitNotReached` instead of returning its rows."""
    _DEFERRED[connection.connection.driver_connection] = DeferredWait(position, timeout, settle)


def forget_deferred_wait(connection: Connection) -> None:
    """Drop a wait :func:`defer_wait` attached and no statement took."""
    _DEFERRED.pop(connection.connection.driver_connection, None)


def pipeline_waits(engine: Engine, listeners: Listeners) -> bool:
    """Let reads on ``engine`` (a replica's sync engine, or an async engine's
    ``sync_engine``) carry the causal wait ahead of them, where the driver
    can: psycopg 3, sync and async; PyMySQL and aiomysql on MariaDB
    (see :class:`_MariaDBExecuteBehindWait`). Returns whether it may;
    ``listeners`` takes it back."""
    dialect = engine.dialect
    make: Callable[[Callable[..., None]], _ExecuteBehindWait]
    if dialect.name == "postgresql" and dialect.driver in ("psycopg", "psycopg_async"):
        import psycopg

        if not psycopg.Pipeline.is_supported():
            return False
        if dialect.is_async and not _adapter_buffers_rows():
            return False
        make = partial(_PostgresExecuteBehindWait, is_async=bool(dialect.is_async))
    elif dialect.name in ("mysql", "mariadb") and dialect.driver in ("pymysql", "aiomysql"):
        make = partial(_MariaDBExecuteBehindWait, is_async=bool(dialect.is_async))
    else:
        return False
    for name in ("do_execute", "do_execute_no_params"):
        _wrap_dialect(dialect, name, _ExecuteBehindWait, make, listeners)
    return True


def _driver(context: Any) -> Any:
    """The driver's connection an execution (``context``) runs on, the key of
    :data:`_DEFERRED`: on async engines the cursor SQLAlchemy executes on is
    its adapter's, which does not name it."""
    return context.root_connection.connection.driver_connection


def _dbapi_connection(context: Any) -> Any:
    """The DBAPI connection (SQLAlchemy's adapter on async engines) of ``context``."""
    return context.root_connection.connection.dbapi_connection


def _adapter_buffers_rows() -> bool:
    """Whether SQLAlchemy's psycopg async cursor keeps the psycopg cursor and
    its buffered rows where :meth:`_PostgresExecuteBehindWait._buffer_rows`
    fills them in, and has its server-side class to tell named cursors by
    (private attributes: without them, async engines keep the separate
    wait)."""
    from sqlalchemy.dialects.postgresql import psycopg as adaption

    cursor_class = getattr(adaption, "AsyncAdapt_psycopg_cursor", None)
    return (
        cursor_class is not None
        and hasattr(adaption, "AsyncAdapt_psycopg_ss_cursor")
        and all(hasattr(cursor_class, name) for name in ("_cursor", "_rows"))
    )


class _ExecuteBehindWait:
    """``dialect.do_execute`` (or ``do_execute_no_params``) that sends a
    deferred wait ahead of the statement, in its round trip."""

    def __init__(self, original: Callable[..., None]) -> None:
        self._original = original
        self.users = 1

    def can_defer(self, connection: Connection) -> bool:
        """Whether ``connection`` can take a wait ahead of its next statement."""
        return True

    def __call__(self, cursor: Any, statement: Any, *rest: Any) -> None:
        # rest: (parameters, context), or (context,) without parameters.
        deferred = _DEFERRED.pop(_driver(rest[-1]), None) if _DEFERRED else None
        if deferred is None:
            self._original(cursor, statement, *rest)
        else:
            self._behind_wait(deferred, cursor, statement, rest)

    def _behind_wait(
        self, deferred: DeferredWait, cursor: Any, statement: Any, rest: tuple[Any, ...]
    ) -> None:
        """Send ``deferred``'s wait and the statement in one round trip; settle
        the wait; raise :class:`WaitNotReached` unless it reached its position."""
        raise NotImplementedError

    @staticmethod
    def _announce(context: Any, query: str) -> None:
        """Tell the wait observers (``StatementLog``) of the wait sent."""
        for observer in WAIT_OBSERVERS:
            observer(context.root_connection.engine, query)

    @staticmethod
    def _failed(
        deferred: DeferredWait, error: Exception, cursor: Any, context: Any, seconds: float
    ) -> None:
        """The wait itself failed (the statement behind it never ran). A lost
        connection returns, for the caller to raise the driver's error (the
        read's own handling marks the replica down); else raises
        :class:`WaitNotReached`."""
        if context.dialect.is_disconnect(error, _dbapi_connection(context), cursor):
            deferred.settle("gone", seconds)
            return
        logger.warning("waiting on a replica ahead of a read failed: %s", error)
        deferred.settle("failed", seconds)
        raise WaitNotReached("failed") from error


class _PostgresExecuteBehindWait(_ExecuteBehindWait):
    """psycopg 3: the wait and the statement in one pipeline; the statement's
    rows are discarded when the wait did not reach its position.

    On async engines (``AsyncConnection``) the same runs in SQLAlchemy's
    greenlet, each driver call awaited there (``await_only``), as
    SQLAlchemy's own adapter does.
    """

    def __init__(self, original: Callable[..., None], *, is_async: bool = False) -> None:
        import psycopg

        super().__init__(original)
        self._is_async = is_async
        # A named cursor (stream_results): psycopg's own, or on async engines
        # SQLAlchemy's adapter of one (whose other attributes differ across
        # SQLAlchemy versions: 2.0's adapter has no ``server_side``).
        self._server_cursor: type[Any] = psycopg.ServerCursor
        self._tuples_ok = psycopg.pq.ExecStatus.TUPLES_OK
        if is_async:
            from sqlalchemy.dialects.postgresql import psycopg as adaption
            from sqlalchemy.util import await_only

            self._server_cursor = adaption.AsyncAdapt_psycopg_ss_cursor
            self._await: Callable[[Any], Any] = await_only

    def _io(self, result: Any) -> Any:
        """What a psycopg call gave: awaited when the connection is async."""
        return self._await(result) if self._is_async else result

    def _behind_wait(
        self, deferred: DeferredWait, cursor: Any, statement: Any, rest: tuple[Any, ...]
    ) -> None:
        context = rest[-1]
        driver = _driver(context)
        query, parameters = _WAITS.wait_applying_query(deferred.position, deferred.timeout)
        self._announce(context, query)
        started = time.perf_counter()
        wait = driver.cursor()
        try:
            if isinstance(cursor, self._server_cursor):
                # A named cursor (stream_results) cannot be pipelined: the
                # wait goes first, and the statement meets the server's
                # answer to it as without the router.
                self._io(wait.execute(query, parameters))
                self._settle(deferred, wait, started)
                self._original(cursor, statement, *rest)
                return
            try:
                with self._pipeline(driver):
                    self._io(wait.execute(query, parameters))
                    self._original(cursor, statement, *rest)
            except Exception as error:
                if wait.pgresult is None or wait.pgresult.status != self._tuples_ok:
                    # The wait itself failed, and the read behind it never ran.
                    self._failed(deferred, error, cursor, context, time.perf_counter() - started)
                    raise  # lost connection: the read's own handling marks it down
                self._settle(deferred, wait, started)  # raises when it was not reached
                raise  # the read's own error, the wait having reached its position
            self._settle(deferred, wait, started)
            if self._is_async:
                self._buffer_rows(cursor)
        finally:
            self._io(wait.close())

    @contextmanager
    def _pipeline(self, driver: Any) -> Iterator[None]:
        """``driver`` (a psycopg connection) in pipeline mode; on exit, the
        Sync and every answer (errors raise here)."""
        if not self._is_async:
            with driver.pipeline():
                yield
            return
        # async with, from the greenlet: AsyncConnection.pipeline() is an
        # async context manager.
        manager = driver.pipeline()
        self._await(manager.__aenter__())
        try:
            yield
        except BaseException as error:
            if not self._await(manager.__aexit__(type(error), error, error.__traceback__)):
                raise
        else:
            self._await(manager.__aexit__(None, None, None))

    def _buffer_rows(self, cursor: Any) -> None:
        """Give SQLAlchemy's async cursor (``cursor``) the rows of the statement
        it executed in the pipeline.

        The adapter buffers a statement's rows in its ``execute()``, if psycopg
        has its result by then; in pipeline mode the result comes with the
        Sync, after ``execute()`` returned, so it buffered none (the statement's
        ``description`` is right: the adapter asks psycopg for it). This reads
        them as the adapter would have, through its private ``_cursor`` (the
        psycopg ``AsyncCursor``) and ``_rows`` (what its ``fetch*()`` return),
        which :func:`_adapter_buffers_rows` checks exist; tests/test_pipelining.py
        reads the rows back. Rows the adapter did buffer are not read twice:
        psycopg's ``fetchall()`` returns those not fetched yet.
        """
        driver_cursor = cursor._cursor
        result = driver_cursor.pgresult
        if result is not None and result.status == self._tuples_ok:
            cursor._rows.extend(self._await(driver_cursor.fetchall()))

    def _settle(self, deferred: DeferredWait, wait: Any, started: float) -> None:
        result = _WAITS.wait_applying_result(self._io(wait.fetchone()))
        deferred.settle(result, time.perf_counter() - started)
        if result != "reached":
            raise WaitNotReached(result)


_WAITS: Final = PostgresPositions()


class _MariaDBExecuteBehindWait(_ExecuteBehindWait):
    """PyMySQL, aiomysql on MariaDB, a wait that fails unless its position
    was reached, and the statement, in one round trip:

    - on connections that allow several statements per query (aiomysql's
      always do): ``<wait>; <statement>`` as one query. When the wait
      fails, the server stops there: the statement never runs on a replica
      that is behind. On async engines SQLAlchemy's adapter cursor runs the
      query (its ``execute()``, then its ``nextset()``, which buffers the
      statement's rows as its ``execute()`` would have).
    - on other PyMySQL connections: two commands, the wait then the
      statement, both sent before either answer is read (the server answers
      a connection's commands in order). When the wait fails, the
      statement's answer, older than the position, is read and dropped.
      This uses PyMySQL's private methods (:func:`_pymysql_sends_ahead`
      checks they exist; without them such connections keep the wait on
      its own).
    """

    def __init__(self, original: Callable[..., None], *, is_async: bool = False) -> None:
        from pymysql.constants import CLIENT

        super().__init__(original)
        self._is_async = is_async
        self._multi_statements = CLIENT.MULTI_STATEMENTS
        self._sends_ahead = not is_async and _pymysql_sends_ahead()
        if is_async:
            from sqlalchemy.util import await_only

            self._await: Callable[[Any], Any] = await_only

    def can_defer(self, connection: Connection) -> bool:
        driver = connection.connection.driver_connection
        return (
            bool(getattr(connection.dialect, "is_mariadb", False))
            and driver is not None
            and (self._sends_ahead or bool(driver.client_flag & self._multi_statements))
        )

    def _behind_wait(
        self, deferred: DeferredWait, cursor: Any, statement: Any, rest: tuple[Any, ...]
    ) -> None:
        import pymysql

        context = rest[-1]
        parameters = rest[0] if len(rest) == 2 else None
        wait, wait_parameters = _GTID_WAITS.wait_applying_or_fail(
            deferred.position, deferred.timeout
        )
        self._announce(context, wait)
        # aiomysql's server-side cursor (stream_results) reads a query's
        # later results whole (its nextset() is the buffered cursor's), where
        # its fetch*() read rows from the wire: they would find none. There
        # the wait goes first, on its own.
        alone = self._is_async and cursor.server_side
        ahead = not alone and not _driver(context).client_flag & self._multi_statements
        started = time.perf_counter()
        try:
            # aiomysql's cursor() raises here if the connection is closed.
            binder = self._binder(cursor, context)
            # PyMySQL and aiomysql bind parameters on the client: the
            # statement as its own execute() would send it.
            wait = binder.mogrify(wait, wait_parameters)
            if alone:
                self._await(binder.execute(wait))
            elif ahead:
                read = binder.mogrify(statement, parameters)
                _send_wait_and_read(cursor, wait, read)  # the wait's error raises here
            else:
                # Reads the wait's result: its error raises here.
                cursor.execute(f"{wait}; {binder.mogrify(statement, parameters)}")
        except pymysql.Error as error:
            seconds = time.perf_counter() - started
            code, message = (*error.args, None, "")[:2]
            if code == WAIT_FAILED_ERROR and str(message).startswith(WAIT_FAILED_PREFIX):
                outcome: WaitResult = "stopped" if str(message).endswith("stopped") else "timed_out"
                deferred.settle(outcome, seconds)
                raise WaitNotReached(outcome) from None
            self._failed(deferred, error, cursor, context, seconds)
            raise  # lost connection: the read's own handling marks it down
        deferred.settle("reached", time.perf_counter() - started)
        if alone:
            self._original(cursor, statement, *rest)
        elif ahead:
            _read_answer(cursor, read)  # the statement's own result (its error raises here)
        else:
            cursor.nextset()  # the statement's own result (its error raises here)

    def _binder(self, cursor: Any, context: Any) -> Any:
        """A cursor whose ``mogrify()`` binds parameters as the driver's
        ``execute()`` does: PyMySQL's own; on aiomysql, whose adapter cursor
        has no ``mogrify()``, a cursor of the aiomysql connection (made
        without I/O; it holds nothing once its one statement, if any, has
        been read)."""
        if not self._is_async:
            return cursor
        return self._await(_driver(context).cursor())


_GTID_WAITS: Final = MariaDBPositions()


def _pymysql_sends_ahead() -> bool:
    """Whether PyMySQL has the private methods with which a command is sent
    before the answer to the one ahead of it is read (:func:`_send_wait_and_read`):
    those its own ``query()`` and cursors' ``execute()`` are made of
    (PyMySQL 1.0 to 1.1 and 2.x)."""
    from pymysql.connections import Connection as PyMySQLConnection
    from pymysql.cursors import Cursor

    return all(
        callable(getattr(PyMySQLConnection, name, None))
        for name in ("_execute_command", "_read_query_result")
    ) and all(callable(getattr(Cursor, name, None)) for name in ("_clear_result", "_do_get_result"))


def _send_wait_and_read(cursor: Any, wait: str, read: str) -> None:
    """Send ``wait`` and ``read`` (SQL, parameters bound) as two commands on
    ``cursor``'s PyMySQL connection, before reading either answer (one round
    trip), then read the wait's answer. When it is an error, the read's answer
    (the read ran, but the wait before it did not reach its position) is read
    and dropped first, leaving the connection ready for its next command.

    :raises pymysql.Error: the wait's error.
    """
    import pymysql
    from pymysql.constants import COMMAND

    connection = cursor.connection
    while cursor.nextset():  # as the cursor's execute() does
        pass
    connection._execute_command(COMMAND.COM_QUERY, wait)
    connection._execute_command(COMMAND.COM_QUERY, read)
    try:
        connection._read_query_result()
    except pymysql.Error:
        if connection._sock is not None:  # still connected (else PyMySQL closed it)
            # The read's answer, which PyMySQL numbers as the answer to the
            # last command sent (packet sequence numbers start again at 1).
            connection._next_seq_id = 1
            with suppress(pymysql.Error):
                connection._read_query_result()
        raise


def _read_answer(cursor: Any, read: str) -> None:
    """Read the answer to ``read``, sent by :func:`_send_wait_and_read`, into
    ``cursor`` as its ``execute(read)`` would have (a server-side cursor
    leaves the rows on the wire).

    :raises pymysql.Error: the read's own error.
    """
    from pymysql.cursors import SSCursor

    connection = cursor.connection
    connection._next_seq_id = 1  # the answer to the second command sent
    cursor._clear_result()
    connection._affected_rows = connection._read_query_result(
        unbuffered=isinstance(cursor, SSCursor)
    )
    cursor._do_get_result()
    cursor._executed = read
