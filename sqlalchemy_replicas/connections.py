"""Server-side guards on replica connections, recognising their refusals, and
private probe engines that connect as the routed engines do.

No I/O of its own: it installs listeners, builds engines and inspects
errors; the connections are opened by whoever uses those engines.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from ._listeners import Listeners
from .urls import SYNC_CONNECT_PARAMS, sync_url

if TYPE_CHECKING:
    from .targets import RoutedEngine

__all__ = [
    "MonitorConnect",
    "connect_dialect",
    "dialect_family",
    "install_monitor_connect",
    "install_replica_guard",
    "install_stale_connection_check",
    "is_read_only_violation",
    "is_recovery_conflict",
    "is_schema_behind",
    "probe_engine",
]

_READ_ONLY_SQL: Final = {
    "postgresql": "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "mysql": "SET SESSION TRANSACTION READ ONLY",
    "sqlite": "PRAGMA query_only = ON",
}
_GUARD_KEY: Final = "sqlalchemy_replicas.read_only"
#: ``record.info`` key: the connection left AUTOCOMMIT for a server-side cursor.
_STREAMING_KEY: Final = "sqlalchemy_replicas.streaming"
#: Families whose server-side cursors need a transaction: PostgreSQL's
#: DECLARE CURSOR is refused outside one (psycopg, psycopg2, asyncpg alike),
#: where MySQL's streaming cursors read an ordinary result.
_STREAMS_IN_TRANSACTION: Final = frozenset({"postgresql"})
_CONNECTED_AT_KEY: Final = "sqlalchemy_replicas.connected_at"

# PostgreSQL SQLSTATE read_only_sql_transaction; MySQL/MariaDB errors
# ER_OPTION_PREVENTS_STATEMENT (--read-only) and
# ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION; SQLite SQLITE_READONLY text.
_PG_READ_ONLY_SQLSTATE: Final = "25006"
_MYSQL_READ_ONLY_ERRNOS: Final = frozenset({1290, 1792})


def dialect_family(engine: Engine | Dialect) -> str:
    """``postgresql``, ``mysql`` (MySQL and MariaDB) or the dialect's own name."""
    name = (engine.dialect if isinstance(engine, Engine) else engine).name
    return "mysql" if name in ("mysql", "mariadb") else name


def install_replica_guard(engine: Engine, *, listeners: Listeners | None = None) -> None:
    """Make every connection of a replica engine's pool read-only at the
    server and AUTOCOMMIT.

    Read-only: a statement misclassified as a read fails on the replica
    instead of changing data there (which, on a MariaDB replica, would also
    break replication). AUTOCOMMIT: a replica read never holds a
    transaction, and so never an old snapshot (MariaDB's REPEATABLE READ),
    open between statements.

    Both are set once per DBAPI connection, at its first checkout after the
    guard is installed (so connections pooled earlier are covered), through
    the dialect, so that executions pay nothing per statement. Installing it
    twice on one engine is harmless.

    The engine also skips ROLLBACK on these connections (SQLAlchemy's
    ``skip_autocommit_rollback``): there is nothing to roll back, and a
    replica that died after a read had returned must not make the
    session's close raise.

    On PostgreSQL, a streamed read (``stream_results``, ``yield_per``)
    needs a transaction for its server-side cursor: the connection leaves
    AUTOCOMMIT for READ COMMITTED (each statement still sees everything
    applied when it starts, as in AUTOCOMMIT) from that read until it goes
    back to the pool, where the pool's reset rolls the read-only
    transaction back; its next checkout makes it AUTOCOMMIT again.

    :param listeners: records the listener and the settings, so that
        ``listeners.remove_all()`` leaves the engine as it was.
    """
    family = dialect_family(engine)
    sql = _READ_ONLY_SQL.get(family)
    dialect = engine.dialect
    streams_in_transaction = family in _STREAMS_IN_TRANSACTION
    _guard_dialect(dialect, streams_in_transaction)
    if listeners is not None:
        listeners.on_remove(lambda: _unguard_dialect(dialect))

    def guard(
        dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        # record.info lives exactly as long as the DBAPI connection.
        if record.info.get(_GUARD_KEY):
            if streams_in_transaction and record.info.pop(_STREAMING_KEY, False):
                # Back from a streamed read. The pool's reset rolled its
                # transaction back, unless the app turned reset off: then
                # this does (no round trip when there is none).
                dbapi_connection.rollback()
                dialect.set_isolation_level(dbapi_connection, "AUTOCOMMIT")
            return
        if sql is not None:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(sql)
            finally:
                cursor.close()
            # End the implicit transaction before switching to AUTOCOMMIT.
            dbapi_connection.commit()
        dialect.set_isolation_level(dbapi_connection, "AUTOCOMMIT")
        record.info[_GUARD_KEY] = True

    # On the pool, not the engine: engine-level listeners would make every
    # execution on it dispatch (empty) statement events.
    _listen_pool(listeners, engine, "checkout", guard)


@dataclass(slots=True)
class _GuardedDialect:
    """A replica dialect's own settings, kept while routers guard it."""

    users: int
    skip_autocommit_rollback: bool
    execution_ctx_cls: type[Any]


# Dialect -> its own settings, while one router or more guard it: several
# routers may share an application's engine, and the first one disposed must
# not take the settings back from under the others.
_GUARDED: Final[weakref.WeakKeyDictionary[Dialect, _GuardedDialect]] = weakref.WeakKeyDictionary()
_GUARDED_LOCK: Final = threading.Lock()


def _guard_dialect(dialect: Dialect, streams_in_transaction: bool) -> None:
    """Give ``dialect`` a replica's settings (see :func:`install_replica_guard`)."""
    with _GUARDED_LOCK:
        guarded = _GUARDED.get(dialect)
        if guarded is not None:
            guarded.users += 1
            return
        _GUARDED[dialect] = _GuardedDialect(
            1, dialect.skip_autocommit_rollback, dialect.execution_ctx_cls
        )
        dialect.skip_autocommit_rollback = True
        if streams_in_transaction:
            dialect.execution_ctx_cls = _streaming_in_transaction(dialect.execution_ctx_cls)


def _unguard_dialect(dialect: Dialect) -> None:
    """Undo one :func:`_guard_dialect`; the last one restores ``dialect``'s settings."""
    with _GUARDED_LOCK:
        guarded = _GUARDED.get(dialect)
        if guarded is None:
            return
        guarded.users -= 1
        if guarded.users == 0:
            del _GUARDED[dialect]
            dialect.skip_autocommit_rollback = guarded.skip_autocommit_rollback
            dialect.execution_ctx_cls = guarded.execution_ctx_cls


def _streaming_in_transaction(base: type[Any]) -> type[DefaultExecutionContext]:
    """``base`` (a dialect's execution context class), except that a
    server-side cursor first takes its connection out of AUTOCOMMIT (see
    :func:`install_replica_guard`)."""
    if getattr(base, "streams_in_transaction", False):
        return base  # the guard installed twice on one engine

    class StreamInTransaction(base):  # type: ignore[misc]
        streams_in_transaction = True

        def create_server_side_cursor(self) -> Any:
            proxied = self._dbapi_connection
            if not proxied.info.get(_STREAMING_KEY):
                # READ COMMITTED whatever the server's default: a later read
                # on this connection must see what a causal wait found applied.
                self.dialect.set_isolation_level(proxied.dbapi_connection, "READ COMMITTED")
                proxied.info[_STREAMING_KEY] = True
            return super().create_server_side_cursor()

    StreamInTransaction.__name__ = StreamInTransaction.__qualname__ = (
        f"StreamInTransaction_{base.__name__}"
    )
    return StreamInTransaction


def install_stale_connection_check(
    engine: Engine,
    down_since: Callable[[], float | None],
    *,
    listeners: Listeners | None = None,
) -> None:
    """Make a replica engine's pool drop the connections it opened before the
    replica last went down, when one is next checked out.

    A replica that died and came back leaves broken connections in the pool
    when nothing used the pool in between (the lag monitor saw it die, not
    a session). Without this check, the first read after the replica is
    readmitted would break on one of them and mark the replica down again.
    SQLAlchemy's ``InvalidatePoolError`` on checkout drops every connection
    opened before now and connects afresh, so this costs one reconnect.

    :param down_since: returns when (``time.monotonic()``) the replica last
        went down, or None if it never did.
    :param listeners: records the listeners, so that
        ``listeners.remove_all()`` removes them.
    """

    def stamp(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
        record.info[_CONNECTED_AT_KEY] = time.monotonic()

    def drop_stale(
        dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> None:
        went_down = down_since()
        if went_down is not None and record.info.get(_CONNECTED_AT_KEY, 0.0) < went_down:
            raise sa_exc.InvalidatePoolError("connection opened before the replica went down")

    _listen_pool(listeners, engine, "connect", stamp)
    # Before the read-only guard (insert=True): the guard's statements must
    # not run on a dead connection.
    _listen_pool(listeners, engine, "checkout", drop_stale, insert=True)


def _listen_pool(
    listeners: Listeners | None, engine: Engine, identifier: str, fn: Callable[..., Any], **kw: Any
) -> None:
    if listeners is None:
        event.listen(engine.pool, identifier, fn, **kw)
    else:
        listeners.listen_pool(engine, identifier, fn, **kw)


#: ``record.info`` key of a lag monitor's connection record: how to open it.
_MONITOR_KEY: Final = "sqlalchemy_replicas.monitor_connect"


@dataclass(frozen=True, slots=True)
class MonitorConnect:
    """How the lag monitor opens a connection through a routed engine's own
    connect path (its ``connect_args``, ``creator`` and ``do_connect``
    listeners, e.g. one that sets an IAM token), set on the monitor's
    connection record before it calls that engine's creator.

    :ivar dialect: the sync dialect that makes the DBAPI connection: the
        monitor runs its checks in plain threads, where an async driver
        cannot connect (it needs the application's event loop).
    :ivar timeouts: connect parameters that bound a connect to a server
        that never answers.
    :ivar renames: connect parameter names of the routed (async) driver ->
        the sync driver's name for the same thing (aiomysql ``db``, pymysql
        ``database``).
    """

    dialect: Dialect
    timeouts: Mapping[str, Any]
    renames: Mapping[str, str] = field(default_factory=dict)

    def mark(self, record: ConnectionPoolEntry) -> None:
        """Make the connection of ``record`` (the monitor's) open this way."""
        record.info[_MONITOR_KEY] = self


def connect_dialect(
    dialect: Dialect, record: ConnectionPoolEntry | None, cparams: dict[str, Any]
) -> Dialect:
    """The dialect that opens ``record``'s DBAPI connection in a
    ``do_connect`` listener: ``dialect``, or for the lag monitor's
    connections its sync dialect, with its timeouts added to ``cparams``."""
    how = None if record is None else record.info.get(_MONITOR_KEY)
    if not isinstance(how, MonitorConnect):
        return dialect
    for name, sync_name in how.renames.items():
        if name in cparams and sync_name not in cparams:
            cparams[sync_name] = cparams.pop(name)
    cparams.update(how.timeouts)
    return how.dialect


def install_monitor_connect(engine: Engine, listeners: Listeners) -> None:
    """Let the lag monitor connect through ``engine``'s own connect path
    (see :class:`MonitorConnect`).

    A ``do_connect`` listener that, for the monitor's connections, runs the
    engine's ``do_connect`` listeners that come after it itself (they may
    set credentials, or open the connection, as primary discovery does;
    those before it have run already) and then connects with the monitor's
    sync dialect and timeouts, so an async engine's listeners apply to the
    monitor's sync connections too. Other connections it leaves alone. An engine built with its
    own ``creator`` runs no ``do_connect`` listeners: its creator makes the
    monitor's connections (sync engines only; see ``monitor.py``).
    """

    def connect_for_monitor(
        dialect: Dialect, record: ConnectionPoolEntry | None, cargs: Any, cparams: Any
    ) -> Any:
        if record is None or _MONITOR_KEY not in record.info:
            return None
        after_this = False
        for listener in dialect.dispatch.do_connect:
            if not after_this:
                # The listeners before this one have run already.
                after_this = listener is connect_for_monitor
                continue
            connection = listener(dialect, record, cargs, cparams)
            if connection is not None:
                return connection
        return connect_dialect(dialect, record, cparams).connect(*cargs, **cparams)

    listeners.listen(engine, "do_connect", connect_for_monitor, insert=True)


def probe_engine(
    target: RoutedEngine,
    timeouts: Mapping[str, Any],
    *,
    install_discovery: Callable[[Engine], None] | None = None,
    **options: Any,
) -> Engine:
    """A private sync engine on ``target``'s server that connects exactly as
    the application's sessions do: through ``target``'s own connect path
    (its ``connect_args``, its ``creator``, its ``do_connect`` listeners,
    e.g. one that sets an IAM token), with the sync driver of its dialect
    and ``timeouts`` added to the connect parameters. The lag monitor's
    checks and the status command's probes use these.

    An async engine with its own ``async_creator`` cannot be used outside
    the application's event loop: then only its URL (through the sync
    driver) and ``timeouts`` are left (docs/failures.md). An engine with a
    sync ``creator`` of its own ignores ``timeouts`` (the caller's own
    deadline still bounds the wait).

    :param target: the routed engine (primary or replica) to reach.
    :param timeouts: connect parameters that bound a connect to a server
        that never answers (see :class:`MonitorConnect`).
    :param install_discovery: for the primary, the router's
        ``install_discovery``: the engine then connects to wherever the
        primary is now (``primary_candidates``).
    :param options: ``create_engine()`` keyword arguments (pool, isolation).
    """
    url = sync_url(target.sync_engine.url)
    if target.is_async and not _default_creator(target.sync_engine):
        engine = create_engine(url, connect_args=dict(timeouts), **options)
    else:
        # The sync dialect that opens the connections is this engine's,
        # which exists only once the creator is made.
        how: list[MonitorConnect] = []
        engine = create_engine(url, creator=_routed_creator(target, how), **options)
        renames = SYNC_CONNECT_PARAMS.get(target.sync_engine.url.get_driver_name(), {})
        how.append(MonitorConnect(engine.dialect, timeouts, renames))
    if install_discovery is not None:
        install_discovery(engine)
    return engine


def _routed_creator(
    target: RoutedEngine, how: list[MonitorConnect]
) -> Callable[[ConnectionPoolEntry], Any]:
    """A creator for a probe engine that connects as ``target``'s sessions
    do: through ``target``'s own creator, whose ``do_connect`` listeners
    include the router's (:func:`install_monitor_connect`), which open the
    probe's connections as ``how[0]`` says (the probe engine's sync
    dialect, the connect timeouts)."""
    routed = target.sync_engine

    def creator(record: ConnectionPoolEntry) -> Any:
        how[0].mark(record)
        return routed.pool._invoke_creator(record)

    return creator


def _default_creator(engine: Engine) -> bool:
    """True when ``engine`` connects with ``create_engine``'s own creator,
    the one that runs ``do_connect`` listeners (not a ``creator=`` or
    ``async_creator=`` of the application's)."""
    made = engine.pool._creator
    return getattr(made, "__module__", None) == "sqlalchemy.engine.create" and getattr(
        made, "__qualname__", ""
    ).startswith("create_engine.")


#: PostgreSQL cancels a standby's query that holds back replay (a lock, a
#: snapshot or a buffer pin the primary's changes need) with these SQLSTATEs;
#: a read-only AUTOCOMMIT read on a replica gets them for no other reason.
_PG_RECOVERY_CONFLICT_SQLSTATES: Final = frozenset({"40001", "40P01"})


def is_recovery_conflict(error: BaseException) -> bool:
    """True when a replica cancelled a read to let replay go on ("canceling
    statement due to conflict with recovery"): the replica is fine, the read
    just has to run elsewhere."""
    return (
        isinstance(error, sa_exc.DBAPIError)
        and getattr(error.orig, "sqlstate", None) in _PG_RECOVERY_CONFLICT_SQLSTATES
    )


def is_read_only_violation(error: BaseException | None) -> bool:
    """True when ``error`` is a server refusing to write on a read-only connection."""
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    orig = error.orig
    if getattr(orig, "sqlstate", None) == _PG_READ_ONLY_SQLSTATE:
        return True
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _MYSQL_READ_ONLY_ERRNOS:
        return True
    return "attempt to write a readonly database" in str(orig)


#: "No such table / column / function / schema / type": on a replica right
#: after a migration, the replica has not applied the DDL yet.
_PG_UNDEFINED_SQLSTATES: Final = frozenset({"42P01", "42703", "42883", "3F000", "42704"})
#: ER_NO_SUCH_TABLE, ER_BAD_FIELD_ERROR, ER_SP_DOES_NOT_EXIST.
_MYSQL_UNDEFINED_ERRNOS: Final = frozenset({1146, 1054, 1305})


def is_schema_behind(error: BaseException) -> bool:
    """True when a read failed because an object it names does not exist on
    the server (table, column, function, schema or type): on a replica,
    typically a migration it has not applied yet."""
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    orig = error.orig
    if getattr(orig, "sqlstate", None) in _PG_UNDEFINED_SQLSTATES:
        return True
    args: tuple[Any, ...] = getattr(orig, "args", ())
    return bool(args) and isinstance(args[0], int) and args[0] in _MYSQL_UNDEFINED_ERRNOS
