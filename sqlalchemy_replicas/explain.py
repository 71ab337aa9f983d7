"""``explain()``: where each statement of a block went, and why.

::

    with sr.explain() as log:
        view(request)
    assert log.on_replicas(), str(log)

Each statement a :class:`~sqlalchemy_replicas.RoutingSession` routes inside
the block (in this thread or asyncio task) is appended to ``log`` as an
:class:`ExplainEntry`. Blocks nest: a statement is recorded in every
enclosing block's log. With no block active, the cost is one ContextVar
lookup per statement.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, overload

from ._scoped import ScopedSetting
from .consistency import ConsistencyLevel
from .stats import ReasonCode, RerunCause, TargetKind, WaitOutcome

__all__ = ["ExplainEntry", "ExplainLog", "ExplainRerun", "ExplainWait", "explain"]

#: Longest statement text kept in an entry (whitespace collapsed).
STATEMENT_CHARS: Final = 200


@dataclass(frozen=True, slots=True)
class ExplainWait:
    """A causal wait: the read waited for ``replica`` to apply ``position``.

    :ivar replica: the replica waited on.
    :ivar position: the position waited for, as text (PostgreSQL LSN such as
        ``0/3000148``, MariaDB GTID set such as ``0-1-42``).
    :ivar seconds: how long the wait took.
    :ivar outcome: ``reached``, ``timed_out`` or ``failed`` (the wait raised,
        or the replica refused it at once: replay paused).
    """

    replica: str
    position: str
    seconds: float
    outcome: WaitOutcome

    def __str__(self) -> str:
        millis = self.seconds * 1000
        return f"waited {millis:.1f} ms on {self.replica} for {self.position}: {self.outcome}"


@dataclass(frozen=True, slots=True)
class ExplainRerun:
    """A statement that failed on ``replica`` and ran again elsewhere.

    :ivar replica: where it ran first.
    :ivar cause: why it ran again (:data:`~sqlalchemy_replicas.stats.RerunCause`).
    :ivar detail: the human-readable explanation.
    """

    replica: str
    cause: RerunCause
    detail: str

    def __str__(self) -> str:
        return f"rerun: {self.replica} {self.cause} ({self.detail})"


@dataclass(frozen=True, slots=True)
class ExplainEntry:
    """One routed statement.

    :ivar statement: the SQL, whitespace collapsed and cut to 200 characters,
        or ``"flush"`` for the connection a flush writes on.
    :ivar target: the server that ran it: ``"primary"`` or a replica's name.
    :ivar reason: why, as a stable code (:data:`~sqlalchemy_replicas.stats.ReasonCode`).
    :ivar reason_text: why, in words (as in the DEBUG log).
    :ivar level: the consistency level in force.
    :ivar waits: the causal waits this statement made, usually none: one
        per replica waited on, all within one ``wait_timeout`` (a replica
        that refused at once leaves the rest to the next).
    :ivar reruns: where it ran before ``target`` and why it could not stay there.
    """

    statement: str
    target: str
    reason: ReasonCode
    reason_text: str
    level: ConsistencyLevel
    waits: tuple[ExplainWait, ...] = ()
    reruns: tuple[ExplainRerun, ...] = ()

    @property
    def target_kind(self) -> TargetKind:
        """``"primary"`` or ``"replica"``."""
        return "primary" if self.target == "primary" else "replica"

    @property
    def on_replica(self) -> bool:
        """Whether a replica ran it."""
        return self.target != "primary"

    @property
    def wait(self) -> ExplainWait | None:
        """The last causal wait, or None."""
        return self.waits[-1] if self.waits else None

    def __str__(self) -> str:
        parts = [f"{self.target} [{self.level}] {self.reason}: {self.reason_text}"]
        parts.extend(str(wait) for wait in self.waits)
        parts.extend(str(rerun) for rerun in self.reruns)
        return f"{self.statement}\n    -> " + "; ".join(parts)


class ExplainLog(Sequence[ExplainEntry]):
    """The statements of an ``explain()`` block, in order: a read-only
    sequence of :class:`ExplainEntry`, with helpers for tests."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Sequence[ExplainEntry] = ()) -> None:
        self._entries: list[ExplainEntry] = list(entries)

    def append(self, entry: ExplainEntry) -> None:
        """Record ``entry`` (the session does; tests building logs may too)."""
        self._entries.append(entry)

    def clear(self) -> None:
        """Forget the entries so far (the block goes on recording)."""
        self._entries.clear()

    @overload
    def __getitem__(self, index: int) -> ExplainEntry: ...
    @overload
    def __getitem__(self, index: slice) -> ExplainLog: ...
    def __getitem__(self, index: int | slice) -> ExplainEntry | ExplainLog:
        if isinstance(index, slice):
            return ExplainLog(self._entries[index])
        return self._entries[index]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ExplainEntry]:
        return iter(self._entries)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ExplainLog):
            return self._entries == other._entries
        if isinstance(other, list):
            return self._entries == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def targets(self) -> list[str]:
        """The server of each statement, in order: ``["primary", "replica1"]``."""
        return [entry.target for entry in self._entries]

    def reasons(self) -> list[ReasonCode]:
        """The reason code of each statement, in order."""
        return [entry.reason for entry in self._entries]

    def on_replicas(self) -> ExplainLog:
        """The statements a replica ran."""
        return ExplainLog([entry for entry in self._entries if entry.on_replica])

    def on_primary(self) -> ExplainLog:
        """The statements the primary ran."""
        return ExplainLog([entry for entry in self._entries if not entry.on_replica])

    def waited(self) -> ExplainLog:
        """The statements that made a causal wait."""
        return ExplainLog([entry for entry in self._entries if entry.waits])

    def rerun(self) -> ExplainLog:
        """The statements that ran again elsewhere after a replica could not serve them."""
        return ExplainLog([entry for entry in self._entries if entry.reruns])

    def matching(self, text: str) -> ExplainLog:
        """The statements whose SQL contains ``text`` (case-insensitive)."""
        needle = text.lower()
        return ExplainLog([entry for entry in self._entries if needle in entry.statement.lower()])

    def __str__(self) -> str:
        if not self._entries:
            return "explain: no statement routed"
        lines = [f"explain: {len(self._entries)} statement(s)"]
        lines.extend(f"{i}. {entry}" for i, entry in enumerate(self._entries, start=1))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ExplainLog({self._entries!r})"


class explain(ScopedSetting[ExplainLog]):  # used like a function
    """Record where each statement of a block goes, and why.

    ::

        with sr.explain() as log:
            session.scalars(select(User)).all()
        assert log.targets() == ["replica1"], log

    As a decorator of sync and async functions, each call's statements are
    appended to the decorator's :attr:`log`::

        explained = sr.explain()

        @explained
        def view(): ...

        view()
        print(explained.log)

    Isolated per thread and per asyncio task (a ContextVar, as for
    ``consistency()``); nested blocks each get the statements run in them.

    :param log: an :class:`ExplainLog` to append to (default: a new one).
    """

    _stack: ContextVar[tuple[Any, ...]] = ContextVar("sqlalchemy_replicas.explain", default=())

    def __init__(self, log: ExplainLog | None = None) -> None:
        super().__init__(ExplainLog() if log is None else log)

    @property
    def log(self) -> ExplainLog:
        """The entries recorded by this block or decorated function."""
        return self.value

    def __repr__(self) -> str:
        return f"explain({len(self.value)} entries)"


#: The active logs, outermost first (empty when no explain() is active).
active_logs: Final = explain._stack.get


def short_sql(statement: Any, dialect: Any) -> str:
    """``statement``'s SQL, compiled for ``dialect``, whitespace collapsed and cut."""
    try:
        text = str(statement.compile(dialect=dialect))
    except Exception:  # a description must never fail a statement
        text = str(getattr(statement, "__visit_name__", type(statement).__name__)).upper()
    text = " ".join(text.split())
    return text if len(text) <= STATEMENT_CHARS else text[: STATEMENT_CHARS - 3] + "..."
