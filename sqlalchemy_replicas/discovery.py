"""Primary discovery: which of several candidate servers is the primary now.

The router's primary engine keeps one pool. Each new connection of that pool
goes to the candidate that says it is the primary (PostgreSQL: not in
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

from .connections import dialect_family, is_read_only_violation
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
    """

    def __init__(self, candidates: Sequence[URL], on_switch: Callable[[URL], None]) -> None:
        self._candidates = tuple(candidates)
        self._current = 0
        self._on_switch = on_switch
        self._lock = threading.Lock()

    @property
    def current_url(self) -> URL:
        """The candidate that last answered as the primary (at first: the
        configured primary)."""
        return self._candidates[self._current]

    def install(self, engine: Engine) -> None:
        """Make ``engine`` connect to the discovered primary.

        With several candidates, a write that a node refuses as read-only
        also empties the pool (the node was demoted), like a lost connection.
        """

        def connect(dialect: Dialect, record: ConnectionPoolEntry, cargs: Any, cparams: Any) -> Any:
            return self._connect(dialect, list(cargs), dict(cparams))

        event.listen(engine, "do_connect", connect)
        if len(self._candidates) > 1:
            event.listen(engine, "handle_error", _demoted_is_a_disconnect)

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
                problems.append(f"{_show(url)}: {' '.join(str(error).split())[:200]}")
                last_error = error
                continue
            try:
                writable = len(self._candidates) == 1 or _accepts_writes(dialect, connection)
            except dialect.loaded_dbapi.Error as error:
                connection.close()
                problems.append(f"{_show(url)}: {' '.join(str(error).split())[:200]}")
                last_error = error
                continue
            if not writable:
                connection.close()
                problems.append(f"{_show(url)}: read-only (a replica, or demoted)")
                continue
            if index != self._current:
                self._switch(index)
            return connection
        hint = (
            "if the primary failed over, list the servers it may move to in "
            "ReplicaRouter(primary_candidates=[...])"
            if len(self._candidates) == 1
            else "no candidate accepts writes; reads at 'eventual' or 'bounded' "
            "consistency still go to replicas"
        )
        raise PrimaryUnavailable(
            f"no reachable primary ({'; '.join(problems)}); {hint}"
        ) from last_error

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


def _demoted_is_a_disconnect(context: ExceptionContext) -> None:
    # A write refused as read-only on the primary: the node was demoted.
    # Treat it as a lost connection, so that SQLAlchemy empties the pool and
    # the next connection asks the candidates again.
    if context.sqlalchemy_exception is not None and is_read_only_violation(
        context.sqlalchemy_exception
    ):
        context.is_disconnect = True
        context.invalidate_pool_on_disconnect = True


def _show(url: URL) -> str:
    return url.render_as_string(hide_password=True)
