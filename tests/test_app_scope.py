"""Read-your-writes for the whole application, as a real app is shaped.

A migration and a seed script run in another process before the app starts;
the app keeps one long-lived session (as a test fixture does) while each
request opens its own; requests write through sessions and through Core on
``router.primary``; nobody opens a ``causal_context``. With the router's
default causal scope, no read anywhere is older than a commit the app (or
the seed process before it) made, while replicas apply 0.3 s or 1 s late,
or one replica stopped applying before the seed ran.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.consistency import CausalScopeKind
from sqlalchemy_replicas.testing import MariaDBTopology, StatementLog, Topology

SEEDED = 8  # more than ROUNDS: each round deletes one seeded user
ROUNDS = 6

# The "migration" and the seed data, run by another process before the app starts.
SEED_SCRIPT = """
import sys
import sqlalchemy as sa

engine = sa.create_engine(sys.argv[1])
with engine.begin() as conn:
    conn.exec_driver_sql(
        "CREATE TABLE IF NOT EXISTS app_user (id INTEGER PRIMARY KEY, name VARCHAR(50) NOT NULL)"
    )
with engine.begin() as conn:
    for i in range(1, int(sys.argv[2]) + 1):
        conn.exec_driver_sql(f"INSERT INTO app_user (id, name) VALUES ({i}, 'seed{i}')")
engine.dispose()
"""


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "app_user"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(50))


@dataclass
class Ledger:
    """What the app committed so far, and every read that disagreed with it."""

    truth: dict[int, str] = field(default_factory=dict)
    reads: int = 0
    stale: list[str] = field(default_factory=list)

    def check(self, label: str, rows: dict[int, str]) -> None:
        self.reads += 1
        if rows != self.truth:
            self.stale.append(f"{label}: read {rows}, committed {self.truth}")


@dataclass(frozen=True)
class Lag:
    """How the replicas lag behind during a scenario."""

    delay: float = 0.0  # apply delay on every replica (MariaDB rounds it up to whole seconds)
    paused: int | None = None  # a replica whose replay stops before the seed runs


SCENARIOS = [
    pytest.param(Lag(delay=0.3), id="delay-0.3s"),
    pytest.param(Lag(delay=1.0), id="delay-1s"),
    pytest.param(Lag(paused=0), id="replica1-paused-before-seed"),
]


def seed(topology: Topology, lag: Lag) -> None:
    """Inject the lag, then run the migration and the seed in another process."""
    for index in range(len(topology.replica_urls)):
        if lag.delay:
            topology.set_apply_delay(index, lag.delay)
    if lag.paused is not None:
        topology.pause_replay(lag.paused)
    url = topology.primary_url.render_as_string(hide_password=False)
    subprocess.run([sys.executable, "-c", SEED_SCRIPT, url, str(SEEDED)], check=True)


def seeded_ledger() -> Ledger:
    return Ledger(truth={i: f"seed{i}" for i in range(1, SEEDED + 1)})


def users(session: Session) -> dict[int, str]:
    return {row.id: row.name for row in session.execute(sa.select(User.id, User.name))}


def run_sync_app(router: sr.ReplicaRouter, ledger: Ledger, *, ends_transactions: bool) -> None:
    """The app: a long-lived session, and a new session per request.

    :param ends_transactions: the long-lived session ends its transaction after
        each check, as it must under MariaDB's REPEATABLE READ with a plain
        Session too (a read on the primary would otherwise pin an old snapshot).
    """
    make_session = router.sessionmaker()
    primary = router.primary
    with make_session() as fixture_session:

        def check(label: str) -> None:
            ledger.check(f"long-lived session, {label}", users(fixture_session))
            if ends_transactions:
                fixture_session.commit()
            with make_session() as request:
                ledger.check(f"next request, {label}", users(request))

        check("first read after the seed")
        for n in range(ROUNDS):
            new_id = 100 + n
            with make_session() as request:  # POST /users
                request.add(User(id=new_id, name=f"user{n}"))
                request.commit()
            ledger.truth[new_id] = f"user{n}"
            check(f"after creating {new_id}")

            with primary.begin() as conn:  # a Core write on router.primary
                conn.execute(sa.update(User).where(User.id == new_id).values(name=f"core{n}"))
            ledger.truth[new_id] = f"core{n}"
            check(f"after renaming {new_id} through Core")

            with make_session() as request:  # DELETE /users/<id>
                if request.get(User, n + 1) is None:
                    ledger.stale.append(f"DELETE request did not find user {n + 1}")
                request.execute(sa.delete(User).where(User.id == n + 1))
                request.commit()
            del ledger.truth[n + 1]
            check(f"after deleting {n + 1}")


async def run_async_app(
    router: sr.ReplicaRouter[AsyncEngine], ledger: Ledger, *, ends_transactions: bool
) -> None:
    """The same app on asyncio: AsyncSessions and an AsyncEngine Core write."""
    make_session = router.async_sessionmaker()
    primary = router.primary

    async def read(session: AsyncSession) -> dict[int, str]:
        result = await session.execute(sa.select(User.id, User.name))
        return {row.id: row.name for row in result}

    async with make_session() as fixture_session:

        async def check(label: str) -> None:
            ledger.check(f"long-lived session, {label}", await read(fixture_session))
            if ends_transactions:
                await fixture_session.commit()
            async with make_session() as request:
                ledger.check(f"next request, {label}", await read(request))

        await check("first read after the seed")
        for n in range(ROUNDS):
            new_id = 100 + n
            async with make_session() as request:
                request.add(User(id=new_id, name=f"user{n}"))
                await request.commit()
            ledger.truth[new_id] = f"user{n}"
            await check(f"after creating {new_id}")

            async with primary.begin() as conn:
                await conn.execute(sa.update(User).where(User.id == new_id).values(name=f"core{n}"))
            ledger.truth[new_id] = f"core{n}"
            await check(f"after renaming {new_id} through Core")

            async with make_session() as request:
                if await request.get(User, n + 1) is None:
                    ledger.stale.append(f"DELETE request did not find user {n + 1}")
                await request.execute(sa.delete(User).where(User.id == n + 1))
                await request.commit()
            del ledger.truth[n + 1]
            await check(f"after deleting {n + 1}")


@pytest.fixture
def routers(topology: Topology) -> Iterator[Callable[..., sr.ReplicaRouter]]:
    """Makes sync routers over the topology; disposes them after the test."""
    made: list[sr.ReplicaRouter] = []

    def make(*, causal_scope: CausalScopeKind = "router") -> sr.ReplicaRouter:
        router = sr.ReplicaRouter(
            topology.primary_url, topology.replica_urls, causal_scope=causal_scope
        )
        made.append(router)
        return router

    yield make
    for router in made:
        router.dispose()


def app_reads(log: StatementLog) -> dict[str, int]:
    """Reads of the app's table, per server."""
    counts: dict[str, int] = {}
    for statement in log.statements:
        sql = statement.sql.lstrip().upper()
        if sql.startswith("SELECT") and "APP_USER" in sql:
            counts[statement.node] = counts.get(statement.node, 0) + 1
    return counts


def assert_replicas_used_as_lag_allows(topology: Topology, lag: Lag, reads: dict[str, int]) -> None:
    """With 0.3 s of apply delay (within the 0.5 s budget), reads wait for a
    replica and run there; a replica that stopped applying before the seed never
    serves the app's table. (MariaDB delays in whole seconds, 0.3 s making 1 s
    or more: over the budget, replicas may serve none of the reads.)"""
    if lag.paused is not None:
        assert f"replica{lag.paused + 1}" not in reads, reads
    delay = math.ceil(lag.delay) if isinstance(topology, MariaDBTopology) else lag.delay
    if (delay and delay < 0.5) or lag.paused is not None:
        assert sum(n for node, n in reads.items() if node != "primary") > 0, reads


@pytest.mark.parametrize("lag", SCENARIOS)
def test_sync_app_reads_no_stale_row_without_causal_context(
    topology: Topology, routers: Callable[..., sr.ReplicaRouter], lag: Lag
) -> None:
    """Sync app, default causal scope: the long-lived session and every request's session
    read exactly what was committed before (the seed process's migration and rows, other
    sessions' inserts and deletes, Core updates): 0 stale reads, replicas used where the
    lag allows."""
    seed(topology, lag)
    router = routers()  # started after the seed, as an app server would be
    ledger = seeded_ledger()
    with StatementLog(router) as log:
        run_sync_app(router, ledger, ends_transactions=isinstance(topology, MariaDBTopology))
    assert ledger.stale == []
    assert ledger.reads == 2 * (1 + 3 * ROUNDS)
    assert_replicas_used_as_lag_allows(topology, lag, app_reads(log))


@pytest.mark.parametrize("lag", SCENARIOS)
def test_async_app_reads_no_stale_row_without_causal_context(topology: Topology, lag: Lag) -> None:
    """The same application on asyncio (AsyncSession, AsyncEngine Core writes): 0 stale
    reads."""
    seed(topology, lag)
    router = sr.ReplicaRouter[AsyncEngine](topology.async_primary_url, topology.async_replica_urls)
    ledger = seeded_ledger()

    async def main() -> None:
        try:
            await run_async_app(
                router, ledger, ends_transactions=isinstance(topology, MariaDBTopology)
            )
        finally:
            await router.adispose()

    with StatementLog(router) as log:
        asyncio.run(main())
    assert ledger.stale == []
    assert ledger.reads == 2 * (1 + 3 * ROUNDS)
    assert_replicas_used_as_lag_allows(topology, lag, app_reads(log))


def test_session_scope_reads_other_sessions_commits_stale(
    topology: Topology, routers: Callable[..., sr.ReplicaRouter]
) -> None:
    """The narrower scope is what it says: with ``causal_scope="session"`` and replicas a
    second behind, the same app reads stale rows (what other sessions and the seed process
    committed), which is why the router scope is the default."""
    # The table is on every replica before they fall behind: with it missing, the
    # reads would run again on the primary (a replica behind on schema) and not be stale.
    Base.metadata.create_all(routers().primary)
    topology.wait_for_catchup()
    seed(topology, Lag(delay=1.0))
    router = routers(causal_scope="session")
    ledger = seeded_ledger()
    run_sync_app(router, ledger, ends_transactions=isinstance(topology, MariaDBTopology))
    assert ledger.stale != []


def test_router_scope_is_the_default_and_sessions_may_narrow_it(
    topology: Topology, routers: Callable[..., sr.ReplicaRouter]
) -> None:
    """``causal_scope`` defaults to ``"router"``; a session given ``causal_scope="session"``
    does not wait for another session's commit (its replica read is stale), while a
    default session of the same router does."""
    router = routers()
    assert router.causal_scope == "router"
    Base.metadata.create_all(router.primary)
    topology.wait_for_catchup()
    make_session = router.sessionmaker()
    with make_session() as warm:  # the router's start position is read now
        assert users(warm) == {}
    for index in range(len(topology.replica_urls)):
        topology.pause_replay(index)
    with make_session() as writer:
        writer.add(User(id=1, name="ada"))
        writer.commit()
    with make_session(causal_scope="session") as narrow:
        assert narrow.causal_scope == "session"
        assert users(narrow) == {}  # a paused replica served it
    with make_session() as default:
        assert users(default) == {1: "ada"}  # the primary served it


def test_a_causal_scope_that_is_not_one_is_refused(topology: Topology) -> None:
    """An unknown ``causal_scope`` fails where it is given (the router, a sessionmaker, a
    session), naming the argument."""
    with pytest.raises(sr.exc.ConfigurationError, match="causal_scope='process'"):
        sr.ReplicaRouter(topology.primary_url, causal_scope="process")  # type: ignore[call-overload]
    router = sr.ReplicaRouter(topology.primary_url)
    try:
        with pytest.raises(sr.exc.ConfigurationError, match="causal_scope='app'"):
            router.sessionmaker(causal_scope="app")
        with pytest.raises(sr.exc.ConfigurationError, match="causal_scope='all'"):
            sr.RoutingSession(router=router, causal_scope="all")  # type: ignore[arg-type]
    finally:
        router.dispose()


def test_start_reads_the_start_position_before_the_first_read(
    topology: Topology, routers: Callable[..., sr.ReplicaRouter]
) -> None:
    """Without ``start()`` the router's first read asks the primary for its position
    (and history); after ``start()`` the first read sends nothing to the primary."""
    lazy, started = routers(), routers()
    started.start()
    position_queries = []
    for router in (lazy, started):
        with StatementLog(router) as log, router.sessionmaker()() as session:
            assert session.scalar(sa.text("SELECT 1 AS probe")) == 1
        # The probe itself may fall back to the primary on a loaded machine (a wait
        # that timed out): count only what else the primary was asked.
        position_queries.append(
            [s.sql for s in log.statements if s.node == "primary" and "probe" not in s.sql]
        )
    assert position_queries[0] != []
    assert position_queries[1] == []


def test_astart_is_start_for_async_routers(topology: Topology) -> None:
    """``await router.astart()`` reads the start position of an async router (its first
    read then sends nothing to the primary); ``start()`` on it names ``astart()``."""
    router = sr.ReplicaRouter[AsyncEngine](topology.async_primary_url, topology.async_replica_urls)
    with pytest.raises(sr.exc.ConfigurationError, match="astart"):
        router.start()

    async def main() -> int:
        try:
            await router.astart()
            with StatementLog(router) as log:
                async with router.async_sessionmaker()() as session:
                    assert await session.scalar(sa.text("SELECT 1")) == 1
            return log.counts()["primary"]
        finally:
            await router.adispose()

    assert asyncio.run(main()) == 0
