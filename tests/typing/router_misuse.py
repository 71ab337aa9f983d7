"""What type checkers reject (checked by tests/test_typing.py).

The line after each ``# error: <code>`` comment must draw that mypy error; no
other line may draw one. The run time refuses each of these too (ConfigurationError),
except ``not_async``, a sync router given where an async one is wanted.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session

import sqlalchemy_replicas as sr

URL = "postgresql+psycopg://app@db/app"
ASYNC_URL = "postgresql+psycopg_async://app@db/app"

sync_router = sr.ReplicaRouter(URL)
async_router = sr.ReplicaRouter[AsyncEngine](ASYNC_URL)

# error: misc
sync_router.async_sessionmaker()
# error: misc
async_router.sessionmaker()
# error: type-var
sync_router.sessionmaker(class_=Session)
# error: arg-type
async_router.async_sessionmaker(sync_session_class=Session)
# error: list-item
sr.ReplicaRouter(sa.create_engine(URL), [create_async_engine(ASYNC_URL)])
# error: list-item
sr.ReplicaRouter(create_async_engine(ASYNC_URL), [sa.create_engine(URL)])
# error: assignment
not_async: sr.ReplicaRouter[AsyncEngine] = sr.ReplicaRouter(sa.create_engine(URL))
# error: misc
sr.ReplicaRouter.from_env().async_sessionmaker()
# error: call-arg
sr.ReplicaRouter.from_env(max_lags=1.0)
# error: arg-type
sr.ReplicaRouter.from_settings({}, wait_timeout="0.3")
