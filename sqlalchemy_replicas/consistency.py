"""Consistency levels, and choosing one per block or per view.

``consistency()`` works as a context manager and as a decorator of sync and
async functions. The setting lives in a ContextVar, so it is isolated per
thread and per asyncio task, nests, and the outer setting is back in force
when the block ends.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, ParamSpec, TypeVar, cast

from .exc import ConfigurationError

__all__ = [
    "LEVELS",
    "ConsistencyLevel",
    "ConsistencySetting",
    "consistency",
    "current_consistency",
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

_P = ParamSpec("_P")
_R = TypeVar("_R")


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


_stack: ContextVar[tuple[ConsistencySetting, ...]] = ContextVar(
    "sqlalchemy_replicas.consistency", default=()
)


def current_consistency() -> ConsistencySetting | None:
    """The innermost ``consistency()`` in force here, or None."""
    stack = _stack.get()
    return stack[-1] if stack else None


class consistency:  # used like a function: @consistency("strong")
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
    wins over the session's and the router's defaults.
    """

    def __init__(self, level: ConsistencyLevel, *, max_lag: float | None = None) -> None:
        checked = validate_level(level, argument="level")
        if max_lag is not None:
            if checked != "bounded":
                raise ConfigurationError(
                    f"max_lag applies to consistency('bounded') only, not to {checked!r}"
                )
            max_lag = validate_seconds(max_lag, argument="max_lag")
        self.setting = ConsistencySetting(checked, max_lag)

    def __enter__(self) -> ConsistencySetting:
        _stack.set((*_stack.get(), self.setting))
        return self.setting

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _stack.set(_stack.get()[:-1])

    def __call__(self, function: Callable[_P, _R]) -> Callable[_P, _R]:
        """Decorate a sync or async function: the level holds while it runs."""
        if inspect.iscoroutinefunction(function):
            async_function = cast(Callable[_P, Awaitable[Any]], function)

            @functools.wraps(function)
            async def run_async(*args: _P.args, **kwargs: _P.kwargs) -> Any:
                with self:
                    return await async_function(*args, **kwargs)

            return cast(Callable[_P, _R], run_async)

        @functools.wraps(function)
        def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with self:
                return function(*args, **kwargs)

        return run

    def __repr__(self) -> str:
        extra = f", max_lag={self.setting.max_lag}" if self.setting.max_lag is not None else ""
        return f"consistency({self.setting.level!r}{extra})"
