"""The WSGI CausalMiddleware: tokens in and out, contexts around the whole response.

Plain WSGI applications, driven through Werkzeug's test client (what Flask's
is built on). The tests without a database use a SQLite router for its
secret and token lifetime; the others run against both real topologies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from werkzeug.test import Client

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.causal import current_scope, rejected_tokens
from sqlalchemy_replicas.consistency import default_consistency
from sqlalchemy_replicas.exc import ConfigurationError
from sqlalchemy_replicas.integrations.wsgi import CausalMiddleware
from sqlalchemy_replicas.sticky import current_sticky_key
from sqlalchemy_replicas.testing import StatementLog, Topology

StartResponse = Callable[..., Callable[[bytes], object]]
Environ = dict[str, object]
App = Callable[[Environ, StartResponse], Iterable[bytes]]
SECRET = "test secret"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


@pytest.fixture
def sqlite_router() -> Iterator[sr.ReplicaRouter]:
    router = sr.ReplicaRouter("sqlite://", secret=SECRET, token_max_age=600)
    yield router
    router.dispose()


def text_app(produce: Callable[[Environ], str]) -> App:
    """A WSGI app answering 200 with ``produce(environ)`` as its body."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        body = produce(environ).encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]

    return app


def test_a_router_without_secret_is_refused_at_construction() -> None:
    """CausalMiddleware(app, router) raises ConfigurationError naming the
    router when it has no secret: at start-up, not at a request that commits
    (all the refused options, for both middlewares: test_http_transport.py)."""
    router = sr.ReplicaRouter("sqlite://")
    try:
        with pytest.raises(ConfigurationError, match="router 'default' has no secret"):
            CausalMiddleware(text_app(lambda environ: ""), router)
    finally:
        router.dispose()


def test_the_header_wins_over_the_cookie(sqlite_router: sr.ReplicaRouter) -> None:
    """The incoming token is the header's when there is one (also under a
    configured name), else the cookie's; an empty header falls back to the cookie."""
    middleware = CausalMiddleware(
        text_app(lambda environ: ""), sqlite_router, header_name="X-Token", cookie_name="tok"
    )
    both = {"HTTP_X_TOKEN": "from-header", "HTTP_COOKIE": "a=1; tok=from-cookie"}
    assert middleware.incoming_token(both) == "from-header"
    assert middleware.incoming_token({"HTTP_COOKIE": 'tok="quoted"; b=2'}) == "quoted"
    assert middleware.incoming_token({"HTTP_X_TOKEN": "", "HTTP_COOKIE": "tok=c"}) == "c"
    assert middleware.incoming_token({"HTTP_COOKIE": "other=1"}) is None


def test_a_malformed_token_is_ignored_and_counted(sqlite_router: sr.ReplicaRouter) -> None:
    """A garbage token in the header or the cookie never fails the request:
    the app answers 200 and the token is counted as rejected."""
    client = Client(CausalMiddleware(text_app(lambda environ: "ok"), sqlite_router))
    before = rejected_tokens["malformed"]
    response = client.get("/", headers={"X-DB-Causal": "%%%not a token\x7f"})
    assert response.status_code == 200
    assert response.get_data(as_text=True) == "ok"
    client.set_cookie("db_causal", "eyJ2IjogMX0")  # base64 of {"v": 1}: no entries
    assert client.get("/").status_code == 200
    assert rejected_tokens["malformed"] == before + 2


def test_level_per_method_and_sticky_key_hold_in_the_request(
    sqlite_router: sr.ReplicaRouter,
) -> None:
    """method_consistency sets default_consistency for its methods only, and
    sticky_key's key is in force; neither outlives the request."""

    def describe(environ: Environ) -> str:
        return f"{default_consistency.current()} {current_sticky_key()!r}"

    middleware = CausalMiddleware(
        text_app(describe),
        sqlite_router,
        method_consistency={"get": "eventual"},
        sticky_key=lambda environ: str(environ.get("HTTP_X_USER", "")) or None,
    )
    client = Client(middleware)
    assert client.get("/", headers={"X-User": "42"}).get_data(as_text=True) == "eventual b'42'"
    assert client.post("/").get_data(as_text=True) == "None None"
    assert default_consistency.current() is None
    assert current_sticky_key() is None


def test_the_context_spans_a_streamed_body_and_ends_at_close(
    sqlite_router: sr.ReplicaRouter,
) -> None:
    """A generator body sees the request's causal context in every chunk,
    even after the app returned; close() ends it; nothing leaks outside."""
    seen: list[bool] = []
    closed: list[bool] = []

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        scope = current_scope()
        assert scope is not None
        start_response("200 OK", [])

        def body() -> Iterator[bytes]:
            try:
                for chunk in (b"a", b"b"):
                    seen.append(current_scope() is scope)
                    yield chunk
            finally:
                closed.append(current_scope() is scope)

        return body()

    response = Client(CausalMiddleware(app, sqlite_router)).get("/")
    assert response.get_data() == b"ab"
    response.close()
    assert seen == [True, True]
    assert closed == [True]
    assert current_scope() is None


def test_an_exception_in_the_app_propagates_and_leaves_nothing_behind(
    sqlite_router: sr.ReplicaRouter,
) -> None:
    """An app that raises: the exception reaches the server unchanged, and
    the request's contexts are gone."""

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        raise LookupError("boom")

    client = Client(CausalMiddleware(app, sqlite_router, method_consistency={"GET": "strong"}))
    with pytest.raises(LookupError, match="boom"):
        client.get("/")
    assert current_scope() is None
    assert default_consistency.current() is None


# -- with a real primary and replicas ------------------------------------------------


@pytest.fixture
def routers(topology: Topology) -> Iterator[tuple[sr.ReplicaRouter, sr.ReplicaRouter]]:
    """Two app servers of one app: routers with the same name and secret."""
    first = sr.ReplicaRouter(topology.primary_url, topology.replica_urls, secret=SECRET)
    second = sr.ReplicaRouter(topology.primary_url, topology.replica_urls, secret=SECRET)
    Base.metadata.create_all(first.primary)
    topology.wait_for_catchup()
    first.start()
    second.start()
    yield first, second
    first.dispose()
    second.dispose()


def writer(router: sr.ReplicaRouter, *, start_first: bool = False) -> App:
    """POST: insert the item ``?id=``; GET: the ids, as ``1,2``. With
    ``start_first`` it calls start_response before committing."""
    make = router.sessionmaker()

    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        with make() as session:
            if environ["REQUEST_METHOD"] == "POST":
                if start_first:
                    start_response("201 Created", [])
                session.add(Item(id=int(str(environ["QUERY_STRING"]).split("=")[1])))
                session.commit()
                if not start_first:
                    start_response("201 Created", [])
                return [b""]
            ids = session.scalars(sa.select(Item.id).order_by(Item.id)).all()
        start_response("200 OK", [])
        return [",".join(map(str, ids)).encode()]

    return app


def test_a_commit_sets_the_token_header_and_cookie(
    routers: tuple[sr.ReplicaRouter, sr.ReplicaRouter],
) -> None:
    """After a request that commits, the response has the token in X-DB-Causal
    and in an HttpOnly, SameSite=Lax cookie that lives token_max_age, Secure
    over https only (secure=None follows wsgi.url_scheme); a request that only
    reads gets neither."""
    router, _ = routers
    client = Client(CausalMiddleware(writer(router), router))
    response = client.post("/?id=1")
    token = response.headers["X-DB-Causal"]
    cookie = response.headers["Set-Cookie"]
    assert cookie == f"db_causal={token}; Max-Age=86400; Path=/; HttpOnly; SameSite=Lax"
    over_https = client.post("/?id=2", base_url="https://localhost")
    assert "; Secure; HttpOnly; SameSite=Lax" in over_https.headers["Set-Cookie"]
    read = client.get("/")
    assert read.get_data(as_text=True) == "1,2"
    assert "X-DB-Causal" not in read.headers
    assert "Set-Cookie" not in read.headers


def test_the_token_carries_a_write_to_another_app_server(
    topology: Topology, routers: tuple[sr.ReplicaRouter, sr.ReplicaRouter]
) -> None:
    """A write on server A, then a read on server B whose replicas stopped
    applying: with A's cookie (through the client's cookie jar) B reads the
    write from the primary; without it, B reads a replica and misses it."""
    server_a, server_b = routers
    client_a = Client(CausalMiddleware(writer(server_a), server_a))
    client_b = Client(CausalMiddleware(writer(server_b), server_b))
    for replica in range(len(topology.replica_urls)):
        topology.pause_replay(replica)
    try:
        client_a.post("/?id=7")
        token = client_a.get_cookie("db_causal")
        assert token is not None
        client_b.set_cookie("db_causal", token.value)
        with StatementLog(server_b) as log:
            assert client_b.get("/").get_data(as_text=True) == "7"
        reads = [s.node for s in log.statements if "FROM item" in s.sql]
        assert reads == ["primary"]
        assert Client(CausalMiddleware(writer(server_b), server_b)).get("/").data == b""
    finally:
        for replica in range(len(topology.replica_urls)):
            topology.resume_replay(replica)


def test_commits_after_start_response_are_in_the_token(
    topology: Topology, routers: tuple[sr.ReplicaRouter, sr.ReplicaRouter]
) -> None:
    """An app that calls start_response before it commits still sends a token
    that carries the commit: the headers leave at the first body chunk."""
    server_a, server_b = routers
    response = Client(CausalMiddleware(writer(server_a, start_first=True), server_a)).post("/?id=3")
    assert response.status_code == 201
    token = response.headers["X-DB-Causal"]
    topology.pause_replay(0)
    topology.pause_replay(1)
    try:
        read = Client(CausalMiddleware(writer(server_b), server_b)).get(
            "/", headers={"X-DB-Causal": token}
        )
        assert read.get_data(as_text=True) == "3"
    finally:
        topology.resume_replay(0)
        topology.resume_replay(1)


def test_a_router_without_secret_seen_only_at_commit_is_logged_once(
    topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """A middleware not told its routers, whose app commits through a router
    without secret: each response is still 200 (no token), and one ERROR
    says why."""
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    try:
        Base.metadata.create_all(router.primary)
        client = Client(CausalMiddleware(writer(router)))
        with caplog.at_level(logging.ERROR, logger="sqlalchemy_replicas.integrations.wsgi"):
            first = client.post("/?id=1")
            second = client.post("/?id=2")
        assert (first.status_code, second.status_code) == (201, 201)
        assert "X-DB-Causal" not in first.headers
        errors = [r for r in caplog.records if "has no secret" in r.getMessage()]
        assert len(errors) == 1
    finally:
        router.dispose()
