"""Replica failures: marked down at the first lost connection, reads rerun
elsewhere, readmitted after a probe; statement errors change nothing.

The faults are real: replica servers of the PostgreSQL and the MariaDB
topology are killed, frozen (SIGSTOP), or made to cancel a read for replay.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, TypeAlias

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import StatementLog, Topology
from sqlalchemy_replicas.testing._process import wait_until

AnyRouter: TypeAlias = "sr.ReplicaRouter[sa.Engine | AsyncEngine]"
"""Helpers that take sync and async routers alike."""

#: Long enough that only sessions, not the lag monitor, can notice a failure.
NO_MONITOR_CHECKS = 600.0
QUICK_CHECKS = 0.2


def make_router(topology: Topology, interval: float) -> sr.ReplicaRouter:
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls, lag_check_interval=interval
    )
    router.start()  # its start position is read now: reads below count no such query
    return router


def make_async_router(topology: Topology, interval: float) -> sr.ReplicaRouter[AsyncEngine]:
    return sr.ReplicaRouter[AsyncEngine](
        topology.async_primary_url,
        topology.async_replica_urls,
        lag_check_interval=interval,
    )


def create_schema(topology: Topology) -> None:
    engine = sa.create_engine(topology.primary_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE item (id INTEGER PRIMARY KEY, name VARCHAR(20))"))
        conn.execute(sa.text("INSERT INTO item VALUES (1, 'one'), (2, 'two')"))
    engine.dispose()
    topology.wait_for_catchup()


@pytest.fixture
def sync_router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    create_schema(topology)
    router = make_router(topology, NO_MONITOR_CHECKS)
    await_all_healthy(router)
    yield router
    router.dispose()


def status_of(router: AnyRouter, name: str) -> sr.ReplicaStatus:
    return next(s for s in router.status() if s.name == name)


def await_all_healthy(router: AnyRouter, timeout: float = 40.0) -> None:
    """Wait for every replica to get reads (a probe is due at most 30 s apart)."""
    wait_until(
        lambda: all(s.healthy for s in router.status()),
        timeout=timeout,
        what="every replica to be healthy",
    )


def key_preferring(router: sr.ReplicaRouter, name: str) -> str:
    """A sticky key whose first choice is replica ``name``."""
    for n in range(1000):
        if router.cluster.replica_order(str(n).encode())[0].name == name:
            return str(n)
    raise AssertionError(f"no key prefers {name}")


def sticky_count(router: sr.ReplicaRouter, key: str) -> tuple[int, list[str]]:
    """Count the items in a new session with sticky ``key``: the count, and the
    servers its statements ran on."""
    with sr.sticky(key), router.sessionmaker()() as session, StatementLog(router) as log:
        count = session.scalar(sa.text("SELECT count(*) FROM item"))
    return count, [s.node for s in log.statements]


class Traffic:
    """Statements sent to, and connections attempted on, each server."""

    def __init__(self, router: AnyRouter) -> None:
        self._log = StatementLog(router)
        self._lock = threading.Lock()
        self.connects: Counter[str] = Counter()
        self._listeners = []
        for target in (router.primary_target, *router.replica_targets):

            def count(*args: Any, _name: str = target.name) -> None:
                with self._lock:
                    self.connects[_name] += 1

            event.listen(target.sync_engine, "do_connect", count)
            self._listeners.append((target.sync_engine, count))
        self._log.__enter__()

    def to(self, name: str) -> int:
        with self._lock:
            return self._log.counts()[name] + self.connects[name]

    def clear(self) -> None:
        with self._lock:
            self._log.clear()
            self.connects.clear()

    def close(self) -> None:
        self._log.__exit__(None, None, None)
        for engine, listener in self._listeners:
            event.remove(engine, "do_connect", listener)


def test_a_replica_lost_mid_session_is_marked_down_and_the_read_runs_elsewhere(
    topology: Topology, sync_router: sr.ReplicaRouter
) -> None:
    """The session's replica dies between two reads: the second read returns the
    right rows from the other replica, the dead one is marked down at once
    (the lag monitor is not due for minutes), and the session goes on to
    write and commit."""
    router = sync_router
    with sr.sticky(key_preferring(router, "replica1")), router.sessionmaker()() as session:
        with StatementLog(router) as log:
            assert session.scalar(sa.text("SELECT name FROM item WHERE id = 1")) == "one"
        assert log.counts() == Counter({"replica1": 1})
        topology.kill_replica(0)

        with StatementLog(router) as log:
            assert session.scalar(sa.text("SELECT name FROM item WHERE id = 2")) == "two"
            assert session.scalar(sa.text("SELECT name FROM item WHERE id = 1")) == "one"
        # The first try broke on replica1; it ran again on replica2, and so
        # did the next read.
        assert [s.node for s in log.statements] == ["replica1", "replica2", "replica2"]
        replica1 = status_of(router, "replica1")
        assert replica1.healthy is False
        assert (replica1.reason or "").startswith("disconnected: ")
        assert status_of(router, "replica2").healthy is True

        session.execute(sa.text("INSERT INTO item VALUES (3, 'three')"))
        session.commit()
        assert session.scalar(sa.text("SELECT name FROM item WHERE id = 3")) == "three"


def test_statement_errors_do_not_mark_a_replica_down(
    topology: Topology, sync_router: sr.ReplicaRouter
) -> None:
    """A bad statement on a replica (a scalar subquery of two rows) raises to the
    caller, runs nowhere else, and the replica keeps its reads."""
    router = sync_router
    with sr.sticky(key_preferring(router, "replica1")), router.sessionmaker()() as session:
        with StatementLog(router) as log, pytest.raises(sa_exc.DBAPIError):
            session.execute(sa.text("SELECT (SELECT 1 UNION ALL SELECT 2)"))
        assert log.counts() == Counter({"replica1": 1})
        assert status_of(router, "replica1").healthy is True
        with StatementLog(router) as log:
            assert session.scalar(sa.text("SELECT name FROM item WHERE id = 1")) == "one"
        assert log.counts() == Counter({"replica1": 1})


def test_a_causal_wait_on_a_dead_replica_moves_on_to_the_next_one(
    topology: Topology, sync_router: sr.ReplicaRouter
) -> None:
    """After a commit, the read waits for its replica; that replica has died (its
    pooled connection breaks): the wait moves on to the other replica, which
    serves the read with the commit, rather than sending it to the primary. (The
    wait and the read travel in one round trip, on psycopg and PyMySQL alike: the
    read was sent to replica1 too, and lost with the connection.)"""
    router = sync_router
    make = router.sessionmaker()
    key = key_preferring(router, "replica1")
    assert sticky_count(router, key) == (2, ["replica1"])  # a pooled connection
    with sr.sticky(key), make() as session:
        session.execute(sa.text("INSERT INTO item VALUES (3, 'three')"))
        session.commit()
        topology.kill_replica(0)
        with StatementLog(router) as log:
            assert session.scalar(sa.text("SELECT count(*) FROM item")) == 3
    reads = [s.node for s in log.statements if "item" in s.sql]
    assert reads[-1] == "replica2"
    assert reads[:-1] == ["replica1"]
    assert status_of(router, "replica1").healthy is False


def test_monotonic_reads_do_not_go_back_in_time_when_their_replica_dies(
    topology: Topology, sync_router: sr.ReplicaRouter
) -> None:
    """A monotonic scope read three items on replica1; replica2 is paused with
    two. replica1 dies: the next read must not return two (older than what the
    scope saw); it is served by the primary instead."""
    router = sync_router
    topology.pause_replay(1)
    engine = sa.create_engine(topology.primary_url)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO item VALUES (3, 'three')"))
    engine.dispose()
    topology.wait_for_catchup()  # replica1 only: replica2 is paused
    key = key_preferring(router, "replica1")
    with sr.sticky(key), sr.consistency("monotonic"), router.sessionmaker()() as session:
        with StatementLog(router) as log:
            assert session.scalar(sa.text("SELECT count(*) FROM item")) == 3
        assert [s.node for s in log.statements] == ["replica1"]
        topology.kill_replica(0)
        with StatementLog(router) as log:
            assert session.scalar(sa.text("SELECT count(*) FROM item")) == 3
        assert "replica2" not in [s.node for s in log.statements if "item" in s.sql]


@pytest.mark.parametrize("level", ["read_your_writes", "monotonic", "eventual", "bounded"])
def test_with_every_replica_down_reads_are_served_by_the_primary(
    topology: Topology, sync_router: sr.ReplicaRouter, level: sr.ConsistencyLevel
) -> None:
    """Both replicas die under open sessions: reads at every level succeed on
    the primary, without an error."""
    router = sync_router
    with router.sessionmaker()() as session, sr.consistency(level):
        for _ in range(2):  # a connection to each replica
            assert session.scalar(sa.text("SELECT count(*) FROM item")) == 2
        topology.kill_replica(0)
        topology.kill_replica(1)
        with StatementLog(router) as log:
            for _ in range(3):
                assert session.scalar(sa.text("SELECT count(*) FROM item")) == 2
    # Each replica broke the first read that tried it, then got no more.
    reads = Counter(s.node for s in log.statements if "count(*)" in s.sql)
    assert reads["primary"] == 3
    assert reads["replica1"] <= 1
    assert reads["replica2"] <= 1
    assert [s.healthy for s in router.status()] == [False, False]


def test_a_down_replica_is_readmitted_after_a_probe_gets_through(topology: Topology) -> None:
    """Killed and restarted, a replica gets reads again once the monitor's probe
    reaches it; its pooled connections, broken by the restart, cost no read."""
    create_schema(topology)
    router = make_router(topology, QUICK_CHECKS)
    try:
        await_all_healthy(router)
        key = key_preferring(router, "replica1")
        assert sticky_count(router, key) == (2, ["replica1"])  # a pooled connection
        topology.kill_replica(0)
        wait_until(lambda: status_of(router, "replica1").healthy is False, timeout=5, what="down")
        topology.start_replica(0)
        await_all_healthy(router)
        assert sticky_count(router, key) == (2, ["replica1"])
    finally:
        router.dispose()


class ReadLoad:
    """Workers reading in a loop, each read in its own session (a request);
    counts reads that returned the right answer and reads that failed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = 0
        self.failures: list[BaseException] = []
        self.stop = threading.Event()

    def record(self, ok: bool, error: BaseException | None = None) -> None:
        with self.lock:
            if ok:
                self.done += 1
            else:
                self.failures.append(error or AssertionError("wrong result"))

    def await_reads(self, more: int, timeout: float = 20.0) -> None:
        target = self.done + more
        wait_until(
            lambda: self.done >= target or bool(self.failures), timeout=timeout, what="reads"
        )
        assert not self.failures, self.failures[:3]


def run_kill_scenario(topology: Topology, router: AnyRouter, load: ReadLoad) -> None:
    """With ``load`` running: kill replica1; once it is marked down it gets no
    traffic; restarted, it serves again. No read fails throughout."""
    traffic = Traffic(router)
    try:
        load.await_reads(50)
        assert traffic.to("replica1") > 0
        topology.kill_replica(0)
        load.await_reads(50)
        wait_until(lambda: status_of(router, "replica1").healthy is False, timeout=5, what="down")
        traffic.clear()
        load.await_reads(100)
        assert traffic.to("replica1") == 0
        assert traffic.to("replica2") > 0

        topology.start_replica(0)
        await_all_healthy(router)
        traffic.clear()
        load.await_reads(100)
        assert traffic.to("replica1") > 0
    finally:
        load.stop.set()
        traffic.close()
    assert load.failures == []


def test_killing_a_replica_under_threaded_read_load_fails_no_read(topology: Topology) -> None:
    """Eight threads read continuously while a replica is killed and restarted:
    zero failed reads; the dead replica gets no traffic once marked down, and
    reads again after its restart."""
    create_schema(topology)
    router = make_router(topology, QUICK_CHECKS)
    make = router.sessionmaker()
    load = ReadLoad()

    def worker() -> None:
        while not load.stop.is_set():
            try:
                with make() as session:
                    load.record(session.scalar(sa.text("SELECT count(*) FROM item")) == 2)
            except Exception as error:
                load.record(False, error)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    try:
        await_all_healthy(router)
        for thread in threads:
            thread.start()
        run_kill_scenario(topology, router, load)
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(timeout=30)
        router.dispose()


def test_killing_a_replica_under_asyncio_read_load_fails_no_read(topology: Topology) -> None:
    """The same with eight asyncio tasks on the async drivers, the scenario
    driven from a thread so the event loop keeps running."""
    create_schema(topology)
    router = make_async_router(topology, QUICK_CHECKS)
    load = ReadLoad()

    async def main() -> None:
        make = router.async_sessionmaker()

        async def worker() -> None:
            while not load.stop.is_set():
                try:
                    async with make() as session:
                        count = await session.scalar(sa.text("SELECT count(*) FROM item"))
                        load.record(count == 2)
                except Exception as error:
                    load.record(False, error)

        tasks = [asyncio.create_task(worker()) for _ in range(8)]
        scenario = asyncio.create_task(asyncio.to_thread(run_kill_scenario, topology, router, load))
        try:
            await scenario
        finally:
            load.stop.set()
            await asyncio.gather(*tasks)
            await router.adispose()

    await_all_healthy(router)
    asyncio.run(main())


def test_a_frozen_replica_is_left_out_without_stalling_the_other_checks(
    topology: Topology,
) -> None:
    """replica1 is frozen (SIGSTOP: it accepts connections, answers nothing): its
    check times out and it is left out, reads go to replica2, replica2's checks
    go on (its applied position follows new commits), and once thawed replica1
    is readmitted."""
    create_schema(topology)
    router = make_router(topology, QUICK_CHECKS)
    make = router.sessionmaker()
    key = key_preferring(router, "replica1")
    try:
        await_all_healthy(router)
        topology.freeze_replica(0)
        wait_until(lambda: status_of(router, "replica1").healthy is False, timeout=10, what="out")
        assert "no answer within" in (status_of(router, "replica1").reason or "")

        assert sticky_count(router, key) == (2, ["replica2"])

        before = status_of(router, "replica2").position
        with make() as session:
            session.execute(sa.text("INSERT INTO item VALUES (3, 'three')"))
            session.commit()
        wait_until(
            lambda: status_of(router, "replica2").position != before,
            timeout=10,
            what="replica2's checks to go on",
        )

        topology.thaw_replica(0)
        await_all_healthy(router)
        assert sticky_count(router, key) == (3, ["replica1"])
    finally:
        topology.thaw_replica(0)
        router.dispose()


@pytest.mark.mariadb
def test_a_read_timeout_on_a_frozen_replica_runs_the_read_elsewhere(
    fresh_mariadb_topology: Topology,
) -> None:
    """With PyMySQL's read_timeout set, a read on a replica that froze after the
    session connected gives up after the timeout, counts as a lost connection,
    and is answered by the other replica."""
    topology = fresh_mariadb_topology
    create_schema(topology)
    router = sr.ReplicaRouter(
        topology.primary_url,
        topology.replica_urls,
        lag_check_interval=NO_MONITOR_CHECKS,
        engine_options={"connect_args": {"connect_timeout": 2, "read_timeout": 2}},
    )
    try:
        await_all_healthy(router)
        with sr.sticky(key_preferring(router, "replica1")), router.sessionmaker()() as session:
            assert session.scalar(sa.text("SELECT count(*) FROM item")) == 2
            topology.freeze_replica(0)
            with StatementLog(router) as log:
                assert session.scalar(sa.text("SELECT count(*) FROM item")) == 2
        assert [s.node for s in log.statements] == ["replica1", "replica2"]
        assert "timed out" in (status_of(router, "replica1").reason or "")
    finally:
        topology.thaw_replica(0)
        router.dispose()


@pytest.mark.postgresql
def test_a_read_cancelled_by_a_recovery_conflict_runs_on_the_primary(
    fresh_postgres_topology: Topology,
    provoke_recovery_conflict: Callable[[Topology, str, Callable[[], None]], None],
) -> None:
    """A standby cancels a long read that holds a lock replay needs ("conflict
    with recovery"): the caller still gets its rows, from the primary, and the
    replica, which is fine, keeps its reads."""
    topology = fresh_postgres_topology
    create_schema(topology)
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls, lag_check_interval=NO_MONITOR_CHECKS
    )
    router.start()
    outcome: dict[str, Any] = {}

    def long_read() -> None:
        key = key_preferring(router, "replica1")
        try:
            with sr.sticky(key), router.sessionmaker()() as session, StatementLog(router) as log:
                outcome["count"] = session.scalar(sa.text("SELECT count(*) FROM item, pg_sleep(2)"))
            outcome["nodes"] = [s.node for s in log.statements]
        except Exception as error:
            outcome["error"] = error

    try:
        await_all_healthy(router)
        provoke_recovery_conflict(topology, "item", long_read)
        assert outcome == {"count": 2, "nodes": ["replica1", "primary"]}
        assert status_of(router, "replica1").healthy is True
    finally:
        router.dispose()
