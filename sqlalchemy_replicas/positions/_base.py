"""What every position backend offers."""

from __future__ import annotations

import abc
from typing import Any

from sqlalchemy.engine import Connection

__all__ = ["PositionBackend"]


class PositionBackend(abc.ABC):
    """Positions of one database kind.

    Positions are opaque to callers: values of the backend's own type that
    they pass back to it. Text forms (for tokens and logs) round-trip through
    :meth:`format` and :meth:`parse`.
    """

    #: Short name stored with positions in causal tokens.
    kind: str = ""

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

    # -- I/O ---------------------------------------------------------------

    @abc.abstractmethod
    def capture(self, primary: Connection) -> Any | None:
        """The position of the commit just made on ``primary`` (same connection)."""

    @abc.abstractmethod
    def applied(self, replica: Connection) -> Any | None:
        """The position ``replica`` has applied, or None when it cannot tell."""

    @abc.abstractmethod
    def wait(self, replica: Connection, target: Any, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``replica`` to apply ``target``.

        Waits on the server (no client-side sleeping, so it never blocks an
        asyncio event loop); returns whether ``target`` was reached.
        """
