"""What type checkers see of routers and session makers (checked by tests/test_typing.py).

Above each ``reveal_type`` line, ``# revealed: <type>`` states what mypy must
reveal, as mypy prints it (``builtins.`` prefixes aside). No other line may draw an
error. Not collected by pytest, and left out of the project's own mypy run, whose
output it would clutter with revealed types.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from typing_extensions import reveal_type

import sqlalchemy_replicas as sr

URL = "postgresql+psycopg://app@db/app"
ASYNC_URL = "postgresql+psycopg_async://app@db/app"


class LibraryResult:
    """What the other library's own method returns."""


class LibrarySession(Session):
    """Another library's Session subclass with a method of its own (as SQLModel's)."""

    def exec(self, statement: sa.Executable) -> LibraryResult:
        return LibraryResult()


class AppSession(sr.RoutingSession, LibrarySession):
    """The documented mixin: routing over the other library's session."""


class AppAsyncSession(AsyncSession):
    """An AsyncSession subclass of the app's."""


metadata = sa.MetaData()

# A sync router from URLs: engines are Engines, no cast needed.
router = sr.ReplicaRouter(URL, [URL])
# revealed: sqlalchemy_replicas.router.ReplicaRouter[sqlalchemy.engine.base.Engine]
reveal_type(router)
# revealed: sqlalchemy.engine.base.Engine
reveal_type(router.primary)
# revealed: tuple[sqlalchemy.engine.base.Engine, ...]
reveal_type(router.replicas)
metadata.create_all(router.primary)
with router.primary.begin() as connection:
    # revealed: sqlalchemy.engine.base.Connection
    reveal_type(connection)

# The plain annotation means the sync router.
annotated: sr.ReplicaRouter = router
# revealed: sqlalchemy.engine.base.Engine
reveal_type(annotated.primary)

# Session makers keep the session class they were given.
# revealed: sqlalchemy.orm.session.sessionmaker[sqlalchemy_replicas.session.RoutingSession]
reveal_type(router.sessionmaker())
make_app = router.sessionmaker(class_=AppSession, expire_on_commit=False)
# revealed: sqlalchemy.orm.session.sessionmaker[router_types.AppSession]
reveal_type(make_app)
with make_app() as session:
    # revealed: router_types.AppSession
    reveal_type(session)
    # revealed: router_types.LibraryResult
    reveal_type(session.exec(sa.select(sa.literal(1))))
    # revealed: sqlalchemy.engine.base.Engine | sqlalchemy.ext.asyncio.engine.AsyncEngine
    reveal_type(session.router.primary)

# From engines, the router's kind is theirs.
from_engine = sr.ReplicaRouter(sa.create_engine(URL), {"eu": URL})
# revealed: sqlalchemy_replicas.router.ReplicaRouter[sqlalchemy.engine.base.Engine]
reveal_type(from_engine)
async_router = sr.ReplicaRouter(create_async_engine(ASYNC_URL), [ASYNC_URL])
# revealed: sqlalchemy_replicas.router.ReplicaRouter[sqlalchemy.ext.asyncio.engine.AsyncEngine]
reveal_type(async_router)
# revealed: sqlalchemy.ext.asyncio.engine.AsyncEngine
reveal_type(async_router.primary)
# revealed: tuple[sqlalchemy.ext.asyncio.engine.AsyncEngine, ...]
reveal_type(async_router.replicas)
with_async_replicas = sr.ReplicaRouter(ASYNC_URL, [create_async_engine(ASYNC_URL)])
# revealed: sqlalchemy_replicas.router.ReplicaRouter[sqlalchemy.ext.asyncio.engine.AsyncEngine]
reveal_type(with_async_replicas)

# Async URLs: say so, by type application or by annotation.
from_async_urls = sr.ReplicaRouter[AsyncEngine](ASYNC_URL, [ASYNC_URL], max_lag=2.0)
# revealed: sqlalchemy_replicas.router.ReplicaRouter[sqlalchemy.ext.asyncio.engine.AsyncEngine]
reveal_type(from_async_urls)
annotated_async: sr.ReplicaRouter[AsyncEngine] = sr.ReplicaRouter(ASYNC_URL, [ASYNC_URL])
# revealed: sqlalchemy.ext.asyncio.engine.AsyncEngine
reveal_type(annotated_async.primary)
# revealed: sqlalchemy.ext.asyncio.session.async_sessionmaker[sqlalchemy.ext.asyncio.session.AsyncSession]
reveal_type(from_async_urls.async_sessionmaker())
app_async_maker = from_async_urls.async_sessionmaker(
    class_=AppAsyncSession, sync_session_class=AppSession
)
# revealed: sqlalchemy.ext.asyncio.session.async_sessionmaker[router_types.AppAsyncSession]
reveal_type(app_async_maker)


async def create_schema(router: sr.ReplicaRouter[AsyncEngine]) -> None:
    async with router.primary.begin() as connection:
        # revealed: sqlalchemy.ext.asyncio.engine.AsyncConnection
        reveal_type(connection)
        await connection.run_sync(metadata.create_all)


def any_router(router: sr.ReplicaRouter[Any]) -> list[str]:
    """Code that serves both kinds takes ``ReplicaRouter[Any]``."""
    return [status.name for status in router.status()]


any_router(router)
any_router(async_router)
