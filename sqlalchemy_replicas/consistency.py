"""Consistency levels, and choosing one per block or per view.

``consistency()`` works as a context manager and as a decorator of sync and
async functions. The setting lives in a ContextVar, so it is isolated per
thread and per asyncio task, nests, and the outer setting is back in force
when the block ends.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from ._scoped import ScopedSetting
from .exc import ConfigurationError

__all__ = [
    "LEVELS",
    "CausalScopeKind",
    "ConsistencyLevel",
    "ConsistencySetting",
    "consistency",
    "current_consistency",
    "default_consistency",
    "validate_level",
]

ConsistencyLevel = Literal["strong", "read_your_writes", "monotonic", "bounded", "eventual"]

LEVELS: Final[tuple[ConsistencyLevel, ...]] = (
    "strong",
    "read_your_writes",
    "monotonic",
    "bounded",
    "eventual",
)


CausalScopeKind: TypeAlias = Literal["router", "session"]
"""Whose commits a ``read_your_writes`` or ``monotonic`` read must see:
``"router"`` (every commit acknowledged through the router, process-wide) or
``"session"`` (the session's own, plus its ``causal_context()`` and token)."""


def validate_causal_scope(value: object, *, argument: str) -> CausalScopeKind:
    """``value`` if it names a causal scope; else ConfigurationError naming ``argument``."""
    if value == "router":
        return "router"
    if value == "session":
        return "session"
    raise ConfigurationError(
        f"{argument}={value!r} is not a causal scope; use 'router' (every commit made "
        "through the router, the default) or 'session' (the session's own commits, plus "
        "causal_context() and its token)"
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


def validate_seconds(value: object, *, argument: str) -> float:
    """Return ``value`` as a duration in seconds, or raise naming the fix.

    :raises ConfigurationError: for a non-number, a bool, NaN, infinity or a
        negative number.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(
            f"{argument} must be a number of seconds, not {type(value).__name__}"
        )
    if not math.isfinite(value) or value < 0:
        raise ConfigurationError(
            f"{argument}={value!r} is invalid; give a finite number of seconds >= 0"
        )
    return float(value)


@dataclass(frozen=True, slots=True)
class ConsistencySetting:
    """A consistency level, with the lag bound for ``bounded`` (None: the router's)."""

    level: ConsistencyLevel
    max_lag: float | None = None


def current_consistency() -> ConsistencySetting | None:
    """The innermost ``consistency()`` in force here, or None."""
    return consistency.current()


class consistency(ScopedSetting[ConsistencySetting]):  # used like a function
    """Set the consistency level for a block or a function.

    ::

        with sr.consistency("strong"):
            ...

        @sr.consistency("bounded", max_lag=2.0)
        async def dashboard(): ...

    :param level: one of :data:`LEVELS`.
    :param max_lag: for ``bounded`` only: seconds a replica may lag (default:
        the router's ``max_lag``).
    :raises ConfigurationError: for an unknown level, or a bad or misplaced
        ``max_lag``, at once.

    A statement's own ``consistency`` execution option wins over this; this
    wins over per-table rules (``ReplicaRouter(rules=...)``), the session's
    default, :class:`default_consistency` and the router's default.
    Isolated per thread and per asyncio task; nests.
    """

    _stack: ContextVar[tuple[Any, ...]] = ContextVar("sqlalchemy_replicas.consistency", default=())

    def __init__(self, level: ConsistencyLevel, *, max_lag: float | None = None) -> None:
        checked = validate_level(level, argument="level")
        if max_lag is not None:
            if checked != "bounded":
                raise ConfigurationError(
                    f"max_lag applies to consistency('bounded') only, not to {checked!r}"
                )
            max_lag = validate_seconds(max_lag, argument="max_lag")
        super().__init__(ConsistencySetting(checked, max_lag))

    @property
    def setting(self) -> ConsistencySetting:
        """The level (and lag bound) this block or function sets."""
        return self.value

    def __repr__(self) -> str:
        extra = f", max_lag={self.value.max_lag}" if self.value.max_lag is not None else ""
        return f"consistency({self.value.level!r}{extra})"


class default_consistency(ScopedSetting[ConsistencyLevel]):  # used like a function
    """Set the default consistency level for a block or a function: what
    sessions use when nothing more specific says otherwise.

    Weaker than ``consistency()``: it is meant for a whole request or job (a
    middleware's default per HTTP method, say), where a view's decorator, a
    statement's option or a session created with its own ``consistency=``
    must still win::

        with sr.default_consistency("eventual"):   # around a GET request
            ...

    Precedence: statement > innermost ``consistency()`` > per-table rules >
    the session's own default > innermost ``default_consistency()`` > the
    router's default.

    :param level: one of :data:`LEVELS` (``bounded`` uses the router's ``max_lag``).
    :raises ConfigurationError: for an unknown level, at once.
    """

    _stack: ContextVar[tuple[Any, ...]] = ContextVar(
        "sqlalchemy_replicas.default_consistency", default=()
    )

    def __init__(self, level: ConsistencyLevel) -> None:
        super().__init__(validate_level(level, argument="level"))

    def __repr__(self) -> str:
        return f"default_consistency({self.value!r})"
