"""Recording which server each statement ran on."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext

from ..pipelining import WAIT_OBSERVERS, WaitNotReached
from ..router import ReplicaRouter

__all__ = ["ExecutedStatement", "StatementLog"]


@dataclass(frozen=True, slots=True)
class ExecutedStatement:
    """One statement as sent to a server."""

    node: str
    sql: str


class StatementLog:
    """Records, per server, the SQL a router's engines send while active.

    The truth is taken from the engines' ``before_cursor_execute`` events,
    so it shows where statements really ran, not where the router meant
    them to. Causal waits sent ahead of a read, in its round trip (see
    :mod:`sqlalchemy_replicas.pipelining`), bypass the engines' events: they
    are recorded just before their read. A read sent behind a wait that did
    not reach its position is taken out again: its rows were discarded, it
    served nothing::

        with StatementLog(router) as log:
            session.scalars(select(User)).all()
        assert log.counts()["primary"] == 0

    :param router: the router whose primary and replicas to watch.
    :param on_statement: called with each statement as it is recorded.
    """

    def __init__(
        self,
        router: ReplicaRouter[Any],
        *,
        on_statement: Callable[[ExecutedStatement], None] | None = None,
    ) -> None:
        self._targets = (router.primary_target, *router.replica_targets)
        self._on_statement = on_statement
        self._lock = threading.Lock()
        self._listeners: list[tuple[Engine, Callable[..., None]]] = []
        self._errors: list[tuple[Engine, Callable[[ExceptionContext], None]]] = []
        self.statements: list[ExecutedStatement] = []

    def counts(self) -> Counter[str]:
        """Number of statements per node name (``primary``, ``replica1``, ...)."""
        with self._lock:
            return Counter(s.node for s in self.statements)

    def clear(self) -> None:
        """Forget what was recorded so far."""
        with self._lock:
            self.statements.clear()

    def __enter__(self) -> StatementLog:
        for target in self._targets:
            listener = self._listener(target.name)
            event.listen(target.sync_engine, "before_cursor_execute", listener)
            self._listeners.append((target.sync_engine, listener))
            discard = self._discarder(target.name)
            event.listen(target.sync_engine, "handle_error", discard)
            self._errors.append((target.sync_engine, discard))
        WAIT_OBSERVERS.append(self._record_wait)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for engine, listener in self._listeners:
            event.remove(engine, "before_cursor_execute", listener)
        self._listeners.clear()
        for engine, discard in self._errors:
            event.remove(engine, "handle_error", discard)
        self._errors.clear()
        if self._record_wait in WAIT_OBSERVERS:
            WAIT_OBSERVERS.remove(self._record_wait)

    def _record_wait(self, engine: Engine, statement: str) -> None:
        """A wait sent ahead of a read on ``engine``: recorded before that
        read, which its engine's cursor event recorded already."""
        node = next((t.name for t in self._targets if t.sync_engine is engine), None)
        if node is None:
            return
        executed = ExecutedStatement(node, statement)
        with self._lock:
            index = next(
                (
                    i
                    for i in range(len(self.statements) - 1, -1, -1)
                    if self.statements[i].node == node
                ),
                len(self.statements),
            )
            self.statements.insert(index, executed)
        if self._on_statement is not None:
            self._on_statement(executed)

    def _discarder(self, node: str) -> Callable[[ExceptionContext], None]:
        def discard(context: ExceptionContext) -> None:
            if not isinstance(context.original_exception, WaitNotReached):
                return
            with self._lock:  # the newest such statement on that node is the one
                for index in range(len(self.statements) - 1, -1, -1):
                    executed = self.statements[index]
                    if executed.node == node and executed.sql == context.statement:
                        del self.statements[index]
                        return

        return discard

    def _listener(self, node: str) -> Callable[..., None]:
        def record(
            conn: Connection, cursor: Any, statement: str, *args: Any, **kwargs: Any
        ) -> None:
            executed = ExecutedStatement(node, statement)
            with self._lock:
                self.statements.append(executed)
            if self._on_statement is not None:
                self._on_statement(executed)

        return record
