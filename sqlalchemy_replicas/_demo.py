"""The demo: a real primary and two replicas, a short workload, where each statement went."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from .causal import causal_context
from .consistency import consistency
from .exc import MissingDependency, ServerBinaryNotFound
from .pipelining import WAIT_OBSERVERS
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


class _Transcript(logging.Handler):
    """What one step of the workload did, printed when the next step starts:
    the router's decisions (the ``sqlalchemy_replicas.routing`` logger) and
    the statements each server got, in the order they were sent.

    A causal wait sent with its read is announced after the read was
    recorded (it bypasses the engine's events): it goes in just before
    that read, as the server got them.
    """

    def __init__(self, out: TextIO) -> None:
        super().__init__(logging.DEBUG)
        self.out = out
        # (node or None for a decision, line)
        self._lines: list[tuple[str | None, str]] = []
        self._waits: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        # A flush asks for its bind once per table; one line says it.
        if not (message.startswith("flush") and self._lines and self._lines[-1][1] == message):
            self._lines.append((None, message))

    def wait_sent(self, node: str, sql: str) -> None:
        """The next statement recorded with this text on ``node`` is a wait."""
        self._waits.append((node, sql))

    def statement(self, executed: ExecutedStatement) -> None:
        """StatementLog's ``on_statement``."""
        sql = " ".join(executed.sql.split())
        line = (executed.node, f"{sql[:88]}{'...' if len(sql) > 88 else ''}")
        if (executed.node, executed.sql) in self._waits:
            self._waits.remove((executed.node, executed.sql))
            read = next(
                (
                    i
                    for i in range(len(self._lines) - 1, -1, -1)
                    if self._lines[i][0] == executed.node
                ),
                len(self._lines),
            )
            self._lines.insert(read, line)
        else:
            self._lines.append(line)

    def step(self, code: str) -> None:
        """Print what the step before did, then announce the next one."""
        self.flush_step()
        print(f"\n  >>> {code}", file=self.out)

    def flush_step(self) -> None:
        """Print what the current step did."""
        for node, text in self._lines:
            if node is None:
                print(f"     route  {text}", file=self.out)
            else:
                print(f"     {node:<9}  {text}", file=self.out)
        self._lines.clear()


def _workload(router: ReplicaRouter, topology: Topology, transcript: _Transcript) -> None:
    make_session = router.sessionmaker()
    step = transcript.step

    with causal_context():
        # One request: every session in it reads its commits.
        with make_session() as session:
            step("session.add(Author(..., posts=[Post(...), Post(...)])); session.commit()")
            session.add(Author(id=1, name="Ada", posts=[Post(id=1, title="Notes on the Engine")]))
            session.add(Post(id=2, author_id=1, title="Sketch of the Analytical Engine"))
            session.commit()

        with make_session() as session:
            step("session.get(Author, 1)  # right after the commit, in a new session")
            author = session.get(Author, 1)
            assert author is not None
            step("session.scalars(select(Post).order_by(Post.id)).all()")
            session.scalars(sa.select(Post).order_by(Post.id)).all()
            step("author.posts  # lazy load")
            assert len(author.posts) == 2
            step("session.execute(text('SELECT count(*) FROM post'))")
            session.execute(sa.text("SELECT count(*) FROM post"))

        with make_session() as session:
            step("session.scalars(select(Author).with_for_update()).one()")
            author = session.scalars(sa.select(Author).with_for_update()).one()
            step("author.name = 'Ada Lovelace'; session.flush()")
            author.name = "Ada Lovelace"
            session.flush()
            step("session.scalar(select(Author.name))  # same transaction")
            session.scalar(sa.select(Author.name))
            step("session.commit()")
            session.commit()

        transcript.flush_step()
        print("\n  ... replica1 stops applying changes (replay paused) ...", file=transcript.out)
        topology.pause_replay(0)
        with make_session() as session:
            step("session.add(Post(id=3, ...)); session.commit()")
            session.add(Post(id=3, author_id=1, title="Note G"))
            session.commit()
            for _ in range(2):
                step("session.scalar(select(func.count()).select_from(Post))")
                session.scalar(sa.select(sa.func.count()).select_from(Post))
            with consistency("eventual"):
                step("with consistency('eventual'): session.scalars(select(Post.id)).all()")
                session.scalars(sa.select(Post.id)).all()
            step("session.execute(select(Post).execution_options(consistency='strong'))")
            session.execute(sa.select(Post).execution_options(consistency="strong"))
        topology.resume_replay(0)


def _run(topology: Topology, transcript: _Transcript) -> None:
    out = transcript.out
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
            targets = (router.primary_target, *router.replica_targets)
            nodes = {target.sync_engine: target.name for target in targets}

            def wait_sent(engine: sa.Engine, sql: str) -> None:
                if engine in nodes:
                    transcript.wait_sent(nodes[engine], sql)

            WAIT_OBSERVERS.append(wait_sent)  # before StatementLog's: told first
            try:
                with StatementLog(router, on_statement=transcript.statement) as log:
                    _workload(router, topology, transcript)
                    transcript.flush_step()
            finally:
                WAIT_OBSERVERS.remove(wait_sent)
            counts = log.counts()
            summary = ", ".join(
                f"{node} {counts[node]}" for node in ("primary", *router.replica_names)
            )
            print(f"\n  statements per server: {summary}", file=out)
        finally:
            router.dispose()
    print(f"  all servers stopped, {directory} removed", file=out)


def main(out: TextIO = sys.stdout) -> int:
    """Run the demo on PostgreSQL, and on MariaDB where its server and driver
    are installed (else it says why it skipped MariaDB, and the fix).

    :raises MissingDependency: before any server starts, when psycopg is not
        installed (the PostgreSQL part always runs).
    """
    postgres = PostgresTopology(replicas=2)
    postgres.check_driver()  # at once, not after a server started
    topologies: list[Topology] = [postgres]
    skipped = None
    try:
        mariadb_binaries()
    except ServerBinaryNotFound:
        skipped = "not installed here, skipped (apt-get install mariadb-server)"
    else:
        mariadb = MariaDBTopology(replicas=2)
        try:
            mariadb.check_driver()
        except MissingDependency as error:  # known now, not after the PostgreSQL part
            skipped = f"skipped: {error}"
        else:
            topologies.append(mariadb)
    transcript = _Transcript(out)
    routing_logger = logging.getLogger("sqlalchemy_replicas.routing")
    routing_logger.addHandler(transcript)
    routing_logger.setLevel(logging.DEBUG)
    try:
        for topology in topologies:
            _run(topology, transcript)
        if skipped is not None:
            print(f"\n== MariaDB: {skipped}", file=out)
    finally:
        routing_logger.removeHandler(transcript)
    return 0
