"""The router's walking skeleton, against real replicated servers: writes and
locking reads on the primary, plain reads round robin on the replicas."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import StatementLog, Topology, wait_until


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "author"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    posts: Mapped[list[Post]] = relationship(back_populates="author", order_by="Post.id")


class Post(Base):
    __tablename__ = "post"
    id: Mapped[int] = mapped_column(primary_key=True)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey("author.id"))
    title: Mapped[str] = mapped_column(sa.String(50))
    author: Mapped[Author] = relationship(back_populates="posts")


@pytest.fixture
def router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    """A router over the topology, with the blog schema created and replicated."""
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    primary = router.primary
    Base.metadata.create_all(primary)
    topology.wait_for_catchup()
    router.start()  # its start position is read now: the logs below hold only reads
    yield router
    router.dispose()


def app_statements(log: StatementLog) -> list[str]:
    """Nodes of the statements that touched the blog tables (not driver chatter)."""
    return [s.node for s in log.statements if "author" in s.sql or "post" in s.sql]


def seed(router: sr.ReplicaRouter, topology: Topology) -> None:
    with router.sessionmaker()() as session:
        session.add(Author(id=1, name="ada", posts=[Post(id=1, title="a"), Post(id=2, title="b")]))
        session.commit()
    topology.wait_for_catchup()


def await_both_known_caught_up(router: sr.ReplicaRouter) -> None:
    """Until the lag monitor has seen every replica apply the router's commits, a
    read prefers a replica known to have applied them over the round-robin turn."""
    backend = router.positions
    assert backend is not None

    def known() -> bool:
        target, unknown = router.cluster.process_scope.target(router.cluster)
        applied = [router.cluster.known_applied(name) for name in router.replica_names]
        return not unknown and all(a is not None and backend.reached(a, target) for a in applied)

    wait_until(known, timeout=10, what="the lag monitor to see both replicas caught up")


def test_flush_and_dml_go_to_the_primary(router: sr.ReplicaRouter) -> None:
    """Flushed inserts and Core UPDATE/DELETE run on the primary only."""
    with StatementLog(router) as log, router.sessionmaker()() as session:
        session.add(Author(id=1, name="ada"))
        session.flush()
        session.execute(sa.update(Author).values(name="grace"))
        session.execute(sa.delete(Post))
        session.commit()
    assert app_statements(log) == ["primary"] * 3


def test_plain_reads_go_round_robin_to_replicas(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """Plain ORM and Core SELECTs alternate between the replicas, none on the primary."""
    seed(router, topology)
    await_both_known_caught_up(router)
    with StatementLog(router) as log, router.sessionmaker()() as session:
        assert session.get(Author, 1) is not None
        assert session.scalars(sa.select(Post).order_by(Post.id)).all()[0].title == "a"
        assert session.execute(sa.select(sa.func.count()).select_from(Post)).scalar() == 2
        assert session.scalar(sa.select(Author.name)) == "ada"
    assert app_statements(log) == ["replica1", "replica2", "replica1", "replica2"]


def test_lazy_load_is_a_replica_read(router: sr.ReplicaRouter, topology: Topology) -> None:
    """A relationship lazy load is a read and goes to a replica."""
    seed(router, topology)
    with StatementLog(router) as log, router.sessionmaker()() as session:
        author = session.scalars(sa.select(Author)).one()
        assert [p.title for p in author.posts] == ["a", "b"]
    assert len(app_statements(log)) == 2
    assert "primary" not in app_statements(log)


def test_locking_read_goes_to_the_primary(router: sr.ReplicaRouter, topology: Topology) -> None:
    """SELECT ... FOR UPDATE runs on the primary."""
    seed(router, topology)
    with StatementLog(router) as log, router.sessionmaker()() as session:
        assert session.scalars(sa.select(Author).with_for_update()).one().name == "ada"
    assert app_statements(log) == ["primary"]


def test_transaction_that_wrote_reads_its_own_writes_on_the_primary(
    router: sr.ReplicaRouter,
) -> None:
    """After a write, the rest of the transaction runs on the primary and sees
    its uncommitted rows; after commit, reads go back to replicas."""
    with StatementLog(router) as log, router.sessionmaker()() as session:
        session.add(Author(id=7, name="uncommitted"))
        session.flush()
        assert session.scalar(sa.select(Author.name).where(Author.id == 7)) == "uncommitted"
        session.commit()
        log.clear()
        session.scalar(sa.select(sa.func.count()).select_from(Author))
    assert app_statements(log) == ["replica1"]


def test_without_replicas_everything_goes_to_the_primary(topology: Topology) -> None:
    """A router with no replicas sends reads to the primary."""
    router = sr.ReplicaRouter(topology.primary_url)
    try:
        Base.metadata.create_all(router.primary)
        with StatementLog(router) as log, router.sessionmaker()() as session:
            session.add(Author(id=1, name="ada"))
            session.commit()
            assert session.get(Author, 1) is not None
        assert app_statements(log) == ["primary", "primary"]
    finally:
        router.dispose()


def test_explicit_session_bind_is_used_unchanged(router: sr.ReplicaRouter) -> None:
    """A session bound to a connection (as Alembic does) runs everything there."""
    primary = router.primary
    with StatementLog(router) as log, primary.connect() as conn:
        session = sr.RoutingSession(router=router, bind=conn)
        session.add(Author(id=3, name="bound"))
        session.flush()
        assert session.scalar(sa.select(sa.func.count()).select_from(Author)) == 1
        session.close()
    assert app_statements(log) == ["primary", "primary"]


def test_replica_reads_do_not_pin_an_old_snapshot(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """Two reads in one session transaction see a commit made between them:
    replica reads hold no transaction open (MariaDB's REPEATABLE READ trap)."""
    only_replica1 = sr.ReplicaRouter(topology.primary_url, topology.replica_urls[:1])
    try:
        with only_replica1.sessionmaker()() as reader:
            assert reader.scalar(sa.select(sa.func.count()).select_from(Author)) == 0
            with router.sessionmaker()() as writer:
                writer.add(Author(id=4, name="later"))
                writer.commit()
            topology.wait_for_catchup()
            assert reader.scalar(sa.select(sa.func.count()).select_from(Author)) == 1
    finally:
        only_replica1.dispose()


def test_async_sessions_route_the_same_way(topology: Topology) -> None:
    """async_sessionmaker(): flushes on the primary, reads on the replicas."""

    async def scenario(router: sr.ReplicaRouter[AsyncEngine]) -> list[str]:
        async with router.primary.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        await router.astart()  # its start position is read now, not in the log
        make = router.async_sessionmaker()
        with StatementLog(router) as log:
            async with make() as session:
                session.add(Author(id=1, name="ada"))
                await session.commit()
            await asyncio.to_thread(topology.wait_for_catchup)
            async with make() as session:
                assert (await session.get(Author, 1)) is not None
                names = (await session.scalars(sa.select(Author.name))).all()
                assert names == ["ada"]
        await router.adispose()
        return app_statements(log)

    router = sr.ReplicaRouter[AsyncEngine](topology.async_primary_url, topology.async_replica_urls)
    # Flush on the primary; both reads on replicas (which ones depends on which the
    # router already knows to have applied the commit).
    nodes = asyncio.run(scenario(router))
    assert nodes[0] == "primary"
    assert len(nodes) == 3
    assert all(node.startswith("replica") for node in nodes[1:])
