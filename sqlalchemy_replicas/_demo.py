"""The demo: a real primary and two replicas, a short workload, where each statement went."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .causal import causal_context
from .consistency import consistency
from .exc import ServerBinaryNotFound
from .router import ReplicaRouter
from .testing import MariaDBTopology, PostgresTopology, StatementLog, Topology
from .testing._binaries import mariadb_binaries
from .testing.recording import ExecutedStatement


class _Base(DeclarativeBase):
    pass


class Author(_Base):
    __tablename__ = "author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    posts: Mapped[list[Post]] = relationship(back_populates="author", order_by="Post.id")


class Post(_Base):
    __tablename__ = "post"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("author.id"))
    title: Mapped[str] = mapped_column(sa.String(80))
    author: Mapped[Author] = relationship(back_populates="posts")


class _RouteEcho(logging.Handler):
    """Prints the router's decisions (the ``sqlalchemy_replicas.routing`` logger)."""

    def __init__(self, out: TextIO) -> None:
        super().__init__(logging.DEBUG)
        self.out = out
        self._last = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        # A flush asks for its bind once per table; one line says it.
        if message != self._last or not message.startswith("flush"):
            print(f"     route  {message}", file=self.out)
        self._last = message


def _echo_statement(out: TextIO) -> Callable[[ExecutedStatement], None]:
    def echo(executed: ExecutedStatement) -> None:
        sql = " ".join(executed.sql.split())
        print(f"     {executed.node:<9}  {sql[:88]}{'...' if len(sql) > 88 else ''}", file=out)

    return echo


def _step(out: TextIO, code: str) -> None:
    print(f"\n  >>> {code}", file=out)


def _workload(router: ReplicaRouter, topology: Topology, out: TextIO) -> None:
    make_session = router.sessionmaker()

    with causal_context():
        # One request: every session in it reads its commits.
        with make_session() as session:
            _step(out, "session.add(Author(..., posts=[Post(...), Post(...)])); session.commit()")
            session.add(Author(id=1, name="Ada", posts=[Post(id=1, title="Notes on the Engine")]))
            session.add(Post(id=2, author_id=1, title="Sketch of the Analytical Engine"))
            session.commit()

        with make_session() as session:
            _step(out, "session.get(Author, 1)  # right after the commit, in a new session")
            author = session.get(Author, 1)
            assert author is not None
            _step(out, "session.scalars(select(Post).order_by(Post.id)).all()")
            session.scalars(sa.select(Post).order_by(Post.id)).all()
            _step(out, "author.posts  # lazy load")
            assert len(author.posts) == 2
            _step(out, "session.execute(text('SELECT count(*) FROM post'))")
            session.execute(sa.text("SELECT count(*) FROM post"))

        with make_session() as session:
            _step(out, "session.scalars(select(Author).with_for_update()).one()")
            author = session.scalars(sa.select(Author).with_for_update()).one()
            _step(out, "author.name = 'Ada Lovelace'; session.flush()")
            author.name = "Ada Lovelace"
            session.flush()
            _step(out, "session.scalar(select(Author.name))  # same transaction")
            session.scalar(sa.select(Author.name))
            _step(out, "session.commit()")
            session.commit()

        print("\n  ... replica1 stops applying changes (replay paused) ...", file=out)
        topology.pause_replay(0)
        with make_session() as session:
            _step(out, "session.add(Post(id=3, ...)); session.commit()")
            session.add(Post(id=3, author_id=1, title="Note G"))
            session.commit()
            for _ in range(2):
                _step(out, "session.scalar(select(func.count()).select_from(Post))")
                session.scalar(sa.select(sa.func.count()).select_from(Post))
            with consistency("eventual"):
                _step(out, "with consistency('eventual'): session.scalars(select(Post.id)).all()")
                session.scalars(sa.select(Post.id)).all()
            _step(out, "session.execute(select(Post).execution_options(consistency='strong'))")
            session.execute(sa.select(Post).execution_options(consistency="strong"))
        topology.resume_replay(0)


def _run(topology: Topology, out: TextIO) -> None:
    started = time.perf_counter()
    with topology:
        elapsed = time.perf_counter() - started
        directory = topology.directory
        print(
            f"\n== {topology.server_version()}: primary + 2 replicas up in {elapsed:.1f} s",
            file=out,
        )
        urls = (
            ("primary", topology.primary_url),
            *zip(topology.replica_names, topology.replica_urls, strict=True),
        )
        for name, url in urls:
            print(f"   {name:<9} {url.render_as_string(hide_password=True)}", file=out)
        router = ReplicaRouter(topology.primary_url, topology.replica_urls)
        try:
            _Base.metadata.create_all(router.primary)
            topology.wait_for_catchup()
            with StatementLog(router, on_statement=_echo_statement(out)) as log:
                _workload(router, topology, out)
            counts = log.counts()
            summary = ", ".join(
                f"{node} {counts[node]}" for node in ("primary", *router.replica_names)
            )
            print(f"\n  statements per server: {summary}", file=out)
        finally:
            router.dispose()
    print(f"  all servers stopped, {directory} removed", file=out)


def main(out: TextIO = sys.stdout) -> int:
    """Run the demo on PostgreSQL, and on MariaDB where it is installed.

    :raises MissingDependency: before any server starts, when the driver of
        a database the demo will run is not installed.
    """
    topologies: list[Topology] = [PostgresTopology(replicas=2)]
    try:
        mariadb_binaries()
    except ServerBinaryNotFound:
        mariadb_missing = True
    else:
        mariadb_missing = False
        topologies.append(MariaDBTopology(replicas=2))
    # Every driver up front: a missing PyMySQL must not surface only after
    # the whole PostgreSQL part has run.
    for topology in topologies:
        topology.check_driver()
    echo = _RouteEcho(out)
    routing_logger = logging.getLogger("sqlalchemy_replicas.routing")
    routing_logger.addHandler(echo)
    routing_logger.setLevel(logging.DEBUG)
    try:
        for topology in topologies:
            _run(topology, out)
        if mariadb_missing:
            print(
                "\n== MariaDB: not installed here, skipped (apt-get install mariadb-server)",
                file=out,
            )
    finally:
        routing_logger.removeHandler(echo)
    return 0
