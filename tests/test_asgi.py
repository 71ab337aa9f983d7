"""CausalMiddleware (ASGI) and the FastAPI dependencies.

The first tests need no database (SQLite routers, or none); the rest run
against both real topologies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

import sqlalchemy_replicas as sr
from sqlalchemy_replicas import causal
from sqlalchemy_replicas import token as sr_token
from sqlalchemy_replicas.consistency import current_consistency, default_consistency
from sqlalchemy_replicas.exc import ConfigurationError
from sqlalchemy_replicas.integrations.asgi import CausalMiddleware, Scope
from sqlalchemy_replicas.integrations.fastapi import routed_async_session, routed_session
from sqlalchemy_replicas.sticky import current_sticky_key
from sqlalchemy_replicas.testing import Topology

SECRET = "test secret: the same on every app server"


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "note"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(sa.String(100))


def sqlite_router() -> sr.ReplicaRouter:
    """A router over one in-memory SQLite database, usable from FastAPI's
    threadpool (no replicas: enough for tests that need no replication)."""
    return sr.ReplicaRouter(
        "sqlite://",
        engine_options={
            "connect_args": {"check_same_thread": False},
            "poolclass": sa.pool.StaticPool,
        },
    )


def position_of(token: str) -> str:
    """The position a token carries for the default router."""
    return sr_token.decode(token)["default"].position


def foreign_token(name: str) -> str:
    """A valid token for a database (router name) this process does not use."""
    entry = sr_token.sign("their secret", name, "pg", "their-lineage", "0/16B3740", time.time())
    return sr_token.encode({name: entry})


def user_from_header(scope: Scope) -> str | None:
    """A sticky key as an app would derive it (here: a plain header)."""
    for key, value in scope["headers"]:
        if key == b"x-user":
            return str(value.decode())
    return None


# --- the middleware without a database ---------------------------------------


def test_router_without_secret_fails_at_startup() -> None:
    """A router without a secret given to the middleware fails when the app
    starts (FastAPI builds its middleware then), naming the fix."""
    router = sr.ReplicaRouter("sqlite://")
    app = FastAPI()
    app.add_middleware(CausalMiddleware, routers=router)
    with pytest.raises(ConfigurationError, match="has no secret"), TestClient(app):
        pass
    router.dispose()


def scope_app() -> FastAPI:
    """A FastAPI app whose endpoints report the settings in force."""
    app = FastAPI()
    app.add_middleware(
        CausalMiddleware, sticky_key=user_from_header, method_consistency={"GET": "eventual"}
    )

    def settings() -> dict[str, Any]:
        setting = current_consistency()
        return {
            "scope": causal.current_scope() is not None,
            "default": default_consistency.current(),
            "level": None if setting is None else setting.level,
            "sticky": (current_sticky_key() or b"").decode() or None,
        }

    @app.get("/async")
    async def async_view() -> dict[str, Any]:
        return settings()

    @app.get("/sync")
    def sync_view() -> dict[str, Any]:
        return settings()

    @app.get("/strong")
    @sr.consistency("strong")
    async def strong_view() -> dict[str, Any]:
        return settings()

    @app.post("/post")
    def post_view() -> dict[str, Any]:
        return settings()

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json(settings())
        await websocket.close()

    return app


def test_settings_reach_async_and_threadpool_endpoints() -> None:
    """Async endpoints and sync ones (in FastAPI's threadpool) run inside the
    request's causal_context, with the sticky key from the callable and the
    GET default level; a view decorator wins over that default, and POST has
    no default."""
    with TestClient(scope_app()) as client:
        for path in ("/async", "/sync"):
            body = client.get(path, headers={"X-User": "ada"}).json()
            assert body == {"scope": True, "default": "eventual", "level": None, "sticky": "ada"}
        assert client.get("/strong").json()["level"] == "strong"
        assert client.post("/post").json()["default"] is None
        assert client.get("/sync").json()["sticky"] is None


def test_websocket_gets_context_and_sticky_key() -> None:
    """A websocket connection runs inside a causal_context with the sticky key
    (no per-method default: it is not an HTTP method)."""
    with (
        TestClient(scope_app()) as client,
        client.websocket_connect("/ws", headers={"X-User": "bob"}) as socket,
    ):
        body = socket.receive_json()
    assert body == {"scope": True, "default": None, "level": None, "sticky": "bob"}


def test_lifespan_passes_through() -> None:
    """Lifespan events reach the app through the middleware, outside any causal context."""
    seen: list[bool] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        seen.append(causal.current_scope() is None)
        yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(CausalMiddleware)
    with TestClient(app):
        pass
    assert seen == [True]


class Item(BaseModel):
    name: str
    price: float


def test_decorated_endpoints_keep_fastapi_introspection() -> None:
    """@sr.consistency on sync and async endpoints (a module with postponed
    annotations) keeps query params, Depends and request bodies working: they
    are parsed and validated, and the level is in force inside."""
    app = FastAPI()
    router = sqlite_router()
    get_session = routed_session(router)

    def page_size(size: int = 10) -> int:
        return size

    @app.post("/items/{group}")
    @sr.consistency("strong")
    async def create(
        group: str,
        item: Item,
        q: int,
        size: int = Depends(page_size),
        session: sr.RoutingSession = Depends(get_session),
    ) -> dict[str, Any]:
        setting = current_consistency()
        assert setting is not None
        one = session.scalar(sa.text("SELECT 1"))
        return {"group": group, "item": item.name, "q": q, "size": size, "one": one,
                "level": setting.level}  # fmt: skip

    @app.get("/items")
    @sr.consistency("bounded", max_lag=2.0)
    def listing(q: int, size: int = Depends(page_size)) -> dict[str, Any]:
        setting = current_consistency()
        assert setting is not None
        return {"q": q, "size": size, "level": setting.level}

    with TestClient(app) as client:
        created = client.post("/items/tools?q=3&size=5", json={"name": "saw", "price": 9.5})
        assert created.json() == {"group": "tools", "item": "saw", "q": 3, "size": 5, "one": 1,
                                  "level": "strong"}  # fmt: skip
        assert client.post("/items/tools?q=3", json={"name": "saw"}).status_code == 422
        assert client.get("/items?q=7").json() == {"q": 7, "size": 10, "level": "bounded"}
        assert client.get("/items?q=x").status_code == 422
    router.dispose()


def test_dependency_closes_the_session_after_the_response() -> None:
    """routed_session yields a new RoutingSession per request and closes it
    after the response was sent, also for a streamed body."""
    closed: list[int] = []
    streamed_while_open: list[bool] = []

    class TrackedSession(sr.RoutingSession):
        def close(self) -> None:
            closed.append(id(self))
            super().close()

    router = sqlite_router()
    get_session = routed_session(router, class_=TrackedSession)
    app = FastAPI()

    @app.get("/stream")
    def stream(session: TrackedSession = Depends(get_session)) -> StreamingResponse:
        def body() -> Iterator[bytes]:
            streamed_while_open.append(id(session) not in closed)
            yield str(session.scalar(sa.text("SELECT 1"))).encode()

        return StreamingResponse(body())

    with TestClient(app) as client:
        assert client.get("/stream").text == "1"
        assert client.get("/stream").text == "1"
    assert len(closed) == 2
    assert len(set(closed)) == 2
    assert streamed_while_open == [True, True]
    router.dispose()


# --- with real topologies -----------------------------------------------------


@pytest.fixture
def routers(topology: Topology) -> Iterator[tuple[sr.ReplicaRouter, sr.ReplicaRouter]]:
    """Two app servers' routers (same name and secret) over the topology, with
    the schema created and replicated."""
    server_a = sr.ReplicaRouter(topology.primary_url, topology.replica_urls, secret=SECRET)
    server_b = sr.ReplicaRouter(topology.primary_url, topology.replica_urls, secret=SECRET)
    Base.metadata.create_all(server_a.primary)
    topology.wait_for_catchup()
    server_b.start()  # B's own scope starts before A's writes below
    yield server_a, server_b
    server_a.dispose()
    server_b.dispose()


def notes_app(db: sr.ReplicaRouter, **middleware: Any) -> FastAPI:
    """POST /notes/{id} writes (sync, threadpool), GET /notes/{id} reads,
    GET /stream/{id} commits while its body streams."""
    app = FastAPI()
    app.add_middleware(CausalMiddleware, **middleware)
    get_session = routed_session(db)

    @app.post("/notes/{note_id}")
    def write(note_id: int, session: sr.RoutingSession = Depends(get_session)) -> str:
        session.merge(Note(id=note_id, text=f"note {note_id}"))
        session.commit()
        return "ok"

    @app.get("/notes/{note_id}")
    def read(note_id: int, session: sr.RoutingSession = Depends(get_session)) -> str | None:
        return session.scalar(sa.select(Note.text).where(Note.id == note_id))

    @app.get("/stream/{note_id}")
    def stream(note_id: int, session: sr.RoutingSession = Depends(get_session)) -> Any:
        def body() -> Iterator[bytes]:
            yield b"started "
            # The causal context spans the body: this commit is recorded in it.
            assert causal.current_scope() is not None
            session.merge(Note(id=note_id, text="late"))
            session.commit()
            yield b"done"

        return StreamingResponse(body())

    return app


def test_a_write_returns_a_token_that_another_server_honours(
    topology: Topology, routers: tuple[sr.ReplicaRouter, sr.ReplicaRouter]
) -> None:
    """A request that commits (sync endpoint and dependency, in the threadpool)
    gets the token in the header and in an HttpOnly, SameSite=Lax cookie that
    lives token_max_age; a read-only request gets none; with the cookie, the
    next request on another app server reads the write although every replica
    stopped applying; without it, that server's replicas serve the old state."""
    server_a, server_b = routers
    with TestClient(notes_app(server_a, routers=server_a)) as client_a:
        assert client_a.get("/notes/1").headers.get("x-db-causal") is None
        for replica in range(len(topology.replica_names)):
            topology.pause_replay(replica)
        response = client_a.post("/notes/1")
        token = response.headers["x-db-causal"]
        cookie = response.headers["set-cookie"]
    assert cookie == (
        f"db_causal={token}; Max-Age={int(server_a.token_max_age)}; Path=/; HttpOnly; SameSite=Lax"
    )
    with TestClient(notes_app(server_b)) as client_b:
        assert client_b.get("/notes/1", headers={"Cookie": f"db_causal={token}"}).json() == "note 1"
        assert client_b.get("/notes/1").json() is None
        read = client_b.get("/notes/1", headers={"X-DB-Causal": token})
        assert read.json() == "note 1"
        assert "set-cookie" not in read.headers  # reading changes no token


def test_a_forged_token_never_fails_a_request(
    routers: tuple[sr.ReplicaRouter, sr.ReplicaRouter],
) -> None:
    """Malformed and wrongly signed tokens, in the header or the cookie, are
    ignored and counted; the requests succeed."""
    server_a, _ = routers
    with TestClient(notes_app(server_a, routers=server_a)) as client:
        token = client.post("/notes/2").headers["x-db-causal"]
        before = sum(causal.rejected_tokens.values())
        forged = token[:-4] + ("AAAA" if token[-4:] != "AAAA" else "BBBB")
        for bad in ("garbage!", "x" * 5000, forged):
            assert client.get("/notes/2", headers={"X-DB-Causal": bad}).json() == "note 2"
            assert client.get("/notes/2", headers={"Cookie": f"db_causal={bad}"}).json() == "note 2"
    assert sum(causal.rejected_tokens.values()) - before == 6


def test_a_router_without_secret_is_reported_once_never_a_failed_request(
    topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """Without routers=, a router that cannot sign tokens is reported at ERROR
    once, at the first request that commits; that request and later ones
    succeed (their commits are done) and carry no token."""
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    Base.metadata.create_all(router.primary)
    try:
        with TestClient(notes_app(router)) as client, caplog.at_level(logging.ERROR):
            for note_id in (3, 4):
                response = client.post(f"/notes/{note_id}")
                assert response.status_code == 200
                assert "x-db-causal" not in response.headers
            assert client.get("/notes/4").json() == "note 4"
    finally:
        router.dispose()
    errors = [r for r in caplog.records if "has no secret" in r.getMessage()]
    assert len(errors) == 1


def test_streaming_commit_after_start_is_not_in_the_token_and_is_reported(
    routers: tuple[sr.ReplicaRouter, sr.ReplicaRouter], caplog: pytest.LogCaptureFixture
) -> None:
    """A commit made while the body streams is inside the request's causal
    context, but the headers went out before it: no token, and one WARNING."""
    server_a, _ = routers
    with (
        TestClient(notes_app(server_a, routers=server_a)) as client,
        caplog.at_level(logging.WARNING, logger="sqlalchemy_replicas.integrations.asgi"),
    ):
        response = client.get("/stream/5")
        assert response.text == "started done"
        assert "x-db-causal" not in response.headers
        assert client.get("/notes/5").json() == "late"
    assert any("after its response had started" in r.getMessage() for r in caplog.records)


def test_200_concurrent_requests_keep_their_own_context(topology: Topology) -> None:
    """200 concurrent requests (httpx.AsyncClient over ASGITransport, async
    endpoints, an async router): each of 100 writers, sending a token with an
    entry of its own (for a database this app does not use: carried through
    untouched), writes and reads its own row and gets back the token of its
    own scope: its own entry and no other's, and the position its endpoint
    saw; each of 100 readers without a token sees a fresh scope with no
    commits and gets no token: nothing leaks between requests."""
    router = sr.ReplicaRouter[AsyncEngine](
        topology.async_primary_url,
        topology.async_replica_urls,
        secret=SECRET,
        engine_options={"pool_size": 20, "max_overflow": 20},
    )
    sync_router = sr.ReplicaRouter(topology.primary_url)
    Base.metadata.create_all(sync_router.primary)
    sync_router.dispose()
    topology.wait_for_catchup()
    get_session = routed_async_session(router)
    app = FastAPI()
    app.add_middleware(CausalMiddleware, routers=router)

    @app.post("/write/{note_id}")
    async def write(note_id: int, session: AsyncSession = Depends(get_session)) -> dict[str, Any]:
        scope = causal.current_scope()
        assert scope is not None
        session.add(Note(id=note_id, text=f"note {note_id}"))
        await session.commit()
        text = await session.scalar(sa.select(Note.text).where(Note.id == note_id))
        token = causal.CausalContext(scope).token
        assert token is not None
        return {"text": text, "position": position_of(token)}

    @app.get("/peek")
    async def peek(request: Request) -> dict[str, Any]:
        await asyncio.sleep(0)  # let other requests run in between
        scope = causal.current_scope()
        assert scope is not None
        return {"commits": scope.commits}

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                requests = []
                for i in range(100):
                    headers = {"X-DB-Causal": foreign_token(f"other{i + 1}")}
                    requests.append(client.post(f"/write/{i + 1}", headers=headers))
                    requests.append(client.get("/peek"))
                return await asyncio.gather(*requests)
        finally:
            await router.adispose()

    responses = asyncio.run(asyncio.wait_for(run(), timeout=120))
    writers, readers = responses[0::2], responses[1::2]
    for i, response in enumerate(writers):
        body = response.json()
        assert body["text"] == f"note {i + 1}"
        token = response.headers["x-db-causal"]
        assert set(sr_token.decode(token)) == {"default", f"other{i + 1}"}
        # The same position (signed at another instant: the issue time differs).
        assert position_of(token) == body["position"]
    for response in readers:
        assert response.json() == {"commits": 0}
        assert "x-db-causal" not in response.headers
        assert "set-cookie" not in response.headers


def test_litestar_carries_the_token(routers: tuple[sr.ReplicaRouter, sr.ReplicaRouter]) -> None:
    """In a Litestar app (middleware=[DefineMiddleware(CausalMiddleware, ...)]),
    a handler run in a thread commits and the response carries the token; the
    sticky key reaches the handler."""
    from litestar import Litestar, get, post
    from litestar.middleware import DefineMiddleware
    from litestar.testing import TestClient as LitestarClient

    server_a, _ = routers
    make_session = server_a.sessionmaker()

    @post("/note", sync_to_thread=True)
    def write() -> str:
        with make_session() as session:
            session.merge(Note(id=6, text="litestar"))
            session.commit()
        return (current_sticky_key() or b"").decode()

    @get("/note", sync_to_thread=True)
    def read() -> str | None:
        with make_session() as session:
            return session.scalar(sa.select(Note.text).where(Note.id == 6))

    app = Litestar(
        route_handlers=[write, read],
        middleware=[
            DefineMiddleware(CausalMiddleware, routers=server_a, sticky_key=user_from_header)
        ],
    )
    with LitestarClient(app=app) as client:
        written = client.post("/note", headers={"X-User": "eve"})
        assert written.text == "eve"
        assert position_of(written.headers["x-db-causal"])
        read_back = client.get("/note", headers={"X-DB-Causal": written.headers["x-db-causal"]})
        assert read_back.text == "litestar"
        assert "x-db-causal" not in read_back.headers
