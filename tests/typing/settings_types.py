"""What type checkers see of routers built from settings (checked by tests/test_typing.py).

Above each ``reveal_type`` line, ``# revealed: <type>`` states what mypy must
reveal. ``from_env()`` and ``from_settings()`` return the router kind they are
called on, as the constructor does for URLs: sync unless written
``ReplicaRouter[AsyncEngine]``. No other line may draw an error.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine
from typing_extensions import reveal_type

import sqlalchemy_replicas as sr

ENVIRON = {"DATABASE_URL": "postgresql+psycopg://app@db/app"}
ASYNC_ENVIRON = {"DATABASE_URL": "postgresql+psycopg_async://app@db/app"}

# revealed: sqlalchemy_replicas.router.ReplicaRouter[sqlalchemy.engine.base.Engine]
reveal_type(sr.ReplicaRouter.from_env(environ=ENVIRON))
# revealed: sqlalchemy_replicas.router.ReplicaRouter[sqlalchemy.ext.asyncio.engine.AsyncEngine]
reveal_type(sr.ReplicaRouter[AsyncEngine].from_env(environ=ASYNC_ENVIRON))
# revealed: sqlalchemy_replicas.router.ReplicaRouter[sqlalchemy.engine.base.Engine]
reveal_type(sr.ReplicaRouter.from_settings(ENVIRON, prefix="", engine_options={"pool_size": 5}))
# revealed: sqlalchemy_replicas.router.ReplicaRouter[sqlalchemy.ext.asyncio.engine.AsyncEngine]
reveal_type(sr.ReplicaRouter[AsyncEngine].from_settings(ASYNC_ENVIRON, max_lag=2.0))
annotated: sr.ReplicaRouter[AsyncEngine] = sr.ReplicaRouter.from_env(environ=ASYNC_ENVIRON)
# revealed: sqlalchemy.ext.asyncio.engine.AsyncEngine
reveal_type(annotated.primary)
# revealed: sqlalchemy.orm.session.sessionmaker[sqlalchemy_replicas.session.RoutingSession]
reveal_type(sr.ReplicaRouter.from_env(environ=ENVIRON).sessionmaker())
