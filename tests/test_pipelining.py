"""A commit's position in the commit's own round trip, and a read's causal wait in
the read's (psycopg 3, MariaDB through PyMySQL and aiomysql), counted in round
trips on real servers."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from types import SimpleNamespace, TracebackType
from typing import Any

import aiomysql
import pymysql
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from typing_extensions import Self

import sqlalchemy_replicas as sr
from sqlalchemy_replicas import pipelining
from sqlalchemy_replicas._listeners import Listeners
from sqlalchemy_replicas.positions import MariaDBPositions, PostgresPositions
from sqlalchemy_replicas.testing import MariaDBTopology, PostgresTopology, StatementLog, Topology


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(sa.String(50))


class RoundTrips:
    """Counts the round trips of the connections ``engine`` checks out while
    active, from libpq's own trace: every round trip ends with the server's
    ReadyForQuery (one per simple query, one per Sync of the extended
    protocol and of a pipeline)."""

    def __init__(self, engine: sa.Engine) -> None:
        self._pool = engine.pool
        # Closed by __exit__, which reads it.
        self._file = tempfile.TemporaryFile("w+")  # noqa: SIM115
        self._traced: list[Any] = []
        #: Round trips of the block, and libpq's trace of it, known once it
        #: is over (its connections back in the pool).
        self.count = 0
        self.trace = ""

    def _trace(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        pgconn = proxy.driver_connection.pgconn
        pgconn.trace(self._file.fileno())
        self._traced.append(pgconn)

    def __enter__(self) -> RoundTrips:
        event.listen(self._pool, "checkout", self._trace)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        event.remove(self._pool, "checkout", self._trace)
        for pgconn in self._traced:
            pgconn.untrace()  # flushes the trace
        with self._file:
            self._file.seek(0, os.SEEK_SET)
            self.trace = self._file.read()
        self.count = self.trace.count("\tReadyForQuery")


@pytest.fixture
def topology(fresh_postgres_topology: PostgresTopology) -> PostgresTopology:
    """The PostgreSQL topology with the item table, replicated."""
    engine = sa.create_engine(fresh_postgres_topology.primary_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    fresh_postgres_topology.wait_for_catchup()
    return fresh_postgres_topology


@pytest.fixture
def router(topology: PostgresTopology) -> Iterator[sr.ReplicaRouter]:
    """A started router over both replicas (its start-up queries are done)."""
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    router.start()
    yield router
    router.dispose()


def write(session: Session, item_id: int) -> None:
    session.add(Item(id=item_id, note=f"n{item_id}"))
    session.commit()


def send_commits(router: sr.ReplicaRouter | sr.ReplicaRouter[AsyncEngine], path: str) -> None:
    """Make the router's primary send ``COMMIT; <position query>`` on ``path``:
    ``"libpq"`` (straight on the libpq connection, with psycopg's internals) or
    ``"cursor"`` (through a psycopg cursor, where those internals are missing)."""
    primary = router.primary
    engine = primary.sync_engine if isinstance(primary, AsyncEngine) else primary
    strategy = engine.dialect.do_commit._strategy  # type: ignore[attr-defined]
    assert isinstance(strategy, pipelining._PostgresCommitAndQuery)
    assert strategy._internals is not None  # psycopg 3.1 to 3.3 have them
    if path == "cursor":
        strategy._internals = None


commit_paths = pytest.mark.parametrize("path", ["libpq", "cursor"])


@pytest.mark.postgresql
@commit_paths
def test_session_commit_costs_the_round_trips_of_a_plain_sessions_commit(
    router: sr.ReplicaRouter, topology: PostgresTopology, path: str
) -> None:
    """A routed session's write and commit take exactly as many round trips to the
    primary as a plain SQLAlchemy Session's on the same server (the position query
    travels with COMMIT), and the position it brought back is the commit's: the
    next read of the row is served by a replica, which had to apply it. So on
    both ways of sending it."""
    send_commits(router, path)
    plain = sa.create_engine(topology.primary_url)
    with RoundTrips(plain) as baseline, Session(plain) as session:
        write(session, 1)
    plain.dispose()
    with RoundTrips(router.primary) as routed, router.sessionmaker()() as session:
        write(session, 2)
    assert baseline.count >= 2  # BEGIN, INSERT and COMMIT, at least
    assert routed.count == baseline.count
    with StatementLog(router) as log, router.sessionmaker()() as session:
        assert session.scalar(sa.select(Item.note).where(Item.id == 2)) == "n2"
    assert log.counts()["primary"] == 0


@pytest.mark.postgresql
def test_without_pipelining_the_position_costs_a_round_trip_of_its_own(
    router: sr.ReplicaRouter, topology: PostgresTopology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saving is real: with the pipelined capture taken away (the commit not
    wrapped), the same write and commit take more round trips than a plain session."""
    plain = sa.create_engine(topology.primary_url)
    with RoundTrips(plain) as baseline, Session(plain) as session:
        write(session, 1)
    plain.dispose()
    wrapper = router.primary.dialect.do_commit
    assert isinstance(wrapper, pipelining._CommitWithCapture)
    monkeypatch.setattr(router.primary.dialect, "do_commit", wrapper._original)
    with RoundTrips(router.primary) as routed, router.sessionmaker()() as session:
        write(session, 2)
    assert routed.count > baseline.count


@pytest.mark.postgresql
def test_savepoints_and_commits_that_wrote_nothing(
    router: sr.ReplicaRouter, topology: PostgresTopology
) -> None:
    """A released savepoint is no commit: a write in one costs a plain session's
    round trips, its position taken once, with the outer COMMIT. A transaction that
    wrote nothing leaves the router's scope where it was, though its COMMIT carried
    the position query and other connections had committed meanwhile."""
    plain = sa.create_engine(topology.primary_url)
    with RoundTrips(plain) as baseline, Session(plain) as session:
        with session.begin_nested():
            session.add(Item(id=1, note="n1"))
        session.commit()
    with RoundTrips(router.primary) as routed, router.sessionmaker()() as session:
        with session.begin_nested():
            session.add(Item(id=2, note="n2"))
        session.commit()
    assert routed.count == baseline.count
    before = router.cluster.process_scope.target(router.cluster)
    with router.sessionmaker(consistency="strong")() as session:
        assert session.scalar(sa.select(Item.note).where(Item.id == 2)) == "n2"
        with Session(plain) as elsewhere:  # WAL the read-only commit's query would cover
            write(elsewhere, 3)
        session.commit()
    plain.dispose()
    assert router.cluster.process_scope.target(router.cluster) == before


@pytest.mark.postgresql
@commit_paths
def test_async_session_commit_costs_no_extra_round_trip(
    topology: PostgresTopology, path: str
) -> None:
    """The same on an async engine (psycopg's AsyncConnection): an AsyncSession's
    write and commit through the router take a plain AsyncSession's round trips,
    and the read after it goes to a replica that applied it, on both ways."""

    async def scenario() -> tuple[int, int, int]:
        plain = create_async_engine(topology.async_primary_url)
        with RoundTrips(plain.sync_engine) as baseline:
            async with AsyncSession(plain) as session:
                session.add(Item(id=1, note="n1"))
                await session.commit()
        await plain.dispose()
        router: sr.ReplicaRouter[AsyncEngine] = sr.ReplicaRouter(
            topology.async_primary_url, topology.async_replica_urls
        )
        try:
            send_commits(router, path)
            await router.astart()
            with RoundTrips(router.primary.sync_engine) as routed:
                async with router.async_sessionmaker()() as session:
                    session.add(Item(id=2, note="n2"))
                    await session.commit()
            with StatementLog(router) as log:
                async with router.async_sessionmaker()() as session:
                    note = await session.scalar(sa.select(Item.note).where(Item.id == 2))
            assert note == "n2"
            return baseline.count, routed.count, log.counts()["primary"]
        finally:
            await router.adispose()

    baseline, routed, primary_reads = asyncio.run(scenario())
    assert baseline >= 2
    assert routed == baseline
    assert primary_reads == 0


@pytest.mark.postgresql
def test_core_commit_on_router_primary_brings_its_position_back(
    router: sr.ReplicaRouter, topology: PostgresTopology
) -> None:
    """A Core commit on router.primary costs a plain engine's round trips, check-in
    included (the pool's reset finds the position, no query), and it is in the
    router's scope: a read-your-writes read of the row goes to a replica."""
    plain = sa.create_engine(topology.primary_url)
    insert = sa.insert(Item)
    with RoundTrips(plain) as baseline, plain.begin() as conn:
        conn.execute(insert, {"id": 1, "note": "n1"})
    plain.dispose()
    with RoundTrips(router.primary) as routed, router.primary.begin() as conn:
        conn.execute(insert, {"id": 2, "note": "n2"})
    assert routed.count == baseline.count
    with StatementLog(router) as log, router.sessionmaker()() as session:
        assert session.scalar(sa.select(Item.note).where(Item.id == 2)) == "n2"
    assert log.counts()["primary"] == 0


@pytest.mark.postgresql
@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("SELECT NULL::text, 8192, 16777216", "in recovery"),  # its answer on a standby
        ("SELECT 1 / (random() > 2)::int", "division by zero"),  # as a cancel would fail it
        ("SELECT 1 WHERE false", "answered 0 rows"),
    ],
)
def test_a_position_query_without_an_answer_leaves_the_commit_done_and_the_position_unknown(
    router: sr.ReplicaRouter,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    query: str,
    why: str,
) -> None:
    """When the query sent with the COMMIT answers no position, or fails after
    the COMMIT succeeded, the COMMIT still stands: the session's commit succeeds,
    a warning says the position is lost and why, and the scope's position is
    unknown: the next read first asks the primary for all it has committed (its
    only statement there), so it is never stale."""

    class NoAnswer(PostgresPositions):
        capture_statement = query

    wrapper = router.primary.dialect.do_commit
    assert isinstance(wrapper, pipelining._CommitWithCapture)
    monkeypatch.setattr(wrapper._strategy, "backend", NoAnswer())
    with caplog.at_level(logging.WARNING), router.sessionmaker()() as session:
        write(session, 1)
    assert "could not read the position of a commit" in caplog.text
    assert why in caplog.text
    with StatementLog(router) as log, router.sessionmaker()() as session:
        assert session.scalar(sa.select(Item.note).where(Item.id == 1)) == "n1"
    on_primary = [s.sql for s in log.statements if s.node == "primary"]
    assert len(on_primary) == 1
    assert "pg_current_wal_flush_lsn" in on_primary[0]


@pytest.mark.postgresql
def test_the_position_query_cannot_fail_on_a_standby(router: sr.ReplicaRouter) -> None:
    """The query sent with each COMMIT answers NULL on a server in recovery,
    where the WAL position functions raise: an error of the combined query is
    always the COMMIT's own."""
    backend = PostgresPositions()
    with router.replicas[0].connect() as conn:
        row = conn.exec_driver_sql(backend.capture_statement).one()
        with pytest.raises(sa.exc.DBAPIError, match="recovery is in progress"):
            conn.exec_driver_sql("SELECT pg_current_wal_flush_lsn()")
    assert row[0] is None
    with pytest.raises(ValueError, match="in recovery"):
        backend.captured(row)


@pytest.mark.postgresql
@commit_paths
def test_a_failing_commit_raises_as_a_commit_error_and_records_nothing(
    router: sr.ReplicaRouter, path: str
) -> None:
    """A COMMIT that fails (a deferred constraint checked at commit) raises from
    session.commit() as SQLAlchemy's IntegrityError, as without pipelining; the
    connection is usable again and nothing was committed."""
    send_commits(router, path)
    with router.primary.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE pair (n int, CONSTRAINT one_n UNIQUE (n) DEFERRABLE INITIALLY DEFERRED)"
        )
    session = router.sessionmaker()()
    session.execute(sa.text("INSERT INTO pair VALUES (1), (1)"))
    with pytest.raises(sa.exc.IntegrityError, match="one_n"):
        session.commit()
    session.close()
    with router.primary.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM pair").scalar() == 0


@pytest.mark.postgresql
def test_dispose_gives_a_users_engine_its_own_commit_back(topology: PostgresTopology) -> None:
    """An engine the application passed in is wrapped for as long as a router uses
    it: two routers share one wrapper, and once both are disposed the dialect's
    own do_commit is back."""
    engine = sa.create_engine(topology.primary_url)
    first = sr.ReplicaRouter(engine, topology.replica_urls)
    second = sr.ReplicaRouter(engine, topology.replica_urls)
    assert isinstance(engine.dialect.do_commit, pipelining._CommitWithCapture)
    first.dispose()
    assert isinstance(engine.dialect.do_commit, pipelining._CommitWithCapture)
    second.dispose()
    assert "do_commit" not in vars(engine.dialect)
    engine.dispose()


@pytest.mark.parametrize(
    "primary_url",
    ["postgresql+psycopg://u@127.0.0.1:1/db", "mysql+pymysql://u@127.0.0.1:1/db"],
    ids=["postgresql", "mariadb"],
)
def test_a_router_adds_no_connection_event_to_the_primary(primary_url: str) -> None:
    """The commit marker and the position capture are dialect methods, not
    connection events: an engine with a connection event listener makes
    SQLAlchemy dispatch events at every statement, begin and commit."""
    replica_url = primary_url.replace(":1/", ":2/")
    router = sr.ReplicaRouter(primary_url, [replica_url])
    engine = router.primary_target.sync_engine
    assert isinstance(engine.dialect.do_commit, pipelining._CommitWithCapture)
    assert isinstance(engine.dialect.do_commit_twophase, pipelining._TwoPhaseCommit)
    assert not engine._has_events
    assert not router.replica_targets[0].sync_engine._has_events
    router.dispose()
    assert "do_commit" not in vars(engine.dialect)
    assert "do_commit_twophase" not in vars(engine.dialect)


def test_a_two_phase_commit_drops_the_position_an_earlier_commit_left() -> None:
    """A two-phase commit does not go through do_commit: the position pipelined
    with an earlier commit on the connection is dropped, so that the
    two-phase commit's own is read after it, not that stale one."""
    committed: list[tuple[object, ...]] = []

    connection = SimpleNamespace(info={pipelining.PIPELINED_KEY: "an earlier's", "other": 1})
    commit = pipelining._TwoPhaseCommit(lambda *args, **kw: committed.append((*args, kw)))
    commit(connection, "xid", is_prepared=True)  # type: ignore[arg-type]
    assert connection.info == {"other": 1}
    assert committed == [(connection, "xid", {"is_prepared": True})]


# -- PostgreSQL: the causal wait and the read behind it, in one round trip ----------


def same_url(url: sa.URL) -> sa.URL:
    return url


class Reads:
    """A started router over replica1 only, its sessions sync (``Session``) or
    async (``AsyncSession``, on an event loop of its own that the pooled
    connections stay on); ``replica_url`` adjusts the replica's URL."""

    def __init__(
        self,
        topology: Topology,
        mode: str,
        replica_url: Callable[[sa.URL], sa.URL] = same_url,
    ) -> None:
        self.is_async = mode == "async"
        self._loop = asyncio.new_event_loop() if self.is_async else None
        if self.is_async:
            self.router: sr.ReplicaRouter[Any] = sr.ReplicaRouter(
                topology.async_primary_url, [replica_url(topology.async_replica_urls[0])]
            )
            self._run(self.router.astart())
        else:
            self.router = sr.ReplicaRouter(
                topology.primary_url, [replica_url(topology.replica_urls[0])]
            )
            self.router.start()
        self.topology = topology
        #: The replica's sync engine (an async engine's ``sync_engine``).
        self.replica: sa.Engine = self.router.replica_targets[0].sync_engine

    def _run(self, work: Any) -> Any:
        assert self._loop is not None
        return self._loop.run_until_complete(work)

    def read_after_write(
        self, item_id: int, *, stream: bool = False
    ) -> tuple[str | None, list[Any]]:
        """Commit a row, then read it back in another session (streamed: on a
        server-side cursor): the note read, and the explain() entries of the read."""
        query = sa.select(Item.note).where(Item.id == item_id)
        if stream:
            query = query.execution_options(yield_per=10)
        if not self.is_async:
            with self.router.sessionmaker()() as session:
                write(session, item_id)
            with sr.explain() as log, self.router.sessionmaker()() as session:
                note = session.scalars(query).first()
            return note, list(log)

        async def scenario() -> tuple[str | None, list[Any]]:
            sessions = self.router.async_sessionmaker()
            async with sessions() as session:
                session.add(Item(id=item_id, note=f"n{item_id}"))
                await session.commit()
            with sr.explain() as log:
                async with sessions() as session:
                    if stream:
                        notes = [n async for n in await session.stream_scalars(query)]
                        note = notes[0] if notes else None
                    else:
                        note = await session.scalar(query)
            return note, list(log)

        result: tuple[str | None, list[Any]] = self._run(scenario())
        return result

    def dispose(self) -> None:
        if self._loop is None:
            self.router.dispose()
            return
        try:
            self._run(self.router.adispose())
        finally:
            self._loop.close()


@pytest.fixture(params=["sync", "async"])
def reads(request: pytest.FixtureRequest, topology: PostgresTopology) -> Iterator[Reads]:
    """A router over replica1 only, with sync sessions, then with async ones."""
    reads = Reads(topology, request.param)
    yield reads
    reads.dispose()


@pytest.mark.postgresql
def test_the_wait_and_the_read_travel_in_one_round_trip(
    reads: Reads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read right after a commit waits for the replica to apply it: on psycopg (sync
    and async) the wait and the read go in one pipeline, one round trip to the replica,
    where the wait sent on its own costs two; the read is right (on async engines its
    rows reach the AsyncSession though SQLAlchemy's adapter did not buffer them), and
    explain() shows the wait, as the statement log does (just before the read, though
    no cursor event saw it)."""
    router = reads.router
    with StatementLog(router) as log, RoundTrips(reads.replica) as together:
        note, entries = reads.read_after_write(1)
    assert note == "n1"
    on_replica = [s.sql for s in log.statements if s.node == "replica1"]
    assert len(on_replica) == 2
    assert "RECURSIVE poll" in on_replica[0]
    assert on_replica[1].startswith("SELECT item.note")
    assert [(e.target, [w.outcome for w in e.waits]) for e in entries] == [
        ("replica1", ["reached"])
    ]
    monkeypatch.setattr(sr.session, "can_defer_wait", lambda connection: False)
    with RoundTrips(reads.replica) as apart:
        note, entries = reads.read_after_write(2)
    assert note == "n2"
    assert [(e.target, [w.outcome for w in e.waits]) for e in entries] == [
        ("replica1", ["reached"])
    ]
    assert together.count == apart.count - 1


@pytest.mark.postgresql
def test_a_failed_wait_discards_the_read_and_the_plan_goes_on(
    reads: Reads, topology: PostgresTopology
) -> None:
    """On a replica that is not applying (replay paused) the wait sent with the read
    is refused at once: the rows read behind it (older than the commit) are
    discarded, the primary serves the read, and explain(), the statement log and
    the counters say so (the discarded read served nothing: no replica decision)."""
    router = reads.router
    topology.pause_replay(0)
    router.reset_stats()
    with StatementLog(router) as statements, RoundTrips(reads.replica) as trips:
        note, entries = reads.read_after_write(1)
    assert note == "n1"
    assert "SELECT item.note" in trips.trace  # sent behind the wait, then discarded
    assert [(e.target, [w.outcome for w in e.waits]) for e in entries] == [("primary", ["failed"])]
    assert router.cluster.wait_failure("replica1") == "stopped"
    reads_by_node = [s.node for s in statements.statements if s.sql.startswith("SELECT item.note")]
    assert reads_by_node == ["primary"]
    stats = router.stats()
    assert stats.decisions_by_target()["replica"] == 0
    assert stats.decisions_by_reason().get("not_caught_up") == 1


@pytest.fixture(
    params=[
        pytest.param(("topology", mode), marks=pytest.mark.postgresql, id=f"postgresql-{mode}")
        for mode in ("sync", "async")
    ]
    + [
        pytest.param(("maria", mode), marks=pytest.mark.mariadb, id=f"mariadb-{mode}")
        for mode in ("sync", "async")
    ]
    + [
        pytest.param(
            ("maria", "sync-plain"),
            marks=pytest.mark.mariadb,
            id="mariadb-sync-without-several-statements",
        )
    ]
)
def any_reads(request: pytest.FixtureRequest) -> Iterator[Reads]:
    """Reads on PostgreSQL and on MariaDB (connections allowing several
    statements, and PyMySQL's without), sync and async."""
    backend, mode = request.param
    topology = request.getfixturevalue(backend)
    if mode == "sync-plain":
        reads = Reads(topology, "sync")
    else:
        reads = Reads(topology, mode, multi_statement if backend == "maria" else same_url)
    yield reads
    reads.dispose()


def kill_client_connections(topology: Topology) -> int:
    """Kill every client connection to replica1 but the admin's own; how many."""
    if isinstance(topology, PostgresTopology):
        killed: int = topology.admin_query(
            0,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
        return killed
    ids = topology.admin_query(
        0,
        "SELECT GROUP_CONCAT(id) FROM information_schema.processlist"
        " WHERE id <> CONNECTION_ID() AND user NOT IN ('system user', 'event_scheduler')",
    )
    connections = str(ids or "").split(",") if ids else []
    topology.admin_execute(0, *(f"KILL CONNECTION {c}" for c in connections))
    return len(connections)


def test_a_lost_connection_under_the_wait_marks_the_replica_down(
    any_reads: Reads, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the replica's connection is gone (killed on the server), the wait
    sent with the read fails with the driver's disconnect error: the replica is
    marked down, and the primary serves the read."""
    reads = any_reads
    reads.read_after_write(1)  # a pooled connection to the replica
    sent: list[str] = []
    monkeypatch.setattr(pipelining, "WAIT_OBSERVERS", [lambda engine, sql: sent.append(sql)])
    assert kill_client_connections(reads.topology) >= 1
    note, entries = reads.read_after_write(2)
    assert note == "n2"
    assert len(sent) == 1  # the wait went with the read
    assert [(e.target, [w.outcome for w in e.waits]) for e in entries] == [("primary", ["failed"])]
    [replica] = reads.router.status()
    assert not replica.healthy
    assert (replica.reason or "").startswith("disconnected")


def test_a_streamed_read_after_a_commit_reads_the_row_on_the_replica(any_reads: Reads) -> None:
    """A streamed read (a server-side cursor) right after a commit waits for the
    replica, and the read, on the replica, returns the row. libpq cannot pipeline
    a server-side cursor, and aiomysql's reads no rows of a query's second
    result: there the wait goes first, on its own (PyMySQL's sends ``<wait>;
    <read>``). The wait is logged just before the read."""
    reads = any_reads
    with StatementLog(reads.router) as log:
        note, entries = reads.read_after_write(1, stream=True)
    assert note == "n1"
    assert [(e.target, [w.outcome for w in e.waits]) for e in entries] == [
        ("replica1", ["reached"])
    ]
    on_replica = [s.sql for s in log.statements if s.node == "replica1"]
    assert len(on_replica) == 2
    wait = "RECURSIVE poll" if isinstance(reads.topology, PostgresTopology) else "MASTER_GTID_WAIT"
    assert wait in on_replica[0]
    assert on_replica[1].startswith("SELECT item.note")


def test_async_engines_keep_the_separate_wait_without_the_adapters_row_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The async wait-and-read fills in SQLAlchemy's psycopg async cursor's private
    row buffer: should a SQLAlchemy release not have it, async engines keep the
    separate wait (sync engines are not concerned)."""
    from sqlalchemy.dialects.postgresql import psycopg as adaption

    url = "postgresql+psycopg_async://nobody@localhost/none"
    listeners = Listeners()
    engine = create_async_engine(url)
    assert pipelining.pipeline_waits(engine.sync_engine, listeners)

    class Unbuffered:
        __slots__ = ("_cursor",)

    monkeypatch.setattr(adaption, "AsyncAdapt_psycopg_cursor", Unbuffered)
    assert not pipelining.pipeline_waits(create_async_engine(url).sync_engine, listeners)
    assert pipelining.pipeline_waits(sa.create_engine(url.replace("_async", "")), listeners)
    listeners.remove_all()


# -- MariaDB: COMMIT; SELECT ... where the connections allow several statements --


class _DriverCounter:
    """Counts something the driver's connections that ``engine`` checks out
    while active do, by patching their class (:meth:`_patch`) for the block."""

    def __init__(self, engine: sa.Engine) -> None:
        self._pool = engine.pool
        self._monkeypatch = pytest.MonkeyPatch()
        self._async = engine.dialect.is_async
        self._drivers: set[int] = set()
        self.count = 0

    def _note(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        self._drivers.add(id(proxy.driver_connection))

    def _patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._patch(self._monkeypatch)
        event.listen(self._pool, "checkout", self._note)
        return self

    def __exit__(self, *exc_info: object) -> None:
        event.remove(self._pool, "checkout", self._note)
        self._monkeypatch.undo()


class Commands(_DriverCounter):
    """Counts the commands PyMySQL (or aiomysql) sends: each one a round trip
    (the driver sends a command and reads its whole answer before the next),
    but for a wait and the read the router sends behind it (counted with
    :class:`ClientTurns`)."""

    def _patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        connection_class: Any = (
            aiomysql.connection.Connection if self._async else pymysql.connections.Connection
        )
        send = connection_class._execute_command

        def counted(connection: Any, command: int, sql: Any) -> Any:
            if id(connection) in self._drivers:
                self.count += 1
            return send(connection, command, sql)  # a coroutine from aiomysql's

        monkeypatch.setattr(connection_class, "_execute_command", counted)


class ClientTurns(_DriverCounter):
    """Counts the round trips of PyMySQL connections: the times a client read an
    answer after sending (commands sent one after the other before reading
    count once)."""

    def _patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        connection_class: Any = pymysql.connections.Connection
        write, read = connection_class._write_bytes, connection_class._read_packet
        sent: set[int] = set()

        def wrote(connection: Any, data: bytes) -> Any:
            if id(connection) in self._drivers:
                sent.add(id(connection))
            return write(connection, data)

        def reading(connection: Any, *args: Any, **kwargs: Any) -> Any:
            if id(connection) in sent:
                sent.discard(id(connection))
                self.count += 1
            return read(connection, *args, **kwargs)

        monkeypatch.setattr(connection_class, "_write_bytes", wrote)
        monkeypatch.setattr(connection_class, "_read_packet", reading)


def multi_statement(url: sa.URL) -> sa.URL:
    """``url`` with connections that allow several statements per query."""
    return url.update_query_dict({"client_flag": str(pymysql.constants.CLIENT.MULTI_STATEMENTS)})


@pytest.fixture
def maria(fresh_mariadb_topology: MariaDBTopology) -> MariaDBTopology:
    """The MariaDB topology with the item table, replicated."""
    engine = sa.create_engine(fresh_mariadb_topology.primary_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    fresh_mariadb_topology.wait_for_catchup()
    return fresh_mariadb_topology


@pytest.mark.mariadb
def test_mariadb_commit_brings_its_gtid_back_when_connections_allow_several_statements(
    maria: MariaDBTopology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On MariaDB with CLIENT.MULTI_STATEMENTS (set by the application), a routed
    session's write and commit cost a plain Session's round trips (COMMIT; SELECT
    @@last_gtid, ... in one query), and the GTID is the commit's: a replica serves
    the read of the row. Without the flag (nor CLIENT.SESSION_TRACK: an engine passed
    in without flags) the position costs round trips of its own."""
    url = multi_statement(maria.primary_url)
    plain = sa.create_engine(url)
    with Commands(plain) as baseline, Session(plain) as session:
        write(session, 1)
    plain.dispose()
    router = sr.ReplicaRouter(url, maria.replica_urls)
    unflagged = sa.create_engine(maria.primary_url)
    two_step = sr.ReplicaRouter(unflagged, maria.replica_urls)
    try:
        router.start()
        two_step.start()
        with Commands(router.primary) as routed, router.sessionmaker()() as session:
            write(session, 2)
        with StatementLog(router) as log, router.sessionmaker()() as session:
            assert session.scalar(sa.select(Item.note).where(Item.id == 2)) == "n2"
        with Commands(two_step.primary) as unpiped, two_step.sessionmaker()() as s:
            write(s, 3)
    finally:
        router.dispose()
        two_step.dispose()
        unflagged.dispose()
    assert baseline.count >= 2  # the INSERT and the COMMIT, at least
    assert routed.count == baseline.count
    assert log.counts()["primary"] == 0
    assert unpiped.count > baseline.count


@pytest.mark.mariadb
def test_mariadb_a_failing_gtid_query_leaves_the_commit_done_and_the_position_unknown(
    maria: MariaDBTopology, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """When the query behind COMMIT fails, the commit stands: the session's commit
    succeeds, a warning says the position is lost, and the next read first asks the
    primary for all it has committed, so it is never stale."""

    class Failing(MariaDBPositions):
        capture_statement = "SELECT no_such_column"

    router = sr.ReplicaRouter(multi_statement(maria.primary_url), maria.replica_urls)
    try:
        router.start()
        wrapper = router.primary.dialect.do_commit
        assert isinstance(wrapper, pipelining._CommitWithCapture)
        failing = pipelining._MariaDBMultiStatement(router.primary.dialect, is_async=False)
        monkeypatch.setattr(failing, "backend", Failing())
        monkeypatch.setattr(failing, "_statement", f"COMMIT; {Failing.capture_statement}")
        monkeypatch.setattr(wrapper, "_strategy", failing)
        with caplog.at_level(logging.WARNING), router.sessionmaker()() as session:
            write(session, 1)
        with StatementLog(router) as log, router.sessionmaker()() as session:
            assert session.scalar(sa.select(Item.note).where(Item.id == 1)) == "n1"
    finally:
        router.dispose()
    assert "could not read the position of a commit" in caplog.text
    assert "no_such_column" in caplog.text
    on_primary = [s.sql for s in log.statements if s.node == "primary"]
    assert len(on_primary) == 1
    assert "gtid_binlog_pos" in on_primary[0]


@pytest.mark.mariadb
def test_mariadb_async_commit_brings_its_gtid_back(
    maria: MariaDBTopology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same through aiomysql: an AsyncSession's write and commit through the
    router cost a plain AsyncSession's round trips, and a replica serves the read."""
    url = multi_statement(maria.async_primary_url)

    async def scenario() -> tuple[int, int, int]:
        plain = create_async_engine(url)
        with Commands(plain.sync_engine) as baseline:
            async with AsyncSession(plain) as session:
                session.add(Item(id=1, note="n1"))
                await session.commit()
        await plain.dispose()
        router: sr.ReplicaRouter[AsyncEngine] = sr.ReplicaRouter(url, maria.async_replica_urls)
        try:
            await router.astart()
            with Commands(router.primary.sync_engine) as routed:
                async with router.async_sessionmaker()() as session:
                    session.add(Item(id=2, note="n2"))
                    await session.commit()
            with StatementLog(router) as log:
                async with router.async_sessionmaker()() as session:
                    note = await session.scalar(sa.select(Item.note).where(Item.id == 2))
            assert note == "n2"
            return baseline.count, routed.count, log.counts()["primary"]
        finally:
            await router.adispose()

    baseline, routed, primary_reads = asyncio.run(scenario())
    assert baseline >= 2
    assert routed == baseline
    assert primary_reads == 0


@pytest.mark.mariadb
@pytest.mark.parametrize(
    ("mode", "several"),
    [("sync", True), ("async", True), ("sync", False)],
    ids=["sync-several-statements", "async-several-statements", "sync-pymysql-default"],
)
def test_mariadb_the_wait_and_the_read_travel_in_one_round_trip(
    maria: MariaDBTopology, monkeypatch: pytest.MonkeyPatch, mode: str, several: bool
) -> None:
    """On a MariaDB replica, a read's wait and the read take one round trip where
    the wait alone costs another, and the read's rows reach the session: as one
    query on connections that allow several statements (PyMySQL, aiomysql), as
    two commands sent before either answer is read on PyMySQL's others. On a
    paused replica the wait fails (with several statements the server stops
    there, and the read never runs; else the read's answer is dropped): the
    primary serves the read, and the connection serves the next read once
    replay resumes."""
    reads = Reads(maria, mode, multi_statement if several else same_url)
    trips: Callable[[sa.Engine], Commands | ClientTurns] = Commands if several else ClientTurns
    router = reads.router
    try:
        replica = reads.replica
        with StatementLog(router) as log, trips(replica) as together:
            note, entries = reads.read_after_write(1)
        assert note == "n1"
        on_replica = [s.sql for s in log.statements if s.node == "replica1"]
        assert len(on_replica) == 2
        assert "MASTER_GTID_WAIT" in on_replica[0]
        assert on_replica[1].startswith("SELECT item.note")
        assert [(e.target, [w.outcome for w in e.waits]) for e in entries] == [
            ("replica1", ["reached"])
        ]
        with monkeypatch.context() as patch, trips(replica) as apart:
            patch.setattr(sr.session, "can_defer_wait", lambda connection: False)
            note, entries = reads.read_after_write(2)
        assert note == "n2"
        assert [(e.target, [w.outcome for w in e.waits]) for e in entries] == [
            ("replica1", ["reached"])
        ]
        assert together.count == apart.count - 1
        maria.pause_replay(0)
        with StatementLog(router) as statements:
            note, entries = reads.read_after_write(3)
        assert note == "n3"
        assert [(e.target, [w.outcome for w in e.waits]) for e in entries] == [
            ("primary", ["failed"])
        ]
        assert router.cluster.wait_failure("replica1") == "stopped"
        reads_by_node = [
            s.node for s in statements.statements if s.sql.startswith("SELECT item.note")
        ]
        assert reads_by_node == ["primary"]
        maria.resume_replay(0)
        note, entries = reads.read_after_write(4)
        assert note == "n4"
        assert [(e.target, [w.outcome for w in e.waits]) for e in entries] == [
            ("replica1", ["reached"])
        ]
        pool = replica.pool
        assert isinstance(pool, sa.pool.QueuePool)
        assert (pool.checkedout(), pool.checkedin()) == (0, 1)  # one connection, used again
    finally:
        reads.dispose()


def test_without_pymysqls_private_methods_plain_connections_keep_the_wait_apart(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PyMySQL without the private methods the two commands are sent with:
    reads on its connections without several statements keep the separate
    wait (the wrapper says it cannot take the wait); nothing else changes."""
    plain, several = (
        SimpleNamespace(
            dialect=SimpleNamespace(is_mariadb=True),
            connection=SimpleNamespace(driver_connection=SimpleNamespace(client_flag=flags)),
        )
        for flags in (0, pymysql.constants.CLIENT.MULTI_STATEMENTS)
    )
    with_methods = pipelining._MariaDBExecuteBehindWait(lambda *args: None)
    assert with_methods.can_defer(plain)  # type: ignore[arg-type]
    monkeypatch.delattr(pymysql.connections.Connection, "_read_query_result")
    without = pipelining._MariaDBExecuteBehindWait(lambda *args: None)
    assert not without.can_defer(plain)  # type: ignore[arg-type]
    assert without.can_defer(several)  # type: ignore[arg-type]


# -- MariaDB: the GTID in COMMIT's OK packet (session state tracking) ---------------


def session_track(url: sa.URL) -> sa.URL:
    """``url`` with connections that ask for CLIENT.SESSION_TRACK (as an
    application sets it on an engine it passes in)."""
    return url.update_query_dict({"client_flag": str(pymysql.constants.CLIENT.SESSION_TRACK)})


class TrackedCommits:
    """Records, for each commit the tracked strategy makes, the row it read from
    the OK packet and what ``SELECT @@last_gtid`` then says on the connection."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[tuple[Any, str]] = []
        commit = pipelining._MariaDBTrackedCommit.commit_and_capture

        def spied(strategy: Any, driver: Any) -> Any:
            answer = commit(strategy, driver)
            with driver.cursor() as cursor:
                cursor.execute("SELECT @@last_gtid")
                self.seen.append((answer[0], cursor.fetchone()[0]))
            return answer

        monkeypatch.setattr(pipelining._MariaDBTrackedCommit, "commit_and_capture", spied)


@pytest.mark.mariadb
def test_mariadb_commit_brings_its_gtid_back_in_its_ok_packet(
    maria: MariaDBTopology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without multiple statements, on connections the router built from a URL, a
    routed session's write and commit cost a plain Session's round trips: the
    router asks for CLIENT.SESSION_TRACK and has the server track last_gtid, whose
    new value comes back in COMMIT's OK packet. It is what SELECT @@last_gtid says
    after the commit, and a replica that applied it serves the read of the row."""
    plain = sa.create_engine(maria.primary_url)
    with Commands(plain) as baseline, Session(plain) as session:
        write(session, 1)
    plain.dispose()
    router = sr.ReplicaRouter(maria.primary_url, maria.replica_urls)
    try:
        router.start()
        with Commands(router.primary) as routed, router.sessionmaker()() as session:
            write(session, 2)
        spy = TrackedCommits(monkeypatch)
        with router.sessionmaker()() as session:
            write(session, 3)
        with StatementLog(router) as log, router.sessionmaker()() as session:
            assert session.scalar(sa.select(Item.note).where(Item.id == 3)) == "n3"
        # A write that changes no row writes nothing to the binlog: no new
        # last_gtid in the packet, and the position is asked after the commit.
        with StatementLog(router) as nothing_written, router.sessionmaker()() as session:
            session.execute(sa.update(Item).where(Item.id == 99).values(note="x"))
            session.commit()
    finally:
        router.dispose()
    assert baseline.count >= 2  # the INSERT and the COMMIT, at least
    assert routed.count == baseline.count
    (row, last_gtid), (nothing, _) = spy.seen
    assert row is not pipelining._ASK_AFTER
    assert row[0] == last_gtid
    assert log.counts()["primary"] == 0
    assert nothing is pipelining._ASK_AFTER
    on_primary = [s.sql for s in nothing_written.statements if s.node == "primary"]
    assert on_primary[-1] == MariaDBPositions.capture_statement


@pytest.mark.mariadb
def test_mariadb_an_engine_passed_in_with_session_track_commits_in_one_round_trip(
    maria: MariaDBTopology,
) -> None:
    """An engine the application passes in gets the tracking when its URL asks for
    CLIENT.SESSION_TRACK (the router does not change its flags): its commits cost a
    plain Session's round trips; one without the flag pays the position query."""
    plain = sa.create_engine(maria.primary_url)
    with Commands(plain) as baseline, Session(plain) as session:
        write(session, 1)
    plain.dispose()
    tracked = sa.create_engine(session_track(maria.primary_url))
    untracked = sa.create_engine(maria.primary_url)
    routers = [sr.ReplicaRouter(e, maria.replica_urls) for e in (tracked, untracked)]
    try:
        for router in routers:
            router.start()
        with Commands(tracked) as one, routers[0].sessionmaker()() as session:
            write(session, 2)
        with Commands(untracked) as two, routers[1].sessionmaker()() as session:
            write(session, 3)
    finally:
        for router in routers:
            router.dispose()
        tracked.dispose()
        untracked.dispose()
    assert one.count == baseline.count
    assert two.count == baseline.count + 1


@pytest.mark.mariadb
def test_mariadb_without_the_tracked_gtid_the_position_is_asked_after_the_commit(
    maria: MariaDBTopology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When COMMIT's OK packet lacks last_gtid (tracking turned off on the
    connection; a commit that wrote nothing to the binlog), the commit stands and
    the position is read after it, as without pipelining: a round trip more, and
    still the right position (a replica serves the read of the row)."""
    plain = sa.create_engine(maria.primary_url)
    with Commands(plain) as baseline, Session(plain) as session:
        write(session, 1)
    plain.dispose()
    router = sr.ReplicaRouter(maria.primary_url, maria.replica_urls)

    def untrack(dbapi_connection: Any, record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET SESSION session_track_system_variables = ''")

    try:
        # After the router's own connect listener, which turned tracking on.
        event.listen(router.primary, "connect", untrack)
        router.start()
        with Commands(router.primary) as routed, router.sessionmaker()() as session:
            write(session, 2)
        spy = TrackedCommits(monkeypatch)  # its query would count
        with router.sessionmaker()() as session:
            write(session, 3)
        with StatementLog(router) as log, router.sessionmaker()() as session:
            assert session.scalar(sa.select(Item.note).where(Item.id == 3)) == "n3"
    finally:
        router.dispose()
    assert [row for row, _ in spy.seen] == [pipelining._ASK_AFTER]
    assert routed.count == baseline.count + 1
    assert log.counts()["primary"] == 0


@pytest.mark.mariadb
def test_mariadb_session_track_leaves_ordinary_statements_as_they_were(
    maria: MariaDBTopology,
) -> None:
    """With CLIENT.SESSION_TRACK on and last_gtid tracked, PyMySQL still reads every
    other answer right: the connection keeps SQLAlchemy's flags (FOUND_ROWS: an
    UPDATE counts matched rows), tracking opened no transaction, and inserts
    (lastrowid), executemany, warnings and result sets read as without it."""
    router = sr.ReplicaRouter(maria.primary_url, maria.replica_urls)
    try:
        router.start()
        with router.primary.connect() as connection:
            driver = connection.connection.driver_connection
            assert driver is not None
            flags = pymysql.constants.CLIENT
            assert driver.client_flag & flags.SESSION_TRACK
            assert driver.client_flag & flags.FOUND_ROWS
            assert not driver.server_status & pymysql.constants.SERVER_STATUS.SERVER_STATUS_IN_TRANS
            tracked = connection.exec_driver_sql("SELECT @@session_track_system_variables")
            assert "last_gtid" in tracked.scalar_one().split(",")
            connection.exec_driver_sql(
                "CREATE TABLE counted (id INT AUTO_INCREMENT PRIMARY KEY, v INT)"
            )
            inserted = connection.exec_driver_sql("INSERT INTO counted (v) VALUES (1)")
            assert inserted.lastrowid == 1
            many = connection.exec_driver_sql(
                "INSERT INTO counted (v) VALUES (%s)", [(2,), (3,), (4,)]
            )
            assert many.rowcount == 3
            same = connection.exec_driver_sql("UPDATE counted SET v = 1 WHERE id = 1")
            assert same.rowcount == 1  # matched, not changed: FOUND_ROWS
            cursor = driver.cursor()
            cursor.execute("SELECT CAST('abc' AS SIGNED)")
            assert cursor.fetchall() == ((0,),)
            assert cursor.warning_count == 1
            cursor.execute("SHOW WARNINGS")
            assert cursor.fetchall()[0][1] == 1292
            connection.commit()
            rows = connection.exec_driver_sql("SELECT id, v FROM counted ORDER BY id").all()
            assert [tuple(r) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    finally:
        router.dispose()


def test_mariadb_without_the_private_methods_pymysql_commits_as_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A PyMySQL without the private methods the tracked commit uses: its commits
    are the multi-statement ones or the dialect's own, and no connection is changed."""
    monkeypatch.delattr(pymysql.connections.Connection, "_read_ok_packet")
    engine = sa.create_engine("mysql+pymysql://u:p@127.0.0.1:1/app")
    connect = len(engine.pool.dispatch.connect), len(engine.dialect.dispatch.do_connect)
    listeners = Listeners()
    assert pipelining.pipeline_commits(engine, listeners, owned=True)
    strategy = engine.dialect.do_commit._strategy  # type: ignore[attr-defined]
    assert isinstance(strategy, pipelining._MariaDBMultiStatement)
    # Nothing asks for the flag nor turns the tracking on.
    assert (len(engine.pool.dispatch.connect), len(engine.dialect.dispatch.do_connect)) == connect
    listeners.remove_all()


def lenenc(data: bytes) -> bytes:
    """``data`` as a length-encoded string."""
    n = len(data)
    if n < 0xFB:
        head = bytes([n])
    elif n < 2**16:
        head = b"\xfc" + n.to_bytes(2, "little")
    else:
        head = b"\xfd" + n.to_bytes(3, "little")
    return head + data


# What MariaDB 10.11 sent after a COMMIT (status and warnings before it):
# no info, then the session state: last_gtid = 0-1-8.
COMMIT_OK = b"\x00\x12\x00\x10\tlast_gtid\x050-1-8"

names = st.sampled_from([b"last_gtid", b"autocommit", b"time_zone", b"last_gtid_x", b""])
values = st.binary(max_size=300)
entries = st.one_of(
    st.tuples(st.just(0), names, values),
    st.tuples(st.integers(1, 255), st.just(b""), st.binary(max_size=300)),
)


def test_the_tracked_last_gtid_is_read_from_a_real_commits_ok_packet() -> None:
    """The bytes MariaDB sent after a COMMIT give its GTID; any cut of them gives
    none; a packet without session state, or with other variables, gives none."""
    assert pipelining._tracked_variable(COMMIT_OK, b"last_gtid") == b"0-1-8"
    assert pipelining._tracked_variable(COMMIT_OK, b"autocommit") is None
    for cut in range(len(COMMIT_OK)):
        assert pipelining._tracked_variable(COMMIT_OK[:cut], b"last_gtid") is None
    assert pipelining._tracked_variable(COMMIT_OK + b"\x00", b"last_gtid") is None
    assert pipelining._tracked_variable(b"", b"last_gtid") is None
    assert pipelining._tracked_variable(b"\xfb\x00", b"last_gtid") is None


@settings(max_examples=300, deadline=None)
@given(info=st.binary(max_size=300), state=st.lists(entries, max_size=6))
def test_the_tracked_variable_is_the_last_one_of_its_name_in_any_session_state(
    info: bytes, state: list[tuple[int, bytes, bytes]]
) -> None:
    """In any session state (entries of any type, lengths of one or three bytes),
    the value read is that of the last system-variable entry of that name (None
    when there is none), and every cut of the packet reads as nothing."""
    block = b""
    for kind, name, value in state:
        data = lenenc(name) + lenenc(value) if kind == 0 else value
        block += bytes([kind]) + lenenc(data)
    message = lenenc(info) + lenenc(block)
    expected = [value for kind, name, value in state if kind == 0 and name == b"last_gtid"]
    read = pipelining._tracked_variable(message, b"last_gtid")
    assert read == (expected[-1] if expected else None)
    for cut in range(0, len(message), max(1, len(message) // 20)):
        assert pipelining._tracked_variable(message[:cut], b"last_gtid") is None
