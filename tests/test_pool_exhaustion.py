"""A replica whose connection pool is exhausted: reads go elsewhere at once.

With small pools and many threads or tasks, a read whose replica has no free
connection must not wait for one (and then fail with the pool's
``TimeoutError``) while another replica or the primary has connections to
spare: it goes to the next replica that qualifies, else the primary, and the
replica's ``pool_full_skips`` counts it. The load tests run against the real
PostgreSQL and MariaDB topologies, with the sync and the async drivers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar, cast

import pytest
import sqlalchemy as sa
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.pool import NullPool, Pool, QueuePool, SingletonThreadPool, StaticPool

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.pools import PoolFull, nowait_checkout, pool_is_full
from sqlalchemy_replicas.testing import StatementLog, Topology, wait_until

#: Small pools: one connection per server, no overflow, and a pool timeout
#: that a read waiting for a replica connection would run into.
POOL_TIMEOUT = 2.0
SMALL_POOLS = {"pool_size": 1, "max_overflow": 0, "pool_timeout": POOL_TIMEOUT}
WORKERS = 16
READS_PER_WORKER = 25
#: Well under the pool timeout: no read may wait for a replica's connection.
MAX_READ_SECONDS = 1.0


class FakeDBAPIConnection:
    """Just enough of a DBAPI connection for a pool to hand out and take back."""

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


_P = TypeVar("_P", bound=Pool)


def fake_pool(pool_class: type[_P], **options: Any) -> _P:
    """A pool of ``pool_class`` handing out fake connections (no server)."""
    return pool_class(lambda: cast("DBAPIConnection", FakeDBAPIConnection()), **options)


# -- the pure predicate and the checkout that never waits ---------------------


def test_a_queue_pool_is_full_once_its_connections_and_overflow_are_out() -> None:
    """pool_is_full: false while a connection is idle or overflow is left, true
    once pool_size + max_overflow connections are checked out, false again
    when one comes back."""
    pool = fake_pool(QueuePool, pool_size=1, max_overflow=1)
    assert not pool_is_full(pool)
    first = pool.connect()
    assert not pool_is_full(pool)  # one overflow connection is left
    second = pool.connect()
    assert pool_is_full(pool)
    second.close()
    assert not pool_is_full(pool)  # idle in the pool
    first.close()
    assert not pool_is_full(pool)


def test_a_queue_pool_with_an_idle_connection_is_not_full() -> None:
    """pool_size=1, max_overflow=0: full while its one connection is out, not
    once it is back (idle)."""
    pool = fake_pool(QueuePool, pool_size=1, max_overflow=0)
    connection = pool.connect()
    assert pool_is_full(pool)
    connection.close()
    assert pool.checkedin() == 1
    assert not pool_is_full(pool)


@pytest.mark.parametrize(
    ("pool_class", "options"),
    [
        pytest.param(QueuePool, {"pool_size": 0}, id="QueuePool-size-0"),
        pytest.param(QueuePool, {"pool_size": 1, "max_overflow": -1}, id="QueuePool-no-limit"),
        pytest.param(NullPool, {}, id="NullPool"),
        pytest.param(StaticPool, {}, id="StaticPool"),
        pytest.param(SingletonThreadPool, {"pool_size": 1}, id="SingletonThreadPool"),
    ],
)
def test_pools_that_never_make_a_checkout_wait_are_never_full(
    pool_class: type[Pool], options: dict[str, Any]
) -> None:
    """Unbounded QueuePools and pools that open or share connections are never
    full, however many connections are out."""
    pool = fake_pool(pool_class, **options)
    held = [pool.connect() for _ in range(3)]
    assert not pool_is_full(pool)
    for connection in held:
        connection.close()


def test_a_nowait_checkout_from_a_full_pool_raises_at_once() -> None:
    """Inside nowait_checkout, a checkout that would wait for the pool timeout
    raises PoolFull (a TimeoutError) at once; a pool with a free connection
    hands it out; another pool, and the same pool outside the block, still
    wait."""
    replica = sa.create_engine(
        "sqlite://", poolclass=QueuePool, pool_size=1, max_overflow=0, pool_timeout=1.0
    )
    other = sa.create_engine(
        "sqlite://", poolclass=QueuePool, pool_size=1, max_overflow=0, pool_timeout=0.2
    )
    try:
        held = replica.connect()
        other_held = other.connect()
        with nowait_checkout(replica):
            started = time.monotonic()
            with pytest.raises(PoolFull):
                replica.connect()
            assert time.monotonic() - started < 1.0 / 2
            # Another pool's checkout in the same block waits its pool timeout.
            with pytest.raises(sa.exc.TimeoutError) as waited:
                other.connect()
            assert not isinstance(waited.value, PoolFull)
        with pytest.raises(sa.exc.TimeoutError) as outside:
            replica.connect()
        assert not isinstance(outside.value, PoolFull)
        held.close()
        other_held.close()
        with nowait_checkout(replica), replica.connect() as connection:
            assert connection.scalar(sa.text("SELECT 1")) == 1
    finally:
        replica.dispose()
        other.dispose()


def test_a_nowait_checkout_survives_engine_dispose() -> None:
    """engine.dispose() replaces the pool; the next nowait_checkout covers the new one."""
    engine = sa.create_engine(
        "sqlite://", poolclass=QueuePool, pool_size=1, max_overflow=0, pool_timeout=5
    )
    try:
        with nowait_checkout(engine), engine.connect():
            pass
        engine.dispose()
        with engine.connect(), nowait_checkout(engine), pytest.raises(PoolFull):
            engine.connect()
    finally:
        engine.dispose()


# -- real servers under load ---------------------------------------------------


def create_schema(topology: Topology) -> None:
    engine = sa.create_engine(topology.primary_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE item (id INTEGER PRIMARY KEY, name VARCHAR(20))"))
        conn.execute(sa.text("INSERT INTO item VALUES (1, 'one'), (2, 'two')"))
    engine.dispose()
    topology.wait_for_catchup()


def await_replicas_known_caught_up(router: sr.ReplicaRouter[Any]) -> None:
    """Until the lag monitor has seen both replicas healthy and caught up with
    the router's start position, reads wait on a replica or go to the primary
    for reasons other than pools."""
    backend = router.positions
    assert backend is not None

    def known() -> bool:
        target, unknown = router.cluster.process_scope.target(router.cluster)
        applied = [router.cluster.known_applied(name) for name in router.replica_names]
        return (
            not unknown
            and all(s.healthy for s in router.status())
            and all(a is not None and backend.reached(a, target) for a in applied)
        )

    wait_until(known, timeout=20, what="the lag monitor to see both replicas caught up")


class Load:
    """Latencies and errors of the reads of many threads or tasks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []

    def record(self, started: float, error: BaseException | None = None) -> None:
        with self.lock:
            self.latencies.append(time.monotonic() - started)
            if error is not None:
                self.errors.append(error)


def item_nodes(log: StatementLog) -> list[str]:
    """Where the statements on the item table ran (not the driver's own queries)."""
    return [s.node for s in log.statements if "item" in s.sql]


def item_reads(log: StatementLog) -> tuple[int, int]:
    """Reads of the item table on the replicas, and on the primary."""
    nodes = item_nodes(log)
    on_primary = nodes.count("primary")
    return len(nodes) - on_primary, on_primary


def pool_full_skips(router: sr.ReplicaRouter[Any]) -> dict[str, int]:
    return {s.name: s.pool_full_skips for s in router.status()}


#: The two loads: every server's one connection contended by the workers
#: alone, or replica1's held all along by a long session (a report), while
#: replica2 and the primary have connections to spare.
LOADS = [
    pytest.param(False, id="contended"),
    pytest.param(True, id="replica1-held"),
]


def check_load(load: Load, log: StatementLog, skips: dict[str, int], *, held: bool) -> None:
    """No read failed or waited for a replica connection; reads that found a
    replica's pool full were counted (``skips``) and went elsewhere; the
    replicas served most reads (with replica1 held: none there, some on
    replica2)."""
    assert load.errors == [], load.errors[:3]
    assert len(load.latencies) == WORKERS * READS_PER_WORKER
    assert max(load.latencies) < MAX_READ_SECONDS
    on_replicas, on_primary = item_reads(log)
    assert on_replicas + on_primary == WORKERS * READS_PER_WORKER
    if held:
        assert skips["replica1"] > 0, skips
        assert log.counts()["replica1"] == 0
        assert on_replicas > 0
    else:
        assert sum(skips.values()) > 0, skips
        assert on_replicas > on_primary


@pytest.fixture
def small_pool_router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    create_schema(topology)
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls, engine_options=SMALL_POOLS
    )
    router.start()
    await_replicas_known_caught_up(router)
    yield router
    router.dispose()


def key_preferring(router: sr.ReplicaRouter[Any], name: str) -> str:
    """A sticky key whose first choice is replica ``name``."""
    for n in range(1000):
        if router.cluster.replica_order(str(n).encode())[0].name == name:
            return str(n)
    raise AssertionError(f"no key prefers {name}")


@pytest.mark.parametrize("held", LOADS)
def test_threads_on_exhausted_replica_pools_read_elsewhere_at_once(
    small_pool_router: sr.ReplicaRouter, held: bool
) -> None:
    """16 threads read through sessions of their own, with one connection per
    server: no read fails or waits out the pool timeout, the full replicas
    count the reads sent elsewhere, and the replicas serve most reads. With
    replica1's connection held by a long session, its reads go elsewhere."""
    router = small_pool_router
    make = router.sessionmaker()
    load = Load()
    start = threading.Barrier(WORKERS)

    def worker() -> None:
        start.wait()
        for _ in range(READS_PER_WORKER):
            started = time.monotonic()
            try:
                with make() as session:
                    assert session.scalar(sa.text("SELECT count(*) FROM item")) == 2
            except Exception as error:
                load.record(started, error)
            else:
                load.record(started)

    with make() as report:
        if held:
            with sr.sticky(key_preferring(router, "replica1")):
                assert report.scalar(sa.text("SELECT count(*) FROM item")) == 2
            assert pool_is_full(router.replica_targets[0].sync_engine.pool)
        with StatementLog(router) as log:
            threads = [threading.Thread(target=worker) for _ in range(WORKERS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    check_load(load, log, pool_full_skips(router), held=held)


@pytest.mark.parametrize("held", LOADS)
def test_asyncio_tasks_on_exhausted_replica_pools_read_elsewhere_at_once(
    topology: Topology, held: bool
) -> None:
    """The same loads from 16 asyncio tasks on the async drivers
    (AsyncAdaptedQueuePool): no read fails or waits out the pool timeout."""
    create_schema(topology)
    router = sr.ReplicaRouter[AsyncEngine](
        topology.async_primary_url, topology.async_replica_urls, engine_options=SMALL_POOLS
    )
    load = Load()

    async def worker(make: async_sessionmaker[AsyncSession]) -> None:
        for _ in range(READS_PER_WORKER):
            started = time.monotonic()
            try:
                async with make() as session:
                    count = await session.scalar(sa.text("SELECT count(*) FROM item"))
                    assert count == 2
            except Exception as error:
                load.record(started, error)
            else:
                load.record(started)

    async def main() -> tuple[StatementLog, dict[str, int]]:
        try:
            await router.astart()
            await asyncio.to_thread(await_replicas_known_caught_up, router)
            make = router.async_sessionmaker()
            async with make() as report:
                if held:
                    with sr.sticky(key_preferring(router, "replica1")):
                        assert await report.scalar(sa.text("SELECT count(*) FROM item")) == 2
                    assert pool_is_full(router.replica_targets[0].sync_engine.pool)
                with StatementLog(router) as log:
                    await asyncio.gather(*(worker(make) for _ in range(WORKERS)))
            return log, pool_full_skips(router)
        finally:
            await router.adispose()

    log, skips = asyncio.run(main())
    check_load(load, log, skips, held=held)


def test_a_session_keeps_the_replica_connection_it_holds(
    small_pool_router: sr.ReplicaRouter,
) -> None:
    """A session that holds a replica's only connection reads there again: its
    own connection is not a full pool, and nothing is counted."""
    router = small_pool_router
    with router.sessionmaker()() as session, StatementLog(router) as log:
        assert session.scalar(sa.text("SELECT count(*) FROM item")) == 2
        first = item_nodes(log)
        assert len(first) == 1
        assert first[0].startswith("replica")
        full = next(r for r in router.replica_targets if r.name == first[0])
        assert pool_is_full(full.sync_engine.pool)
        with sr.sticky(key_preferring(router, full.name)):
            assert session.scalar(sa.text("SELECT name FROM item WHERE id = 1")) == "one"
        assert item_nodes(log) == [full.name, full.name]
    assert all(s.pool_full_skips == 0 for s in router.status())


def test_a_read_whose_replica_pool_is_full_goes_to_the_other_replica(
    small_pool_router: sr.ReplicaRouter,
) -> None:
    """Another session holds replica1's only connection: a read that prefers
    replica1 runs on replica2 at once, and replica1 counts one skip; with
    both replicas' connections held, the read runs on the primary."""
    router = small_pool_router
    replica1, replica2 = router.replica_targets
    with replica1.sync_engine.connect(), StatementLog(router) as log:
        with sr.sticky(key_preferring(router, "replica1")), router.sessionmaker()() as session:
            assert session.scalar(sa.text("SELECT name FROM item WHERE id = 1")) == "one"
        assert item_nodes(log) == ["replica2"]
        assert [s.pool_full_skips for s in router.status()] == [1, 0]
        log.clear()
        with replica2.sync_engine.connect(), router.sessionmaker()() as session:
            started = time.monotonic()
            assert session.scalar(sa.text("SELECT name FROM item WHERE id = 2")) == "two"
            assert time.monotonic() - started < MAX_READ_SECONDS
        assert item_nodes(log) == ["primary"]
        assert sum(s.pool_full_skips for s in router.status()) == 3
