"""Primary discovery: which of several candidate servers is the primary now.

The router's primary engine keeps one pool. Given candidates, each new
connection of that pool goes to the candidate that says it is the primary (PostgreSQL: not in
recovery; MariaDB/MySQL: not ``read_only``), asked on the new connection
itself, so a connection is never handed out to a node that would refuse
writes. After a failover the pool's connections to the old primary break (or,
on a node demoted to read-only, are refused a write): the pool is emptied,
and the next connection finds the new primary.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import URL, Dialect, Engine
from sqlalchemy.engine.interfaces import ExceptionContext
from sqlalchemy.pool import ConnectionPoolEntry

from ._listeners import Listeners
from .connections import connect_dialect, dialect_family, is_read_only_violation
from .exc import PrimaryUnavailable

__all__ = ["PrimaryDiscovery"]

logger = logging.getLogger("sqlalchemy_replicas.discovery")

# Returns a true first column when the server accepts writes.
_ROLE_SQL: Final = {
    "postgresql": "SELECT NOT pg_is_in_recovery()",
    "mysql": "SELECT @@global.read_only = 0",
}


class PrimaryDiscovery:
    """Finds the primary among ``candidates`` for each new connection.

    :param candidates: the URLs the primary may be at, the configured primary
        first. With one candidate nothing is discovered or asked; a failed
        connect is still reported as :class:`PrimaryUnavailable`.
    :param on_switch: called with the new primary's URL when it changes.
        The engines' listeners hold this object, and through it
        ``on_switch``: give one that does not keep its owner alive.
    """

    def __init__(self, candidates: Sequence[URL], on_switch: Callable[[URL], None]) -> None:
        self._candidates = tuple(candidates)
        self._current = 0
        self._on_switch = on_switch
        self._lock = threading.Lock()

    @property
    def candidates(self) -> tuple[URL, ...]:
        """Every URL the primary may be at, the configured primary first."""
        return self._candidates

    @property
    def current_url(self) -> URL:
        """The candidate that last answered as the primary (at first: the
        configured primary)."""
        return self._candidates[self._current]

    def install(self, engine: Engine, listeners: Listeners | None = None) -> None:
        """Make ``engine`` connect to the discovered primary, and report a
        primary that cannot be connected to as :class:`PrimaryUnavailable`.

        With one candidate the engine connects as usual (``do_connect``
        listeners of the application, e.g. one that sets an IAM token, work
        unchanged). With several, a listener of ours opens each connection
        on the candidate that accepts writes, with the connect arguments the
        application's earlier listeners left; and a write that a node
        refuses as read-only empties the pool (the node was demoted), like a
        lost connection.

        :param listeners: records the listeners, so that
            ``listeners.remove_all()`` removes them.
        """
        listen = event.listen if listeners is None else listeners.listen
        listen(engine, "handle_error", self._on_error)
        if len(self._candidates) > 1:

            def connect(
                dialect: Dialect, record: ConnectionPoolEntry | None, cargs: Any, cparams: Any
            ) -> Any:
                cparams = dict(cparams)
                # The lag monitor's connections: its sync dialect and timeouts.
                dialect = connect_dialect(dialect, record, cparams)
                return self._connect(dialect, list(cargs), cparams)

            listen(engine, "do_connect", connect)

    def _on_error(self, context: ExceptionContext) -> BaseException | None:
        if context.connection is None and not context.is_pre_ping:
            # No connection could be opened (a failed pre-ping reconnects by itself).
            url = self._candidates[self._current]
            return self._unavailable([_problem(url, context.original_exception)])
        if len(self._candidates) > 1 and is_read_only_violation(context.sqlalchemy_exception):
            # A write refused as read-only on the primary: the node was
            # demoted. As a lost connection, it makes SQLAlchemy empty the
            # pool, and the next connection asks the candidates again.
            context.is_disconnect = True
            context.invalidate_pool_on_disconnect = True
        return None

    def _connect(self, dialect: Dialect, cargs: list[Any], cparams: dict[str, Any]) -> Any:
        start = self._current
        order = [start, *(i for i in range(len(self._candidates)) if i != start)]
        problems: list[str] = []
        last_error: BaseException | None = None
        for index in order:
            url = self._candidates[index]
            candidate_cargs, candidate_cparams = dialect.create_connect_args(url)
            try:
                connection = dialect.connect(
                    *(candidate_cargs or cargs), **{**cparams, **candidate_cparams}
                )
            except dialect.loaded_dbapi.Error as error:
                problems.append(_problem(url, error))
                last_error = error
                continue
            try:
                writable = _accepts_writes(dialect, connection)
            except dialect.loaded_dbapi.Error as error:
                connection.close()
                problems.append(_problem(url, error))
                last_error = error
                continue
            if not writable:
                connection.close()
                problems.append(f"{_show(url)}: read-only (a replica, or demoted)")
                continue
            if index != self._current:
                self._switch(index)
            return connection
        raise self._unavailable(problems) from last_error

    def _unavailable(self, problems: list[str]) -> PrimaryUnavailable:
        hint = (
            "if the primary failed over, list the servers it may move to in "
            "ReplicaRouter(primary_candidates=[...])"
            if len(self._candidates) == 1
            else "no candidate accepts writes"
        )
        return PrimaryUnavailable(
            f"no reachable primary ({'; '.join(problems)}); {hint}; reads at 'eventual' "
            "or 'bounded' consistency still go to replicas while their lag, which grows from "
            "the primary's last answer, is within bounds"
        )

    def _switch(self, index: int) -> None:
        with self._lock:
            old, self._current = self._current, index
        logger.warning(
            "the primary moved: %s -> %s",
            _show(self._candidates[old]),
            _show(self._candidates[index]),
        )
        self._on_switch(self._candidates[index])


def _accepts_writes(dialect: Dialect, dbapi_connection: Any) -> bool:
    sql = _ROLE_SQL.get(dialect_family(dialect))
    if sql is None:
        return True
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql)
        row = cursor.fetchone()
    finally:
        cursor.close()
    # End the transaction the question opened (the pool starts clean).
    dbapi_connection.rollback()
    return bool(row[0])


def _problem(url: URL, error: BaseException | None) -> str:
    return f"{_show(url)}: {' '.join(str(error).split())[:200]}"


def _show(url: URL) -> str:
    return url.render_as_string(hide_password=True)
