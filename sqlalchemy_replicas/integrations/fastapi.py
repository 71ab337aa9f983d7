"""FastAPI dependencies that yield routed sessions.

::

    from fastapi import Depends, FastAPI
    from sqlalchemy_replicas.integrations.asgi import CausalMiddleware
    from sqlalchemy_replicas.integrations.fastapi import routed_session

    router = sr.ReplicaRouter(DATABASE_URL, REPLICA_URLS, secret=SECRET_KEY)
    get_session = routed_session(router)

    app = FastAPI()
    app.add_middleware(CausalMiddleware, routers=router)

    @app.get("/items")
    @sr.consistency("eventual")        # decorators keep FastAPI's introspection
    def list_items(session: RoutingSession = Depends(get_session)): ...

Each request gets its own session, closed when FastAPI closes the request's
dependencies (after the response is sent, streamed bodies included; FastAPI
0.118+). Importing this module imports neither FastAPI nor Starlette: a
dependency is a plain (async) generator function. No I/O of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar, overload

from sqlalchemy.engine import Engine

from ..router import ReplicaRouter
from ..session import RoutingSession

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

__all__ = ["routed_async_session", "routed_session"]

_S = TypeVar("_S", bound=RoutingSession)
_AS = TypeVar("_AS", bound="AsyncSession")


@overload
def routed_session(
    router: ReplicaRouter[Engine], *, class_: None = None, **session_kwargs: Any
) -> Callable[[], Iterator[RoutingSession]]: ...


@overload
def routed_session(
    router: ReplicaRouter[Engine], *, class_: type[_S], **session_kwargs: Any
) -> Callable[[], Iterator[_S]]: ...


def routed_session(
    router: ReplicaRouter[Engine], *, class_: type[Any] | None = None, **session_kwargs: Any
) -> Callable[[], Iterator[Any]]:
    """A dependency (``Depends(get_session)``) that yields a new routed
    session per request and closes it afterwards.

    FastAPI runs it, and sync endpoints, in its threadpool: the session is
    used from one thread at a time, which is all a Session needs.

    :param router: a sync router.
    :param class_: a :class:`RoutingSession` subclass (typed as such).
    :param session_kwargs: for every session, as for ``router.sessionmaker()``.
    :raises ConfigurationError: here, for an async router or an argument no
        session takes.
    """
    maker = router.sessionmaker(class_=class_, **session_kwargs)

    def get_session() -> Iterator[Any]:
        with maker() as session:
            yield session

    return get_session


@overload
def routed_async_session(
    router: ReplicaRouter[AsyncEngine], *, class_: None = None, **session_kwargs: Any
) -> Callable[[], AsyncIterator[AsyncSession]]: ...


@overload
def routed_async_session(
    router: ReplicaRouter[AsyncEngine], *, class_: type[_AS], **session_kwargs: Any
) -> Callable[[], AsyncIterator[_AS]]: ...


def routed_async_session(
    router: ReplicaRouter[AsyncEngine], *, class_: type[Any] | None = None, **session_kwargs: Any
) -> Callable[[], AsyncIterator[Any]]:
    """A dependency (``Depends(get_session)``) that yields a new routed
    ``AsyncSession`` per request and closes it afterwards.

    :param router: an async router (``ReplicaRouter[AsyncEngine]``).
    :param class_: an ``AsyncSession`` subclass (typed as such).
    :param session_kwargs: for every session, as for
        ``router.async_sessionmaker()`` (``sync_session_class=`` included).
    :raises ConfigurationError: here, for a sync router or an argument no
        session takes.
    """
    maker = router.async_sessionmaker(class_=class_, **session_kwargs)

    async def get_session() -> AsyncIterator[Any]:
        async with maker() as session:
            yield session

    return get_session
