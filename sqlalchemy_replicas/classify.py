"""Statement classification: can the router prove a statement read-only?

Pure decision code, no I/O. A statement is a read only when the router can
prove it; everything else (including what it cannot classify) is a write and
goes to the primary.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from sqlalchemy.sql.selectable import Select

__all__ = ["Classification", "StatementKind", "classify"]


class StatementKind(enum.Enum):
    """Where a statement may run: ``READ`` on a replica, ``WRITE`` on the primary."""

    READ = "read"
    WRITE = "write"


@dataclass(frozen=True, slots=True)
class Classification:
    """The kind of a statement and a short human-readable reason for it."""

    kind: StatementKind
    reason: str

    @property
    def is_read(self) -> bool:
        """True when the statement may be served by a replica."""
        return self.kind is StatementKind.READ


# Preallocated: classification runs once per statement and must not allocate.
PLAIN_SELECT = Classification(StatementKind.READ, "plain SELECT")
LOCKING_SELECT = Classification(StatementKind.WRITE, "SELECT ... FOR UPDATE/SHARE takes row locks")
FLUSH = Classification(StatementKind.WRITE, "flush writes pending ORM changes")
NO_STATEMENT = Classification(
    StatementKind.WRITE, "no statement given (session.connection() or mapper lookup)"
)
NOT_PROVEN_READ = Classification(StatementKind.WRITE, "not provably read-only")


def classify(statement: Any, *, flushing: bool = False) -> Classification:
    """Classify ``statement`` as a read or a write.

    :param statement: the SQL construct passed to ``Session.get_bind`` as
        ``clause``, or ``None`` when there is none.
    :param flushing: True while the Session flushes its unit of work.
    :return: a :class:`Classification`; ``WRITE`` for anything that is not
        provably read-only.
    """
    if flushing:
        return FLUSH
    if statement is None:
        return NO_STATEMENT
    if isinstance(statement, Select):
        if statement._for_update_arg is not None:
            return LOCKING_SELECT
        return PLAIN_SELECT
    return NOT_PROVEN_READ
