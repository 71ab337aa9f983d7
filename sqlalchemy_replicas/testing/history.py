"""What a consistency check records: operations, faults, and where reads ran.

A :class:`History` is the complete record of a run: every operation a
client performed, with its real invoke and completion times, what it wrote
or read, its outcome, and the server that served it; and every fault the
nemesis injected, with when it began and was healed. The checker
(:mod:`.checker`) judges a history and nothing else, so a history can be
built by hand in tests.

:class:`ServerRecorder` learns which server served a read from the
engines' own events, not from what the router meant to do.

Does no I/O except in :class:`ServerRecorder`'s connect listener (one
identity query per new pooled connection).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from sqlalchemy import event
from sqlalchemy.engine import Engine

__all__ = [
    "Fault",
    "History",
    "Op",
    "OpKind",
    "Outcome",
    "ServerRecorder",
    "server_identity",
]

OpKind: TypeAlias = Literal["insert", "update", "read", "increment", "read_counter"]
"""What an operation did: write a key (``insert``/``update``), read one
(``read``), add 1 to a counter (``increment``), or read a counter."""

Outcome: TypeAlias = Literal["ok", "fail", "unknown"]
"""``ok``: acknowledged. ``fail``: certainly had no effect (it failed before
commit). ``unknown``: the commit was sent and the answer lost: it may or may
not have taken effect."""


@dataclass(frozen=True, slots=True)
class Op:
    """One completed operation of one client.

    Times are ``time.monotonic()`` seconds (all clients share one clock);
    ``invoke_wall`` is the wall-clock time of ``invoke``, for reports.

    :ivar id: unique, increasing in invoke order.
    :ivar client: the client's name.
    :ivar causal_domain: commits in one domain are seen by ``read_your_writes``
        reads of the same domain when ``scope_kind`` is ``"router"`` (one
        domain per router).
    :ivar scope: the id of the ``causal_context()`` the operation ran in; a
        monotonic scope is one such context.
    :ivar scope_kind: the router's causal scope, ``"session"`` or ``"router"``.
    :ivar level: the consistency level in force.
    :ivar max_lag: the bound of a ``bounded`` read (else None).
    :ivar kind: see :data:`OpKind`.
    :ivar key: the key (register) or counter name.
    :ivar own: whether the key belongs to this client.
    :ivar version: the version written (``insert``/``update``), else None.
    :ivar value: what a read returned: a version (None: no such row) or a counter.
    :ivar rowcount: rows an ``update`` changed, when the schema says.
    :ivar outcome: see :data:`Outcome`.
    :ivar error: the error's type and first line, if any.
    :ivar server: the node that served a read (``primary``, ``replica1``, ...).
    :ivar server_identity: the identity that server reported on connect.
    """

    id: int
    client: str
    kind: OpKind
    key: str
    invoke: float
    complete: float
    outcome: Outcome
    level: str = "read_your_writes"
    max_lag: float | None = None
    own: bool = True
    version: int | None = None
    value: int | None = None
    rowcount: int | None = None
    error: str | None = None
    server: str | None = None
    server_identity: str | None = None
    causal_domain: str = "default"
    scope: int = 0
    scope_kind: Literal["session", "router"] = "session"
    invoke_wall: float = 0.0

    @property
    def is_write(self) -> bool:
        """Whether the operation writes (a register or a counter)."""
        return self.kind in ("insert", "update", "increment")

    @property
    def is_read(self) -> bool:
        """Whether the operation reads (a register or a counter)."""
        return self.kind in ("read", "read_counter")


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault the nemesis injected, from ``start`` until healed at ``end``.

    :ivar kind: e.g. ``pause_replay``, ``kill_replica``, ``restart_primary``.
    :ivar target: the server it hit (``primary``, ``replica1``, ...).
    :ivar start: monotonic time it was in force (after injecting returned).
    :ivar end: monotonic time healing returned (``inf``: never healed).
    :ivar error: what went wrong injecting or healing it, if anything.
    """

    kind: str
    target: str
    start: float
    end: float
    error: str | None = None

    def overlaps(self, begin: float, finish: float) -> bool:
        """Whether the fault was (maybe) in force at some time in [begin, finish].

        Injecting takes time, so a fault counts from its injection's start."""
        return self.start <= finish and begin <= self.end

    @property
    def label(self) -> str:
        """``kind(target)``, as reports show it."""
        return f"{self.kind}({self.target})"


@dataclass
class History:
    """The record of a run, shared by the clients and the nemesis (thread-safe).

    :ivar ops: completed operations, in completion order.
    :ivar faults: injected faults, in injection order.
    :ivar errors: errors raised to clients, by ``kind: error type``.
    """

    ops: list[Op] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)
    _scopes: Iterator[int] = field(default_factory=lambda: itertools.count(1), repr=False)

    def next_id(self) -> int:
        """A new operation id; take it when the operation is invoked."""
        with self._lock:
            return next(self._ids)

    def next_scope(self) -> int:
        """A new causal scope id."""
        with self._lock:
            return next(self._scopes)

    def record(self, op: Op) -> None:
        """Add a completed operation."""
        with self._lock:
            self.ops.append(op)

    def add_fault(self, fault: Fault) -> None:
        """Add an injected (and healed) fault."""
        with self._lock:
            self.faults.append(fault)

    def sorted_ops(self) -> list[Op]:
        """The operations in invoke order."""
        with self._lock:
            return sorted(self.ops, key=lambda op: op.id)


# -- which server served a read ------------------------------------------------------

_IDENTITY_KEY = "sqlalchemy_replicas.testing.identity"


@dataclass
class _Served:
    """Where the statements of one read ran (the last compiled one wins)."""

    server: str | None = None
    identity: str | None = None


_current: ContextVar[_Served | None] = ContextVar(
    "sqlalchemy_replicas.testing.served", default=None
)


def server_identity(dbapi_connection: Any, dialect_name: str) -> str | None:
    """Ask a server who it is, on a raw DBAPI connection; None if it cannot say.

    PostgreSQL: ``<system identifier>:<port>`` (a streaming replica shares
    its primary's system identifier, so a server from another cluster on a
    reused port shows up); MariaDB/MySQL: ``<server_id>:<port>``. The
    connection is left with no transaction open.
    """
    queries: tuple[str, ...]
    if dialect_name == "postgresql":
        queries = (
            "SELECT (SELECT system_identifier FROM pg_control_system())::text"
            " || ':' || inet_server_port()",
            "SELECT '?:' || inet_server_port()",  # pg_control_system() may be denied
        )
    elif dialect_name in ("mysql", "mariadb"):
        queries = ("SELECT CONCAT(@@server_id, ':', @@port)",)
    else:
        return None
    for sql in queries:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(sql)
            row = cursor.fetchone()
            return None if row is None else str(row[0])
        except Exception:
            continue
        finally:
            cursor.close()
            # Under a non-autocommit driver the query opened a transaction
            # (or failed inside one): end it before the pool hands it out.
            with contextlib.suppress(Exception):  # autocommit: nothing to end
                dbapi_connection.rollback()
    return None


class ServerRecorder:
    """Records which server ran each read, from the engines' events.

    Installed on a set of named sync engines (``router.primary_target`` and
    ``router.replica_targets``' ``sync_engine``; async engines' included).
    On each new pooled connection it asks the server its identity
    (:func:`server_identity`). Inside :meth:`reading`, it notes the node and
    identity of every compiled statement sent (the router's own position
    queries and waits are driver-level SQL, so they do not count); the last
    one is the read's server.

    :param engines: ``(node name, sync engine)`` pairs.
    """

    def __init__(self, engines: Sequence[tuple[str, Engine]]) -> None:
        self._listeners: list[tuple[Engine, str, Any]] = []
        for name, engine in engines:
            self._listen(engine, "connect", self._on_connect(engine))
            self._listen(engine, "before_cursor_execute", self._on_execute(name))

    def _listen(self, engine: Engine, name: str, fn: Any) -> None:
        event.listen(engine, name, fn)
        self._listeners.append((engine, name, fn))

    def remove(self) -> None:
        """Remove every listener this recorder installed."""
        for engine, name, fn in self._listeners:
            event.remove(engine, name, fn)
        self._listeners.clear()

    @staticmethod
    @contextmanager
    def reading() -> Iterator[_Served]:
        """Note where the statements of the enclosed read run (this thread or
        task only); yields the object whose ``server``/``identity`` say."""
        served = _Served()
        reset = _current.set(served)
        try:
            yield served
        finally:
            _current.reset(reset)

    @staticmethod
    def _on_connect(engine: Engine) -> Any:
        dialect_name = engine.dialect.name

        def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
            connection_record.info[_IDENTITY_KEY] = server_identity(dbapi_connection, dialect_name)

        return on_connect

    @staticmethod
    def _on_execute(node: str) -> Any:
        def on_execute(
            conn: Any,
            cursor: Any,
            statement: str,
            parameters: Any,
            context: Any,
            executemany: bool,
        ) -> None:
            served = _current.get()
            if served is None or context is None or context.compiled is None:
                return
            served.server = node
            served.identity = conn.info.get(_IDENTITY_KEY)

        return on_execute


def now() -> tuple[float, float]:
    """``(time.monotonic(), time.time())``: an invoke time and its wall-clock twin."""
    return time.monotonic(), time.time()
