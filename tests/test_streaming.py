"""Streamed reads (``stream_results``, ORM ``yield_per``, ``AsyncSession.stream``)
on replicas, against real replicated servers.

Replica connections are AUTOCOMMIT, and PostgreSQL refuses a server-side
cursor outside a transaction: a streamed read takes its connection out of
AUTOCOMMIT until the connection goes back to the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import PostgresTopology, StatementLog, Topology

ROWS = 250


class Base(DeclarativeBase):
    pass


class Reading(Base):
    __tablename__ = "reading"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


def seed(topology: Topology) -> None:
    engine = sa.create_engine(topology.primary_url)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(Reading), [{"id": i} for i in range(1, ROWS + 1)])
    finally:
        engine.dispose()
    topology.wait_for_catchup()


@pytest.fixture
def router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    seed(topology)
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls[:1])
    router.start()
    yield router
    router.dispose()


def reading_nodes(log: StatementLog) -> list[str]:
    return [s.node for s in log.statements if "reading" in s.sql.lower()]


def test_yield_per_and_stream_results_read_every_row_on_a_replica(
    router: sr.ReplicaRouter,
) -> None:
    """ORM yield_per and Core stream_results reads run on the replica and return every row."""
    with StatementLog(router) as log, router.sessionmaker()() as session:
        by_orm = [r.id for r in session.scalars(sa.select(Reading).execution_options(yield_per=40))]
        streamed = session.execute(
            sa.select(Reading.id).order_by(Reading.id).execution_options(stream_results=True)
        )
        by_core = [row.id for part in streamed.partitions(60) for row in part]
    assert sorted(by_orm) == by_core == list(range(1, ROWS + 1))
    assert reading_nodes(log) == ["replica1", "replica1"]


def test_async_stream_reads_every_row_on_a_replica(topology: Topology) -> None:
    """AsyncSession.stream_scalars runs on the replica (psycopg async, aiomysql)."""
    seed(topology)
    router = sr.ReplicaRouter[AsyncEngine](
        topology.async_primary_url, topology.async_replica_urls[:1]
    )

    async def scenario() -> list[int]:
        try:
            async with router.async_sessionmaker()() as session:
                stream = await session.stream_scalars(
                    sa.select(Reading.id).order_by(Reading.id).execution_options(yield_per=50)
                )
                return [reading_id async for reading_id in stream]
        finally:
            await router.adispose()

    with StatementLog(router) as log:
        assert asyncio.run(scenario()) == list(range(1, ROWS + 1))
    assert reading_nodes(log) == ["replica1"]


@pytest.mark.postgresql
def test_a_streamed_read_leaves_no_transaction_behind(
    fresh_postgres_topology: PostgresTopology,
) -> None:
    """Once the session ends, the replica holds no transaction of the stream's,
    and the connection's next read is AUTOCOMMIT again."""
    topology = fresh_postgres_topology
    seed(topology)
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls[:1])
    replica = router.replicas[0]
    try:
        with router.sessionmaker()() as session:
            rows = session.scalars(sa.select(Reading).execution_options(yield_per=10))
            next(iter(rows))  # the cursor is open: a transaction holds it
            rows.close()
            assert (
                topology.admin_query(
                    0,
                    "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
                )
                == 1
            )
        assert (
            topology.admin_query(
                0, "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'"
            )
            == 0
        )
        with replica.connect() as conn:  # the same pooled connection
            assert conn.connection.dbapi_connection is not None
            assert conn.connection.dbapi_connection.autocommit is True
            assert conn.scalar(sa.text("SELECT count(*) FROM reading")) == ROWS
    finally:
        router.dispose()


@pytest.mark.postgresql
def test_reads_after_a_stream_see_later_commits_under_repeatable_read_defaults(
    fresh_postgres_topology: PostgresTopology,
) -> None:
    """A replica whose sessions default to REPEATABLE READ: a read after a
    stream, in the stream's transaction, still sees a commit made since (the
    stream's transaction is READ COMMITTED), so read-your-writes holds."""
    topology = fresh_postgres_topology
    seed(topology)
    repeatable = topology.replica_urls[0].update_query_dict(
        {"options": "-c default_transaction_isolation=repeatable\\ read"}
    )
    probe = sa.create_engine(repeatable)
    try:
        with probe.connect() as conn:  # the premise: the replica's default is REPEATABLE READ
            assert conn.scalar(sa.text("SHOW default_transaction_isolation")) == "repeatable read"
    finally:
        probe.dispose()
    router = sr.ReplicaRouter(topology.primary_url, [repeatable])
    try:
        with StatementLog(router) as log, router.sessionmaker()() as reader:
            rows = reader.scalars(sa.select(Reading).execution_options(yield_per=10))
            next(iter(rows))
            rows.close()
            with router.sessionmaker()() as writer:
                writer.add(Reading(id=ROWS + 1))
                writer.commit()
            assert reader.get(Reading, ROWS + 1) is not None
        assert reading_nodes(log)[0] == "replica1"
        assert reading_nodes(log)[-1] == "replica1"  # the read after the commit too
    finally:
        router.dispose()
