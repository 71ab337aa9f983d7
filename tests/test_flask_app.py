"""The Flask example app and the Flask extension, against both real topologies.

The example (examples/flask_app/items_app.py) is driven through a
round-robin "load balancer" over two app servers (two apps, two routers
with the same name and secret), so the GET after each POST's redirect lands
on the other server; the causal cookie is all that server learns of the
write. Replicas apply every change 0.5 s late.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import flask
import flask_sqlalchemy
import flask_sqlalchemy.session
import pytest
import sqlalchemy as sa
from items_app import Base, Item, create_app
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from werkzeug.test import Client
from werkzeug.wrappers import Response as WerkzeugResponse

import sqlalchemy_replicas as sr
from sqlalchemy_replicas import token as tokens
from sqlalchemy_replicas.exc import ConfigurationError, ReplicasError
from sqlalchemy_replicas.integrations.flask import EXTENSION_KEY, Replicas, current_router
from sqlalchemy_replicas.testing import MariaDBTopology, StatementLog, Topology

SECRET = "flask test secret"
DELAY = 0.5
REQUESTS = 12
Environ = dict[str, object]
StartResponse = Callable[..., Callable[[bytes], object]]


def make_router(topology: Topology, name: str = "default") -> sr.ReplicaRouter[Engine]:
    """A router as the example's serve.py makes it, with a wait budget the
    replicas' delay fits in: MariaDB applies MASTER_DELAY in whole seconds from
    an event's whole-second timestamp, so 0.5 s becomes 1 to 2 s there (and a
    read's waits share one budget across replicas)."""
    return sr.ReplicaRouter(
        topology.primary_url,
        topology.replica_urls,
        secret=SECRET,
        wait_timeout=2.5 if isinstance(topology, MariaDBTopology) else 2 * DELAY,
        engine_options={"pool_pre_ping": True},
        name=name,
    )


@pytest.fixture
def delayed(topology: Topology) -> Topology:
    """The topology with the item table, both replicas applying 0.5 s late."""
    engine = sa.create_engine(topology.primary_url)
    try:
        Base.metadata.create_all(engine)
    finally:
        engine.dispose()
    topology.wait_for_catchup()
    for replica in range(len(topology.replica_urls)):
        topology.set_apply_delay(replica, DELAY)
    return topology


def balancer(*apps: flask.Flask) -> Callable[[Environ, StartResponse], Iterable[bytes]]:
    """A WSGI app that hands requests to ``apps`` in turn."""
    turn = itertools.cycle(apps)

    def dispatch(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return next(turn)(environ, start_response)

    return dispatch


def test_example_never_reads_stale_and_reads_mostly_from_replicas(delayed: Topology) -> None:
    """POST an item, follow the redirect to the list (on the other app
    server), and GET the list twice more: every list shows every item posted
    so far (0 stale reads) although replicas are 0.5 s behind, and most
    reads of the list run on replicas."""
    routers = (make_router(delayed), make_router(delayed))
    try:
        for router in routers:
            router.start()
        client = Client(balancer(*(create_app(router) for router in routers)))
        posted: list[str] = []
        stale = lists = 0
        with StatementLog(routers[0]) as log_a, StatementLog(routers[1]) as log_b:
            for n in range(REQUESTS):
                posted.append(f"item {n}")
                pages = [client.post("/items", data={"name": posted[-1]}, follow_redirects=True)]
                pages += [client.get("/") for _ in range(2)]
                for page in pages:
                    assert page.status_code == 200
                    lists += 1
                    body = page.get_data(as_text=True)
                    stale += any(f"<li>{name}</li>" not in body for name in posted)
        reads = [
            s.node
            for s in (*log_a.statements, *log_b.statements)
            if s.sql.lstrip().upper().startswith("SELECT") and "FROM item" in s.sql
        ]
        on_replicas = sum(node.startswith("replica") for node in reads)
        share = on_replicas / len(reads)
        print(
            f"\n[{type(delayed).__name__}] {lists} list pages, stale reads: {stale}, "
            f"list reads on replicas: {on_replicas}/{len(reads)} ({share:.0%})"
        )
        assert lists == 3 * REQUESTS
        assert len(reads) == lists
        assert stale == 0
        assert share > 0.5
    finally:
        for router in routers:
            router.dispose()


def test_a_view_decorator_sets_the_level_of_its_reads(topology: Topology) -> None:
    """@sr.consistency("strong") on a Flask view (the example's /health)
    sends its reads to the primary, while the list view reads a replica."""
    router = make_router(topology)
    try:
        Base.metadata.create_all(router.primary)
        topology.wait_for_catchup()
        client = create_app(router).test_client()
        with StatementLog(router) as log:
            assert client.get("/health").get_json() == {"items": 0}
            assert client.get("/").status_code == 200
        reads = [s.node for s in log.statements if "FROM item" in s.sql]
        assert reads[0] == "primary"
        assert reads[1].startswith("replica")
    finally:
        router.dispose()


def test_two_apps_in_one_process_use_their_own_routers(topology: Topology) -> None:
    """Two apps from one extension object, bound to two routers with other
    names: each app's requests run only on its own router's engines, each
    app's token names only its own router, and current_router() follows the app."""
    one = make_router(topology, name="one")
    two = make_router(topology, name="two")
    try:
        Base.metadata.create_all(one.primary)
        topology.wait_for_catchup()
        app_one, app_two = create_app(one), create_app(two)
        with StatementLog(one) as log_one, StatementLog(two) as log_two:
            posted = app_one.test_client().post("/items", data={"name": "a"})
            listed = app_two.test_client().get("/")
        assert posted.status_code == 303
        assert "<li>a</li>" in listed.get_data(as_text=True)
        assert any("INSERT INTO item" in s.sql for s in log_one.statements)
        assert not any("INSERT" in s.sql for s in log_two.statements)
        assert any("FROM item" in s.sql for s in log_two.statements)
        assert not any("SELECT item.name" in s.sql for s in log_one.statements)
        token = posted.headers["X-DB-Causal"]
        assert list(tokens.decode(token)) == ["one"]
        with app_one.app_context():
            assert current_router() is one
        with app_two.app_context():
            assert current_router() is two
        assert app_two.extensions[EXTENSION_KEY].router is two
    finally:
        one.dispose()
        two.dispose()


def test_extension_refuses_what_cannot_work() -> None:
    """init_app without a router or DATABASE_URL, with a router without secret, twice on one
    app, with a bad middleware option in app.config; current_router() outside
    an app context and on an app without the extension: each raises at once,
    naming the fix (or the config key)."""
    replicas = Replicas()
    app = flask.Flask("refusals")
    with pytest.raises(ConfigurationError, match="DATABASE_URL"):
        replicas.init_app(app)
    secretless = sr.ReplicaRouter("sqlite://")
    signed = sr.ReplicaRouter("sqlite://", secret=SECRET)
    try:
        with pytest.raises(ConfigurationError, match="no secret"):
            replicas.init_app(app, router=secretless)
        replicas.init_app(app, router=signed)
        with pytest.raises(ConfigurationError, match="already set up"):
            replicas.init_app(app, router=signed)
        with pytest.raises(ReplicasError, match="application context"):
            current_router()
        with flask.Flask("bare").app_context(), pytest.raises(ConfigurationError, match="init_app"):
            current_router()
        for key, value in (
            ("SQLALCHEMY_REPLICAS_COOKIE_SECURE", "yes"),
            ("SQLALCHEMY_REPLICAS_COOKIE_NAME", "db causal"),
            ("SQLALCHEMY_REPLICAS_METHOD_CONSISTENCY", {"GET": "fast"}),
        ):
            configured = flask.Flask("bad_config")
            configured.config[key] = value
            with pytest.raises(ConfigurationError, match=f"^{key}: "):
                replicas.init_app(configured, router=signed)
    finally:
        secretless.dispose()
        signed.dispose()


def test_init_app_builds_the_router_from_app_config() -> None:
    """Without router=, init_app builds the app's router from app.config:
    Flask-SQLAlchemy's SQLALCHEMY_DATABASE_URI as the primary and
    SQLALCHEMY_REPLICAS_<OPTION> settings; the cookie's lifetime follows its
    token_max_age."""
    app = flask.Flask("from_config")
    app.config.update(
        SQLALCHEMY_DATABASE_URI="sqlite://",
        SQLALCHEMY_REPLICAS_SECRET=SECRET,
        SQLALCHEMY_REPLICAS_TOKEN_MAX_AGE=3600,
        SQLALCHEMY_REPLICAS_COOKIE_NAME="causal",
    )
    replicas = Replicas(app)
    router = replicas.get_router(app)
    try:
        assert router.secret == SECRET
        assert str(router.primary.url) == "sqlite://"
        middleware = app.extensions[EXTENSION_KEY].middleware
        assert (middleware.transport.cookie_name, middleware.transport.max_age) == ("causal", 3600)
    finally:
        router.dispose()


def test_config_keys_name_the_cookie_and_header(topology: Topology) -> None:
    """SQLALCHEMY_REPLICAS_COOKIE_NAME, _HEADER_NAME and _COOKIE_SECURE from
    app.config shape the token's cookie and header."""
    router = make_router(topology)
    try:
        Base.metadata.create_all(router.primary)
        app = flask.Flask("configured")
        app.config.update(
            SQLALCHEMY_REPLICAS_COOKIE_NAME="causal",
            SQLALCHEMY_REPLICAS_HEADER_NAME="X-Causal",
            SQLALCHEMY_REPLICAS_COOKIE_SECURE=True,
        )
        replicas = Replicas(app, router=router)

        @app.post("/")
        def write() -> str:
            replicas.session.add(Item(name="x"))
            replicas.session.commit()
            return "ok"

        response = app.test_client().post("/")
        token = response.headers["X-Causal"]
        assert response.headers["Set-Cookie"].startswith(f"causal={token}; ")
        assert "; Secure;" in response.headers["Set-Cookie"]
    finally:
        router.dispose()


# -- with Flask-SQLAlchemy ----------------------------------------------------------


class FsaBase(DeclarativeBase):
    pass


class AppSession(sr.RoutingSession, flask_sqlalchemy.session.Session):
    """Flask-SQLAlchemy's session, routed."""


# Made at import time, before any app or router exists: current_router
# gives each session its app's router.
db = flask_sqlalchemy.SQLAlchemy(
    model_class=FsaBase, session_options={"class_": AppSession, "router": current_router}
)


class Note(FsaBase):
    __tablename__ = "note"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(sa.String(50))


@pytest.fixture
def fsa_app(topology: Topology) -> Iterator[tuple[flask.Flask, sr.ReplicaRouter[Engine]]]:
    """An app with Flask-SQLAlchemy and the extension, the router set in the
    factory; its views write a note and list the notes."""
    router = make_router(topology)
    app = flask.Flask("with_flask_sqlalchemy")
    app.config["SQLALCHEMY_DATABASE_URI"] = topology.primary_url.render_as_string(
        hide_password=False
    )
    Replicas(app, router=router)
    db.init_app(app)

    @app.post("/notes")
    def add_note() -> WerkzeugResponse:
        db.session.add(Note(text=flask.request.form["text"]))
        db.session.commit()
        return flask.redirect("/notes", code=303)

    @app.get("/notes")
    def notes() -> str:
        return ",".join(db.session.scalars(sa.select(Note.text).order_by(Note.id)))

    with app.app_context():
        db.create_all()
    topology.wait_for_catchup()
    yield app, router
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()
    router.dispose()


def test_flask_sqlalchemy_sessions_route_through_the_apps_router(
    topology: Topology, fsa_app: tuple[flask.Flask, sr.ReplicaRouter[Engine]]
) -> None:
    """db.session (sessionmaker made at import) routes through the router
    given to init_app: the insert on the primary, the list after the
    redirect on a replica that has applied it, with replicas 0.5 s late;
    the token cookie is set."""
    app, router = fsa_app
    for replica in range(len(topology.replica_urls)):
        topology.set_apply_delay(replica, DELAY)
    client = app.test_client()
    with StatementLog(router) as log:
        response = client.post("/notes", data={"text": "hello"}, follow_redirects=True)
    assert response.get_data(as_text=True) == "hello"
    assert client.get_cookie("db_causal") is not None
    nodes = [s.node for s in log.statements if "note" in s.sql.lower()]
    assert nodes[0] == "primary"
    assert nodes[-1].startswith("replica")
    with app.app_context():
        session = db.session()
        assert isinstance(session, AppSession)
        assert session.router is router
