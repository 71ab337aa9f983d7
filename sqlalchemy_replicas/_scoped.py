"""A setting that holds for a block or a function call: ``with`` and decorator.

The value lives in a ContextVar stack, so it is isolated per thread and per
asyncio task, nests, and the outer value is back in force when the block ends.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Generic, ParamSpec, TypeVar, cast

__all__ = ["ScopedSetting"]

_P = ParamSpec("_P")
_R = TypeVar("_R")
_V = TypeVar("_V")


class ScopedSetting(Generic[_V]):
    """Base of ``consistency()`` and ``sticky()``: subclasses set ``value``."""

    #: Each subclass gives its own stack.
    _stack: ContextVar[tuple[Any, ...]]

    def __init__(self, value: _V) -> None:
        self.value = value

    @classmethod
    def current(cls) -> _V | None:
        """The innermost value in force here, or None."""
        stack = cls._stack.get()
        if not stack:
            return None
        value: _V = stack[-1]  # (no cast(): a call, on every statement's path)
        return value

    def __enter__(self) -> _V:
        self._stack.set((*self._stack.get(), self.value))
        return self.value

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.set(self._stack.get()[:-1])

    def __call__(self, function: Callable[_P, _R]) -> Callable[_P, _R]:
        """Decorate a sync or async function: the setting holds while it runs."""
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
