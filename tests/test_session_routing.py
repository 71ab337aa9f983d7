"""RoutingSession's routing rules, against real replicated servers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.exc import ConfigurationError
from sqlalchemy_replicas.testing import MariaDBTopology, PostgresTopology, StatementLog, Topology


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "author"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(50))


def is_postgres(topology: Topology) -> bool:
    return topology.backend == "postgresql"


def create_functions(engine: sa.Engine, postgres: bool) -> None:
    """answer_lo(): a read-only function; touch_author(): one that writes."""
    with engine.begin() as conn:
        if postgres:
            conn.exec_driver_sql(
                "CREATE FUNCTION lo_answer() RETURNS int LANGUAGE sql AS 'SELECT 42'"
            )
            conn.exec_driver_sql(
                "CREATE FUNCTION touch_author() RETURNS int LANGUAGE sql AS "
                "'INSERT INTO author (id, name) VALUES (99, ''touched'') RETURNING 1'"
            )
        else:
            conn.exec_driver_sql("CREATE FUNCTION lo_answer() RETURNS INT DETERMINISTIC RETURN 42")
            conn.exec_driver_sql(
                "CREATE FUNCTION touch_author() RETURNS INT MODIFIES SQL DATA BEGIN "
                "INSERT INTO author (id, name) VALUES (99, 'touched'); RETURN 1; END"
            )


@pytest.fixture
def router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    """A router over the topology with the author table and two functions replicated."""
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    primary = router.primary
    Base.metadata.create_all(primary)
    create_functions(primary, is_postgres(topology))
    with primary.begin() as conn:
        conn.execute(sa.insert(Author), [{"id": 1, "name": "ada"}, {"id": 2, "name": "grace"}])
    topology.wait_for_catchup()
    # The monitor's first checks done: what a read does is routing's choice, not
    # the outcome of a first check racing a loaded machine.
    router.start()
    yield router
    router.dispose()


def nodes(log: StatementLog) -> list[str]:
    """Where the statements that touched the app's tables or functions ran."""
    return [
        s.node
        for s in log.statements
        if any(
            word in s.sql.lower()
            for word in ("author", "lo_answer", "touch_author", "1 + 1", "advisory", "get_lock")
        )
    ]


def session_of(router: sr.ReplicaRouter) -> Session:
    return router.sessionmaker()()


def test_autoflush_pins_the_query_to_the_primary(router: sr.ReplicaRouter) -> None:
    """A query that autoflushes pending changes runs on the primary and sees them."""
    with StatementLog(router) as log, session_of(router) as session:
        session.add(Author(id=3, name="pending"))
        names = session.scalars(sa.select(Author.name).order_by(Author.id)).all()
    assert names == ["ada", "grace", "pending"]
    assert nodes(log) == ["primary", "primary"]


def test_orm_bulk_insert_and_update_run_on_the_primary(router: sr.ReplicaRouter) -> None:
    """ORM bulk INSERT and bulk UPDATE by primary key go to the primary."""
    with StatementLog(router) as log, session_of(router) as session:
        session.execute(sa.insert(Author), [{"id": 10, "name": "a"}, {"id": 11, "name": "b"}])
        session.execute(sa.update(Author), [{"id": 10, "name": "c"}, {"id": 11, "name": "d"}])
        session.commit()
    assert set(nodes(log)) == {"primary"}


@pytest.mark.parametrize("strategy", ["fetch", "evaluate", False])
def test_orm_update_and_delete_with_every_synchronize_strategy(
    router: sr.ReplicaRouter, strategy: str | bool
) -> None:
    """UPDATE/DELETE with synchronize_session (including "fetch", whose pre-select
    MariaDB needs for lack of UPDATE ... RETURNING) runs wholly on the primary."""
    with StatementLog(router) as log, session_of(router) as session:
        ada = session.get(Author, 1)
        assert ada is not None
        log.clear()
        session.execute(
            sa.update(Author).where(Author.id == 1).values(name="ada2"),
            execution_options={"synchronize_session": strategy},
        )
        session.execute(
            sa.delete(Author).where(Author.id == 2),
            execution_options={"synchronize_session": strategy},
        )
        if strategy:
            assert ada.name == "ada2"
        session.commit()
    assert nodes(log)
    assert set(nodes(log)) == {"primary"}


def test_returning_executemany_and_connection_run_on_the_primary(
    router: sr.ReplicaRouter,
) -> None:
    """INSERT ... RETURNING, Core executemany and session.connection() use the primary."""
    table = sa.Table("author", Base.metadata)
    with StatementLog(router) as log, session_of(router) as session:
        new_id = session.scalar(sa.insert(table).values(id=20, name="r").returning(table.c.id))
        session.execute(sa.insert(table), [{"id": 21, "name": "x"}, {"id": 22, "name": "y"}])
        session.connection().exec_driver_sql("SELECT 1 + 1")
        session.commit()
    assert new_id == 20
    assert set(nodes(log)) == {"primary"}


def test_locking_reads_and_writing_functions_run_on_the_primary(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """FOR UPDATE / FOR SHARE and lock functions run on the primary; a plain text
    read goes to a replica."""
    lock_function = (
        sa.func.pg_advisory_xact_lock(1) if is_postgres(topology) else sa.func.GET_LOCK("k", 1)
    )
    with StatementLog(router) as log:
        with session_of(router) as session:
            session.scalars(sa.select(Author).with_for_update(read=True)).all()
        with session_of(router) as session:
            session.execute(sa.select(lock_function))
        with session_of(router) as session:
            session.execute(sa.text("SELECT name FROM author WHERE id = :id"), {"id": 1})
    assert nodes(log)[:2] == ["primary", "primary"]
    assert nodes(log)[2].startswith("replica")


def test_dml_inside_a_cte_runs_on_the_primary(
    fresh_postgres_topology: PostgresTopology,
) -> None:
    """A SELECT whose CTE inserts is a write (PostgreSQL's data-modifying CTEs;
    MariaDB has none)."""
    topology = fresh_postgres_topology
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    try:
        Base.metadata.create_all(router.primary)
        table = sa.Table("author", Base.metadata)
        added = sa.insert(table).values(id=30, name="cte").returning(table.c.id).cte("added")
        with StatementLog(router) as log, session_of(router) as session:
            assert session.scalar(sa.select(added.c.id)) == 30
            session.commit()
        assert nodes(log) == ["primary"]
    finally:
        router.dispose()


def test_strong_consistency_option_sends_a_read_to_the_primary(
    router: sr.ReplicaRouter,
) -> None:
    """consistency="strong" on the statement or on the call sends a read to the primary."""
    read = sa.select(Author.name).where(Author.id == 1)
    with StatementLog(router) as log, session_of(router) as session:
        session.execute(read.execution_options(consistency="strong"))
        session.execute(read, execution_options={"consistency": "strong"})
        session.scalar(read)
    assert nodes(log)[:2] == ["primary", "primary"]
    assert nodes(log)[2].startswith("replica")


def test_read_only_option_and_function_lists_override_the_classifier(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """read_only=True sends an unprovable read to a replica, read_only=False a read to
    the primary; read_only_functions= relaxes a built-in rule for the whole router."""
    answer = sa.text("SELECT lo_answer()")  # lo_* functions write by default
    with StatementLog(router) as log, session_of(router) as session:
        assert session.scalar(answer) == 42
        session.commit()
        assert session.scalar(answer.execution_options(read_only=True)) == 42
        session.scalar(sa.select(Author.name).execution_options(read_only=False))
    assert nodes(log)[0] == "primary"
    assert nodes(log)[1].startswith("replica")
    assert nodes(log)[2] == "primary"

    relaxed = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls, read_only_functions=["lo_answer"]
    )
    try:
        with StatementLog(relaxed) as log, session_of(relaxed) as session:
            assert session.scalar(answer) == 42
        assert nodes(log)[0].startswith("replica")
    finally:
        relaxed.dispose()


def test_bad_routing_options_are_rejected_at_execute(router: sr.ReplicaRouter) -> None:
    """An unknown consistency level or a non-bool read_only names the fix."""
    with session_of(router) as session:
        with pytest.raises(ConfigurationError, match="'bogus' is not a consistency level"):
            session.execute(sa.select(Author).execution_options(consistency="bogus"))
        with pytest.raises(ConfigurationError, match="read_only='yes' must be True"):
            session.execute(sa.select(Author), execution_options={"read_only": "yes"})


def count_touched(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(*) FROM author WHERE id = 99")).scalar_one())


def test_misclassified_write_is_refused_by_the_replica_and_rerun_on_the_primary(
    router: sr.ReplicaRouter, topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """A function that writes, called in a SELECT the lexer proves read-only, goes to a
    replica, which refuses it; the session reruns it on the primary once, warns naming
    the statement, and the rest of the transaction stays on the primary."""
    with StatementLog(router) as log, session_of(router) as session:
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_replicas.routing"):
            assert session.scalar(sa.text("SELECT touch_author()")) == 1
        session.scalar(sa.select(Author.name).where(Author.id == 99))
        session.commit()
    assert nodes(log)[0].startswith("replica")
    assert nodes(log)[1:] == ["primary", "primary"]
    assert "SELECT touch_author()" in caplog.text
    assert "refused a statement as a write" in caplog.text
    assert count_touched(router.primary) == 1


def test_replica_connections_refuse_writes_even_on_a_writable_server(
    topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """Replica connections are read-only at the session level: on MariaDB with the
    replica's own read_only switched off (a common setup), the misclassified write
    still fails there without writing, and runs exactly once, on the primary.
    (A PostgreSQL standby refuses writes by itself: the same path.)"""
    mariadb = topology if isinstance(topology, MariaDBTopology) else None
    # Session scope: the read needs no position, so the replica serves it at once.
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls[:1], causal_scope="session"
    )
    try:
        primary = router.primary
        Base.metadata.create_all(primary)
        create_functions(primary, is_postgres(topology))
        topology.wait_for_catchup()
        if mariadb is not None:
            # As root: the app user may not change server settings.
            mariadb.admin_execute(0, "SET GLOBAL read_only = 0")
        router.start()
        replica = router.replicas[0]
        with pytest.raises(sa.exc.DBAPIError) as refused, replica.connect() as conn:
            conn.execute(sa.text("INSERT INTO author (id, name) VALUES (98, 'no')"))
        assert sr.connections.is_read_only_violation(refused.value)
        with caplog.at_level(logging.WARNING), session_of(router) as session:
            assert session.scalar(sa.text("SELECT touch_author()")) == 1
            session.commit()
        assert "refused a statement as a write" in caplog.text
        assert count_touched(primary) == 1
        with primary.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM author WHERE id = 98")).scalar() == 0
        topology.wait_for_catchup()  # replication was not broken by a local write
    finally:
        router.dispose()
        if mariadb is not None:
            mariadb.admin_execute(0, "SET GLOBAL read_only = 1")


def test_declared_writing_function_goes_straight_to_the_primary(
    topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """writing_functions= sends calls to the app's own writing function to the primary
    without a refused attempt on a replica."""
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls, writing_functions=["touch_author"]
    )
    try:
        primary = router.primary
        Base.metadata.create_all(primary)
        create_functions(primary, is_postgres(topology))
        topology.wait_for_catchup()
        with StatementLog(router) as log, session_of(router) as session:
            with caplog.at_level(logging.WARNING):
                assert session.scalar(sa.text("SELECT touch_author()")) == 1
            session.commit()
        assert nodes(log) == ["primary"]
        assert "refused" not in caplog.text
    finally:
        router.dispose()


def test_savepoint_work_runs_on_the_primary(router: sr.ReplicaRouter) -> None:
    """Inside begin_nested(), reads run on the primary and see the savepoint's writes;
    a rolled-back savepoint discards them."""
    with StatementLog(router) as log, session_of(router) as session:
        with session.begin_nested() as savepoint:
            session.add(Author(id=40, name="nested"))
            session.flush()
            assert session.get(Author, 40) is not None
            assert session.scalar(sa.select(sa.func.count()).select_from(Author)) == 3
            savepoint.rollback()
        assert session.scalar(sa.select(sa.func.count()).select_from(Author)) == 2
        session.commit()
    assert set(nodes(log)) == {"primary"}


def test_rollback_ends_the_pin(router: sr.ReplicaRouter) -> None:
    """After a rollback, reads go back to the replicas."""
    with StatementLog(router) as log, session_of(router) as session:
        session.add(Author(id=50, name="gone"))
        session.flush()
        session.rollback()
        log.clear()
        assert session.get(Author, 50) is None
    assert nodes(log)[0].startswith("replica")


def test_async_session_reruns_a_refused_write_on_the_primary(
    topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """With async drivers too, a write refused by a read-only replica runs on the primary."""
    sync_router = sr.ReplicaRouter(topology.primary_url)
    primary = sync_router.primary
    Base.metadata.create_all(primary)
    create_functions(primary, is_postgres(topology))
    topology.wait_for_catchup()

    async def scenario(router: sr.ReplicaRouter[AsyncEngine]) -> int | None:
        try:
            async with router.async_sessionmaker()() as session:
                touched: int | None = await session.scalar(sa.text("SELECT touch_author()"))
                await session.commit()
                return touched
        finally:
            await router.adispose()

    # Session scope: the read needs no position, so it reaches a replica without a wait
    # (which a loaded machine can time out, sending the read to the primary).
    router = sr.ReplicaRouter[AsyncEngine](
        topology.async_primary_url, topology.async_replica_urls, causal_scope="session"
    )
    try:
        with StatementLog(router) as log, caplog.at_level(logging.WARNING):
            assert asyncio.run(scenario(router)) == 1
        assert nodes(log)[0].startswith("replica")
        assert nodes(log)[1] == "primary"
        assert "refused a statement as a write" in caplog.text
        assert count_touched(primary) == 1
    finally:
        sync_router.dispose()
