"""Tables of another database, chosen by a wrapped session class's get_bind.

RoutingSession combined with a Session subclass that picks engines itself
(Flask-SQLAlchemy's ``__bind_key__`` binds, or a plain ``get_bind``
override) lets that choice stand when it names another database: inserts
land there and reads come from there, while models of the router's database
are routed as usual. Against the real topologies, with the real Flask and
Flask-SQLAlchemy; "another database" is a second database (PostgreSQL) or
schema (MariaDB) on the topology's primary server, and the main database
has a table of the same name, so that a misrouted statement would succeed
silently there instead of failing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import flask
import flask_sqlalchemy
import flask_sqlalchemy.session
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.exc import ConfigurationError
from sqlalchemy_replicas.testing import MariaDBTopology, StatementLog, Topology

OTHER = "other_db"


class AppSession(sr.RoutingSession, flask_sqlalchemy.session.Session):
    """The combination the RoutingSession docstring recommends for Flask."""


class Base(DeclarativeBase):
    pass


db = flask_sqlalchemy.SQLAlchemy(model_class=Base, session_options={"class_": AppSession})

if TYPE_CHECKING:
    # Flask-SQLAlchemy's Model is made at run time; type checkers see the base.
    Model = Base
else:
    Model = db.Model


class Account(Model):
    """A model of the default bind: the router's database."""

    __tablename__ = "account"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(50))


class Note(Model):
    """A model of the bind key ``other``: another database."""

    __bind_key__ = "other"
    __tablename__ = "note"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(sa.String(50))


def table_of(model: type[Base] | type[ArchiveBase]) -> sa.Table:
    table = model.__table__
    assert isinstance(table, sa.Table)
    return table


def note_rows(engine: Engine) -> list[tuple[int, str]]:
    """The note table's rows as a separate connection to ``engine`` sees them."""
    with engine.connect() as conn:
        return [
            (r.id, r.text) for r in conn.execute(sa.text("SELECT id, text FROM note ORDER BY id"))
        ]


def notes_on_router(log: StatementLog) -> list[str]:
    """The nodes of the router that statements naming the note table ran on."""
    return [s.node for s in log.statements if "note" in s.sql.lower()]


def account_nodes(log: StatementLog) -> list[str]:
    return [s.node for s in log.statements if "account" in s.sql.lower()]


@pytest.fixture
def other_url(topology: Topology) -> Iterator[URL]:
    """A second, empty database on the topology's primary server, and its URL."""
    url = topology.primary_url.set(database=OTHER)
    if isinstance(topology, MariaDBTopology):
        # The app user's grants are limited to its own schema (so that
        # read_only binds it on replicas): only root can add another.
        topology.admin_execute(
            "primary",
            f"DROP DATABASE IF EXISTS {OTHER}",
            f"CREATE DATABASE {OTHER}",
            f"GRANT ALL ON {OTHER}.* TO 'app'@'%'",
        )
        yield url
        topology.admin_execute("primary", f"DROP DATABASE IF EXISTS {OTHER}")
        return
    admin = sa.create_engine(topology.primary_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {OTHER} WITH (FORCE)")
            conn.exec_driver_sql(f"CREATE DATABASE {OTHER}")
        yield url
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {OTHER} WITH (FORCE)")
    finally:
        admin.dispose()


@pytest.fixture
def router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    yield router
    router.dispose()


@pytest.fixture
def app(topology: Topology, router: sr.ReplicaRouter, other_url: URL) -> Iterator[flask.Flask]:
    """A Flask app whose default bind is the router's primary and whose bind
    ``other`` is the other database, with its tables, inside an app context.

    The main database has a note table too, with a decoy row: a statement
    misrouted there would succeed and show the decoy.
    """
    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = topology.primary_url.render_as_string(
        hide_password=False
    )
    app.config["SQLALCHEMY_BINDS"] = {"other": other_url.render_as_string(hide_password=False)}
    db.init_app(app)
    with app.app_context():
        # What an application passes as session_options={"router": ...};
        # here the router is made per test.
        db.session.configure(router=router)
        db.create_all()
        table_of(Note).create(router.primary)
        with router.primary.begin() as conn:
            conn.execute(sa.insert(table_of(Note)), {"id": 99, "text": "decoy in main"})
            conn.execute(sa.insert(table_of(Account)), {"id": 1, "name": "ada"})
        topology.wait_for_catchup()
        router.start()
        yield app
        db.session.remove()
        for engine in db.engines.values():
            engine.dispose()


def test_insert_of_a_bind_key_model_lands_in_its_database(
    app: flask.Flask, router: sr.ReplicaRouter
) -> None:
    """A flush that inserts a __bind_key__ model writes to that bind's database,
    not the router's primary; a default model in the same flush goes to the
    primary."""
    with StatementLog(router) as log:
        db.session.add(Note(id=1, text="hello"))
        db.session.add(Account(id=2, name="grace"))
        db.session.commit()
    assert note_rows(db.engines["other"]) == [(1, "hello")]
    assert note_rows(router.primary) == [(99, "decoy in main")]
    assert notes_on_router(log) == []
    assert account_nodes(log) == ["primary"]


def test_reads_of_a_bind_key_model_come_from_its_database(
    app: flask.Flask, router: sr.ReplicaRouter
) -> None:
    """get(), select() and a lazy refresh of a __bind_key__ model run on that
    bind's engine, none on the router's primary or replicas."""
    other = db.engines["other"]
    with other.begin() as conn:
        conn.execute(sa.insert(table_of(Note)), {"id": 1, "text": "in other"})
    on_other: list[str] = []

    def record(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        on_other.append(statement)

    sa.event.listen(other, "before_cursor_execute", record)
    try:
        with StatementLog(router) as log:
            note = db.session.get(Note, 1)
            assert note is not None
            assert note.text == "in other"
            assert db.session.scalars(sa.select(Note.text)).all() == ["in other"]
            db.session.expire(note)
            assert note.text == "in other"
    finally:
        sa.event.remove(other, "before_cursor_execute", record)
    assert notes_on_router(log) == []
    assert len([s for s in on_other if "note" in s.lower()]) == 3


def test_default_models_are_routed_as_usual(app: flask.Flask, router: sr.ReplicaRouter) -> None:
    """A default-bind model's reads go to a replica and its writes to the
    primary, beside a __bind_key__ model's statements."""
    with StatementLog(router) as log:
        assert db.session.get(Note, 5) is None
        assert db.session.scalars(sa.select(Account.name)).all() == ["ada"]
        db.session.commit()
        db.session.add(Account(id=3, name="edsger"))
        db.session.commit()
    nodes = account_nodes(log)
    assert nodes[0].startswith("replica")
    assert nodes[1:] == ["primary"]


def test_core_and_bulk_statements_of_a_bind_key_table_run_in_its_database(
    app: flask.Flask, router: sr.ReplicaRouter
) -> None:
    """Core INSERT on the table, ORM bulk INSERT and an UPDATE with
    synchronize_session="fetch" (whose pre-select MariaDB needs) all run in
    the other database, in one transaction there."""
    with StatementLog(router) as log:
        db.session.execute(sa.insert(table_of(Note)), {"id": 1, "text": "core"})
        db.session.execute(sa.insert(Note), [{"id": 2, "text": "bulk"}, {"id": 3, "text": "b"}])
        db.session.execute(
            sa.update(Note).where(Note.id >= 2).values(text="updated"),
            execution_options={"synchronize_session": "fetch"},
        )
        assert note_rows(db.engines["other"]) == []  # not committed yet
        db.session.commit()
    assert note_rows(db.engines["other"]) == [(1, "core"), (2, "updated"), (3, "updated")]
    assert note_rows(router.primary) == [(99, "decoy in main")]
    assert notes_on_router(log) == []


def test_a_default_bind_that_is_not_the_primary_fails_loudly(
    topology: Topology, router: sr.ReplicaRouter, other_url: URL
) -> None:
    """When the Flask default bind is not the router's primary, a default
    model's statement raises ConfigurationError naming the model and the fix,
    and nothing is written anywhere."""
    app = flask.Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = other_url.render_as_string(hide_password=False)
    app.config["SQLALCHEMY_BINDS"] = {"other": other_url.render_as_string(hide_password=False)}
    db.init_app(app)
    with app.app_context():
        db.session.configure(router=router)
        table_of(Account).create(router.primary)
        try:
            db.session.add(Account(id=1, name="ada"))
            with pytest.raises(ConfigurationError, match=r"model Account.*SQLALCHEMY_DATABASE_URI"):
                db.session.flush()
            db.session.rollback()
            with pytest.raises(ConfigurationError, match="model Account"):
                db.session.scalars(sa.select(Account)).all()
        finally:
            db.session.remove()
            for engine in db.engines.values():
                engine.dispose()
    with router.primary.connect() as conn:
        assert conn.scalar(sa.select(sa.func.count()).select_from(table_of(Account))) == 0


# -- plain SQLAlchemy: a Session subclass with its own get_bind ----------------------


class ArchiveBase(DeclarativeBase):
    pass


class Archived(ArchiveBase):
    """A model that lives in another database (the archive)."""

    __tablename__ = "note"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(sa.String(50))


class ArchiveSession(Session):
    """Sends ArchiveBase models to the engine in ``info["archive"]``, the rest
    to SQLAlchemy's own choice, as SQLAlchemy's vertical partitioning recipe
    does."""

    def get_bind(
        self,
        mapper: Any = None,
        clause: Any = None,
        **kw: Any,
    ) -> Engine | Connection:
        if mapper is not None and issubclass(sa.inspect(mapper).class_, ArchiveBase):
            engine: Engine = self.info["archive"]
            return engine
        return super().get_bind(mapper, clause=clause, **kw)


class RoutingArchiveSession(sr.RoutingSession, ArchiveSession):
    pass


def test_a_plain_get_bind_override_sends_its_models_to_their_database(
    topology: Topology, router: sr.ReplicaRouter, other_url: URL
) -> None:
    """A plain Session subclass's get_bind choice of another database stands
    for flushes and reads; its fallback to Session.get_bind routes."""
    archive = sa.create_engine(other_url)
    try:
        ArchiveBase.metadata.create_all(archive)
        ArchiveBase.metadata.create_all(router.primary)
        table_of(Account).create(router.primary)
        topology.wait_for_catchup()
        router.start()
        make = sessionmaker(class_=RoutingArchiveSession, router=router, info={"archive": archive})
        with StatementLog(router) as log, make() as session:
            session.add(Archived(id=1, text="archived"))
            session.commit()
            assert session.scalars(sa.select(Archived.text)).all() == ["archived"]
            session.scalars(sa.select(Account)).all()
            session.add(Account(id=1, name="ada"))
            session.commit()
        assert note_rows(archive) == [(1, "archived")]
        assert note_rows(router.primary) == []
        assert notes_on_router(log) == []
        nodes = account_nodes(log)
        assert nodes[0].startswith("replica")
        assert nodes[1:] == ["primary"]
    finally:
        archive.dispose()
