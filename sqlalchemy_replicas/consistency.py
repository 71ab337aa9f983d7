"""Consistency levels.

The levels name how fresh a replica read must be (see docs/consistency.md).
"""

from __future__ import annotations

from typing import Final, Literal

from .exc import ConfigurationError

__all__ = ["LEVELS", "ConsistencyLevel", "validate_level"]

ConsistencyLevel = Literal["strong", "read_your_writes", "monotonic", "bounded", "eventual"]

LEVELS: Final[tuple[ConsistencyLevel, ...]] = (
    "strong",
    "read_your_writes",
    "monotonic",
    "bounded",
    "eventual",
)


def validate_level(value: object, *, argument: str) -> ConsistencyLevel:
    """Return ``value`` as a consistency level, or raise naming the valid ones.

    :param value: the level given by the user.
    :param argument: the argument's name, used in the error message.
    :raises ConfigurationError: when ``value`` is not one of :data:`LEVELS`.
    """
    for level in LEVELS:
        if value == level:
            return level
    raise ConfigurationError(
        f"{argument}={value!r} is not a consistency level; use one of: {', '.join(LEVELS)}"
    )
