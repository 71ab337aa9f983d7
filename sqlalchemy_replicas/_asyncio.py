"""SQLAlchemy's asyncio extension, imported only where async is asked for.

SQLAlchemy 2.1 installs greenlet only with ``sqlalchemy[asyncio]``, and
without greenlet ``import sqlalchemy.ext.asyncio`` raises ImportError (2.0
imports it but fails on first use). Sync applications must install and
run without greenlet, so no sync path imports the extension: engines are
told apart without it, and async URLs or ``async_sessionmaker()`` check
greenlet first and name the ``[asyncio]`` extra when it is missing.

I/O: imports modules; nothing else.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

from ._dependencies import install_command, require_module
from .exc import MissingDependency

if TYPE_CHECKING:
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "call_blocking",
    "create_async_engine",
    "in_async_greenlet",
    "is_async_engine",
    "require_asyncio",
]

_R = TypeVar("_R")


def is_async_engine(obj: object) -> TypeGuard[AsyncEngine]:
    """True when ``obj`` is an :class:`~sqlalchemy.ext.asyncio.AsyncEngine`.

    Never imports the extension: an ``AsyncEngine`` can only exist once its
    module was imported, so when it is not in ``sys.modules`` the answer is no.
    """
    module = sys.modules.get("sqlalchemy.ext.asyncio.engine")
    return module is not None and isinstance(obj, module.AsyncEngine)


def require_asyncio(needed_by: str) -> None:
    """Make sure SQLAlchemy's asyncio extension works here.

    :param needed_by: what needs it, for the message.
    :raises MissingDependency: naming the ``[asyncio]`` extra when greenlet
        (or the extension) cannot be imported.
    """
    # Checked explicitly: SQLAlchemy 2.0 imports its asyncio extension without
    # greenlet and fails only on the first query.
    require_module("greenlet", needed_by)
    try:
        import sqlalchemy.ext.asyncio  # noqa: F401
    except ImportError as exc:
        raise MissingDependency(
            f"{needed_by} needs SQLAlchemy's asyncio support, which cannot be imported "
            f"({exc}); install it: {install_command(['asyncio'])}",
            module="sqlalchemy.ext.asyncio",
            extra="asyncio",
        ) from exc


def create_async_engine(url: URL, needed_by: str, **options: Any) -> AsyncEngine:
    """``sqlalchemy.ext.asyncio.create_async_engine``, after :func:`require_asyncio`.

    :param needed_by: what the URL was given as (``"primary"``), for the message.
    """
    require_asyncio(f"{needed_by} ({url.drivername})")
    from sqlalchemy.ext.asyncio import create_async_engine as create

    return create(url, **options)


def call_blocking(function: Callable[..., _R], *args: Any) -> _R:
    """``function(*args)``, which blocks its thread for a while (a wait on a
    ``threading`` condition). Inside an async session's greenlet it runs in a
    worker thread that the event loop awaits, so other tasks go on meanwhile."""
    if not in_async_greenlet():
        return function(*args)
    import asyncio

    from sqlalchemy.util import await_only

    return await_only(asyncio.to_thread(function, *args))


def in_async_greenlet() -> bool:
    """True inside the greenlet of an async session or engine call.

    Never imports greenlet: SQLAlchemy's own check raises without it, and
    until an async engine was used here it has not been imported, so no such
    greenlet can be running.
    """
    if "greenlet" not in sys.modules:
        return False
    from sqlalchemy.util.concurrency import in_greenlet

    return in_greenlet()
