"""What every position backend offers."""

from __future__ import annotations

import abc
from typing import Any, Literal, Protocol, TypeAlias

__all__ = ["DBAPIRunner", "PositionBackend", "SQLRunner", "WaitResult"]

WaitResult: TypeAlias = Literal["reached", "timed_out", "stopped"]
"""How a wait ended: the position was applied; the time was up; or the
replica is not applying at all (replay paused, replication stopped), so
the wait returned at once."""


class SQLRunner(Protocol):
    """What backends run their queries on: a SQLAlchemy Connection, or a DBAPIRunner."""

    def exec_driver_sql(self, statement: str, parameters: Any = None, /) -> Any: ...


class DBAPIRunner:
    """Runs a backend's queries on a raw DBAPI connection (pool events have no
    SQLAlchemy Connection), with the small part of Connection's API they use."""

    def __init__(self, dbapi_connection: Any, info: dict[Any, Any] | None = None) -> None:
        self._dbapi_connection = dbapi_connection
        #: The pool record's info of the connection, when known (as
        #: ``Connection.info``).
        self.info = info

    def exec_driver_sql(self, statement: str, parameters: Any = None, /) -> _Rows:
        cursor = self._dbapi_connection.cursor()
        try:
            if parameters is None:
                cursor.execute(statement)
            else:
                cursor.execute(statement, parameters)
            keys = [column[0] for column in cursor.description or ()]
            return _Rows(list(cursor.fetchall()), keys)
        finally:
            cursor.close()


class _Rows:
    def __init__(self, rows: list[Any], keys: list[str] | None = None) -> None:
        self._rows = rows
        self._keys = keys or []

    def mappings(self) -> _Rows:
        return _Rows([dict(zip(self._keys, row, strict=True)) for row in self._rows])

    def all(self) -> list[Any]:
        return self._rows

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise ValueError(f"expected one row, got {len(self._rows)}")
        return self._rows[0]

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None


class PositionBackend(abc.ABC):
    """Positions of one database kind.

    Positions are opaque to callers: values of the backend's own type that
    they pass back to it. Text forms (for tokens and logs) round-trip through
    :meth:`format` and :meth:`parse`.
    """

    #: Short name stored with positions in causal tokens.
    kind: str = ""
    #: Whether a position only moves with a commit (a GTID names a
    #: transaction), so that a replica seen applying a later one has applied
    #: a commit. PostgreSQL's LSN also moves with WAL that is no commit (a
    #: checkpoint, the standby snapshot the background writer logs), which a
    #: standby delaying commits (``recovery_min_apply_delay``) applies at once.
    moves_only_with_commits: bool = True

    # -- pure --------------------------------------------------------------

    @abc.abstractmethod
    def parse(self, text: str) -> Any:
        """Parse a position's text form.

        :raises ValueError: when ``text`` is not a valid position.
        """

    @abc.abstractmethod
    def format(self, position: Any) -> str:
        """The text form of ``position``."""

    @abc.abstractmethod
    def reached(self, applied: Any, target: Any) -> bool:
        """True when a server that applied ``applied`` has applied ``target`` too."""

    @abc.abstractmethod
    def merge(self, a: Any, b: Any) -> Any:
        """The smallest position that has reached both ``a`` and ``b``."""

    #: What :meth:`behind` counts: ``"bytes"`` (of WAL) or ``"transactions"``.
    behind_unit: str = ""

    @abc.abstractmethod
    def behind(self, primary: Any, applied: Any) -> int:
        """How much of ``primary`` a server at ``applied`` has still to apply,
        in :attr:`behind_unit` (0 when it has it all)."""

    # -- I/O ---------------------------------------------------------------

    @abc.abstractmethod
    def capture(self, primary: SQLRunner) -> Any | None:
        """The position of the commit just made on ``primary`` (same connection)."""

    @abc.abstractmethod
    def current(self, primary: SQLRunner) -> Any | None:
        """Everything committed on ``primary`` so far (on any connection)."""

    @abc.abstractmethod
    def lineage(self, primary: SQLRunner) -> str:
        """Names the primary's history: positions from another history (another
        cluster, a rebuilt primary) cannot be compared with this one's."""

    # -- identity: is a server a replica of this primary? ------------------

    @abc.abstractmethod
    def primary_identity(self, primary: SQLRunner, host: str | None) -> Any:
        """What identifies the primary, asked on ``primary`` (reached at
        ``host``, the primary URL's host), for :meth:`not_a_replica`."""

    @abc.abstractmethod
    def replica_identity(self, replica: SQLRunner) -> Any:
        """What ``replica`` says of itself and of the server it replicates
        from, for :meth:`not_a_replica`. A server that will not say (a
        missing privilege) gives an identity that names the problem."""

    @abc.abstractmethod
    def not_a_replica(self, primary: Any, replica: Any) -> str | None:
        """Why a server with identity ``replica`` is not a replica of the
        primary with identity ``primary`` (pure), or None when it is one."""

    @abc.abstractmethod
    def applied(self, replica: SQLRunner) -> Any | None:
        """The position ``replica`` has applied, or None when it cannot tell."""

    def applied_with_age(self, replica: SQLRunner) -> tuple[Any | None, float | None]:
        """:meth:`applied`, and in the same query, when the server can tell to
        a fraction of a second, how many seconds ago the last transaction it
        applied was committed on the primary (None when it cannot: the
        default). The lag monitor's check; one round trip."""
        return self.applied(replica), None

    @abc.abstractmethod
    def wait(self, replica: SQLRunner, target: Any, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``replica`` to apply ``target``.

        Waits on the server (no client-side sleeping, so it never blocks an
        asyncio event loop); returns whether ``target`` was reached.
        """

    def wait_applying(self, replica: SQLRunner, target: Any, timeout: float) -> WaitResult:
        """:meth:`wait`, but returning ``"stopped"`` at once, in the same round
        trip, when ``replica`` has not applied ``target`` and is not applying
        at all (replay paused, replication stopped): waiting on it would only
        burn the read's budget, which the next replica can use. The default
        cannot tell, and waits."""
        return "reached" if self.wait(replica, target, timeout) else "timed_out"
