"""What a router attaches to engines, so that ``dispose()`` can take it all back (no I/O).

A router adds event listeners to the engines it routes to, also to engines
the application gave it and keeps using. Every listener goes through one
:class:`Listeners`, which removes them all again. Listeners that need the
router hold it weakly (:func:`weak_method`): an engine outlives its router
when the application keeps it, and SQLAlchemy may keep a dialect (and so
its ``handle_error`` and ``do_connect`` listeners) for the life of the
process once it reflected; a strong reference there would keep the router,
its engines and their pooled connections alive forever.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine

__all__ = ["Listeners", "weak_method"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


class Listeners:
    """Event listeners one owner added, and the settings it changed, so
    that :meth:`remove_all` leaves every target as it was.

    Pool listeners are recorded by their engine: ``engine.dispose()``
    replaces the pool (the new one inherits the listeners), so they are
    removed from whichever pool the engine has then.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._added: list[tuple[Engine, bool, str, Callable[..., Any]]] = []
        self._undo: list[Callable[[], None]] = []

    def listen(self, engine: Engine, identifier: str, fn: Callable[..., Any], **kw: Any) -> None:
        """``event.listen(engine, identifier, fn, **kw)``, recorded."""
        event.listen(engine, identifier, fn, **kw)
        with self._lock:
            self._added.append((engine, False, identifier, fn))

    def listen_pool(
        self, engine: Engine, identifier: str, fn: Callable[..., Any], **kw: Any
    ) -> None:
        """``event.listen(engine.pool, identifier, fn, **kw)``, recorded."""
        event.listen(engine.pool, identifier, fn, **kw)
        with self._lock:
            self._added.append((engine, True, identifier, fn))

    def on_remove(self, undo: Callable[[], None]) -> None:
        """Call ``undo`` (which restores a setting) in :meth:`remove_all`."""
        with self._lock:
            self._undo.append(undo)

    def remove_all(self) -> None:
        """Remove every recorded listener still in place and undo the
        settings, newest first. Safe to call more than once.

        Not from a finalizer: SQLAlchemy iterates listener lists without
        copying them, so a removal while a listener of the same list runs
        (which garbage collection can interrupt) would break that dispatch.
        """
        with self._lock:
            added, self._added = self._added, []
            undo, self._undo = self._undo, []
        for engine, on_pool, identifier, fn in reversed(added):
            target: Any = engine.pool if on_pool else engine
            if event.contains(target, identifier, fn):
                event.remove(target, identifier, fn)
        for restore in reversed(undo):
            restore()


def weak_method(method: Callable[_P, _R], default: _R) -> Callable[_P, _R]:
    """A function calling bound ``method`` while its object lives, else
    returning ``default``: a listener that does not keep its object alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        bound = ref()
        return default if bound is None else bound(*args, **kwargs)

    return call
