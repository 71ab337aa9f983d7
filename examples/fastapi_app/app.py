"""The app: POST /items creates an item and redirects (303) to GET /items.

Everything that makes the list right after a create, on any app server,
while replicas lag, is in :func:`create_app`: the causal middleware, and a
routed session per request. Async throughout (``psycopg_async`` or
``aiomysql``).
"""

# No ``from __future__ import annotations`` here: FastAPI resolves string
# annotations in the module's globals, and ``Session`` below is local to
# create_app (it needs the router).
import html
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated
from urllib.parse import parse_qs

import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.integrations.asgi import CausalMiddleware
from sqlalchemy_replicas.integrations.fastapi import routed_async_session


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))


PAGE = """<!doctype html>
<title>Items</title>
<form method="post" action="/items"><input name="name" required> <button>Add</button></form>
<ul>
{items}
</ul>
"""


def create_app(router: sr.ReplicaRouter[AsyncEngine]) -> FastAPI:
    """The app, on ``router`` (an async router with a ``secret``).

    Every app server of one deployment builds its router with the same
    ``name`` and ``secret``: a user's next request may land on any of them,
    and the token the middleware sets after a create tells it what to wait for.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.astart()  # start position and replica checks before the first request
        yield
        await router.adispose()

    app = FastAPI(lifespan=lifespan)
    # The token in a cookie (browsers) and the X-DB-Causal header (API clients).
    app.add_middleware(CausalMiddleware, routers=router)
    Session = Annotated[AsyncSession, Depends(routed_async_session(router))]

    @app.get("/items", response_class=HTMLResponse)
    async def list_items(session: Session) -> str:
        names = await session.scalars(sa.select(Item.name).order_by(Item.id))
        items = "\n".join(f"<li>{html.escape(name)}</li>" for name in names)
        return PAGE.format(items=items)

    @app.post("/items")
    async def create_item(request: Request, session: Session) -> RedirectResponse:
        # A plain form post, parsed by hand: no python-multipart needed.
        form = parse_qs((await request.body()).decode())
        name = form.get("name", [""])[0].strip()[:100]
        if name:
            session.add(Item(name=name))
            await session.commit()
        return RedirectResponse("/items", status_code=303)

    return app
