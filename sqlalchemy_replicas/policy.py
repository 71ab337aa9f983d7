"""Routing policy: primary or replica for one statement.

Pure decision code, no I/O: a function of the statement's classification,
the options in force and the session's transaction state. Which replica,
and whether to wait for it, is the plan's (:mod:`sqlalchemy_replicas.plan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from .classify import Classification
from .consistency import ConsistencyLevel
from .stats import Reason

__all__ = ["Decision", "decide"]


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a statement goes, and why.

    :ivar to_primary: True for the primary, False for a replica.
    :ivar pins: True when the statement writes or locks, so the rest of the
        transaction must follow it to the primary.
    :ivar reason: why: a stable code (for counters) and short
        human-readable text (for logs and ``explain()``).
    """

    to_primary: bool
    pins: bool
    reason: Reason


PINNED: Final = Decision(True, False, Reason("pinned", "this transaction already wrote or locked"))
SAVEPOINT: Final = Decision(True, True, Reason("savepoint", "inside a SAVEPOINT (begin_nested)"))
STRONG: Final = Decision(True, False, Reason("strong", "consistency='strong'"))
DECLARED_WRITE: Final = Decision(
    True, True, Reason("declared_write", "execution option read_only=False")
)
DECLARED_READ: Final = Decision(
    False, False, Reason("declared_read", "execution option read_only=True")
)
NO_REPLICAS: Final = Decision(True, False, Reason("no_replicas", "no replica configured"))


def decide(
    classification: Classification,
    *,
    level: ConsistencyLevel,
    read_only: bool | None,
    pinned: bool,
    in_savepoint: bool,
    has_replicas: bool,
) -> Decision:
    """Decide where one statement runs.

    :param classification: what the classifier proved about the statement.
    :param level: the consistency level in force for it.
    :param read_only: the statement's ``read_only`` execution option: True
        declares it safe on a replica, False sends it to the primary, None
        leaves it to the classifier.
    :param pinned: the session's transaction already sent a write there.
    :param in_savepoint: the session is inside ``begin_nested()``.
    :param has_replicas: the router has at least one replica.
    """
    if pinned:
        return PINNED
    if in_savepoint:
        # A savepoint only exists on a connection inside a transaction; replica
        # reads run without one, so everything in the savepoint stays together.
        return SAVEPOINT
    if level == "strong":
        return STRONG
    if read_only is False:
        return DECLARED_WRITE
    if not classification.is_read and read_only is None:
        return _decision("write", classification.reason)
    if not has_replicas:
        return NO_REPLICAS
    if not classification.is_read:
        return DECLARED_READ
    return _decision("read", classification.reason)


# The classifier's reasons are a finite set of texts (function names come
# from the code, not from data): one Decision each, not one per statement.
_DECISIONS: dict[tuple[str, str], Decision] = {}
_MAX_CACHED: Final = 1024


def _decision(code: Literal["read", "write"], text: str) -> Decision:
    """A read goes to a replica; a write goes to the primary and pins."""
    decision = _DECISIONS.get((code, text))
    if decision is None:
        write = code == "write"
        decision = Decision(write, write, Reason(code, text))
        if len(_DECISIONS) < _MAX_CACHED:
            _DECISIONS[code, text] = decision
    return decision
