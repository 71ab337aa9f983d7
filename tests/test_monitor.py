"""The lag monitor: lag by position, exclusion with hysteresis, bounded reads, status()."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.breaker import FIRST_BACKOFF
from sqlalchemy_replicas.monitor import LagEstimator, LagMonitor
from sqlalchemy_replicas.testing import StatementLog, Topology
from sqlalchemy_replicas.testing._process import wait_until

MAX_LAG = 1.0
INTERVAL = 0.2


def test_lag_is_the_age_of_the_newest_primary_sample_applied() -> None:
    """Applied the latest sample: no lag; an older one: time since it; none kept:
    a lower bound only."""
    estimator = LagEstimator(lambda applied, target: applied >= target, horizon=10)
    for when, position in ((0.0, 10), (1.0, 20), (2.0, 30)):
        estimator.record_primary(when, position)
    assert estimator.lag(30, now=2.1) == (0.0, True)
    assert estimator.lag(25, now=2.1) == pytest.approx((1.1, True))
    assert estimator.lag(5, now=2.1) == pytest.approx((2.1, False))
    estimator.record_primary(12.5, 40)  # samples older than the horizon go...
    assert estimator.lag(40, now=12.6) == (0.0, True)
    # ...so an applied position older than every kept sample gives a lower bound
    assert estimator.lag(30, now=12.6) == pytest.approx((0.1, False))


def test_without_a_current_sample_the_newest_one_bounds_the_lag_by_its_age() -> None:
    """The primary did not answer this round: commits may have been acknowledged
    after its newest sample, so a replica that reached it is as stale as it is old."""
    estimator = LagEstimator(lambda applied, target: applied >= target, horizon=10)
    estimator.record_primary(1.0, 10)
    assert estimator.lag(10, now=4.0) == (0.0, True)
    assert estimator.lag(10, now=4.0, current=False) == pytest.approx((3.0, True))


@pytest.fixture
def router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    router = sr.ReplicaRouter(
        topology.primary_url,
        topology.replica_urls,
        max_lag=MAX_LAG,
        lag_check_interval=INTERVAL,
    )
    primary = router.primary
    with primary.begin() as conn:
        conn.execute(sa.text("CREATE TABLE tick (id INTEGER PRIMARY KEY)"))
    topology.wait_for_catchup()
    yield router
    router.dispose()


def status_of(router: sr.ReplicaRouter, name: str) -> sr.ReplicaStatus:
    return next(s for s in router.status() if s.name == name)


def await_health(router: sr.ReplicaRouter, name: str, healthy: bool, timeout: float) -> None:
    wait_until(
        lambda: status_of(router, name).healthy is healthy,
        timeout=timeout,
        what=f"{name} to be {'healthy' if healthy else 'left out'}",
    )


def tick(router: sr.ReplicaRouter, n: int) -> None:
    with router.primary.begin() as conn:
        conn.execute(sa.text("INSERT INTO tick (id) VALUES (:id)"), {"id": n})


def probe_reads(router: sr.ReplicaRouter, level: sr.ConsistencyLevel, **kw: float) -> set[str]:
    """Where 6 reads at ``level`` went."""
    with (
        StatementLog(router) as log,
        router.sessionmaker()() as session,
        sr.consistency(level, **kw),
    ):
        for _ in range(6):
            session.execute(sa.text("SELECT count(*) AS probe FROM tick"))
    return {s.node for s in log.statements if "probe" in s.sql}


def test_status_reports_each_replica(router: sr.ReplicaRouter, topology: Topology) -> None:
    """status(): name, URL without password, healthy, lag, applied position, and
    what is left to apply (bytes on PostgreSQL, transactions on MariaDB)."""
    router.status()  # starts the monitor
    await_health(router, "replica1", True, timeout=5)
    await_health(router, "replica2", True, timeout=5)
    for status in router.status():
        assert status.lag_seconds is not None
        assert status.lag_seconds <= MAX_LAG
        if topology.backend == "mariadb":
            assert (status.lag_bytes, status.lag_transactions) == (None, 0)
        else:  # WAL bytes, which even an idle primary writes now and then
            assert status.lag_transactions is None
            assert isinstance(status.lag_bytes, int)
        assert status.position
        assert status.reason is None
        assert ":app@" not in status.url


def test_lagging_replica_gets_no_reads_until_it_catches_up(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """A replica that stops applying while the primary commits is left out of eventual
    and bounded reads within about max_lag plus two checks, and gets them back once it
    catches up; with every replica out, reads go to the primary; the operator switch
    ignores lag."""
    router.status()
    await_health(router, "replica1", True, timeout=5)
    topology.pause_replay(0)
    tick(router, 1)
    await_health(router, "replica1", False, timeout=MAX_LAG + 2 * INTERVAL + 2)
    replica1 = status_of(router, "replica1")
    assert "lag" in (replica1.reason or "")
    if topology.backend == "mariadb":
        assert (replica1.lag_bytes, replica1.lag_transactions) == (None, 1)  # the tick
    else:
        assert replica1.lag_transactions is None
        assert replica1.lag_bytes is not None
        assert replica1.lag_bytes > 0
    assert probe_reads(router, "eventual") == {"replica2"}
    assert probe_reads(router, "bounded", max_lag=0.5) == {"replica2"}

    topology.pause_replay(1)
    tick(router, 2)
    await_health(router, "replica2", False, timeout=MAX_LAG + 2 * INTERVAL + 2)
    assert probe_reads(router, "eventual") == {"primary"}
    router.ignore_lag = True
    assert probe_reads(router, "eventual") == {"replica1", "replica2"}
    router.ignore_lag = False

    topology.resume_replay(0)
    topology.resume_replay(1)
    await_health(router, "replica1", True, timeout=5)
    await_health(router, "replica2", True, timeout=5)
    assert probe_reads(router, "eventual") == {"replica1", "replica2"}


def test_apply_delay_over_max_lag_leaves_a_replica_out_until_removed(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """replica1 applies every commit 3 s late while the primary commits steadily:
    it gets no reads within max_lag plus two checks (plus slack for a busy
    machine), and reads again once the delay is removed."""
    router.status()
    await_health(router, "replica1", True, timeout=5)
    topology.set_apply_delay(0, 3.0)
    stop = threading.Event()
    ticks = itertools.count(1)

    def ticking() -> None:
        while not stop.wait(0.05):
            tick(router, next(ticks))

    writer = threading.Thread(target=ticking)
    writer.start()
    try:
        # Left out for its lag (on PostgreSQL the delay restarts the standby, so a
        # check may first find it unreachable for a moment: that is not this).
        wait_until(
            lambda: (status_of(router, "replica1").reason or "").startswith("lag "),
            timeout=MAX_LAG + 2 * INTERVAL + 1.5,
            what="replica1 to be left out for its lag",
        )
        assert status_of(router, "replica1").healthy is False
        assert probe_reads(router, "eventual") == {"replica2"}
        topology.set_apply_delay(0, 0)
        await_health(router, "replica1", True, timeout=40)  # caught up (and, on PG, restarted)
        assert probe_reads(router, "eventual") == {"replica1", "replica2"}
    finally:
        stop.set()
        writer.join()


def test_unreachable_replica_is_left_out_and_readmitted(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """A killed replica is left out of reads once the monitor sees it down, and gets
    reads again after it restarts."""
    router.status()
    await_health(router, "replica2", True, timeout=5)
    topology.kill_replica(1)
    await_health(router, "replica2", False, timeout=5)
    assert "unreachable" in (status_of(router, "replica2").reason or "")
    assert probe_reads(router, "eventual") == {"replica1"}
    topology.start_replica(1)
    await_health(router, "replica2", True, timeout=40)  # probes back off up to 30 s
    # Its pooled connections broke with it: they are dropped, not read on.
    assert probe_reads(router, "eventual") == {"replica1", "replica2"}


@pytest.mark.mariadb
def test_status_from_a_coroutine_with_mysql_aiomysql_urls(
    fresh_mariadb_topology: Topology,
) -> None:
    """router.status() called in a coroutine, with mysql+aiomysql:// URLs (the dialect
    cannot tell MySQL from MariaDB without connecting, and an async driver cannot
    connect outside its greenlet) raises nothing: the lag monitor's own sync connection
    tells, and status() from the same coroutine then reports both replicas healthy with
    MariaDB GTID positions. Async sessions on that router still read from a replica."""
    topology = fresh_mariadb_topology

    def as_mysql(url: sa.URL) -> sa.URL:
        return url.set(drivername="mysql+aiomysql")

    router = sr.ReplicaRouter[AsyncEngine](
        as_mysql(topology.async_primary_url),
        [as_mysql(url) for url in topology.async_replica_urls],
        lag_check_interval=INTERVAL,
    )

    def reported() -> bool:
        statuses = router.status()
        return all(s.healthy and s.position and "-" in s.position for s in statuses)

    async def scenario() -> tuple[list[sr.ReplicaStatus], list[str]]:
        try:
            first = router.status()  # raised MissingGreenlet
            assert [s.name for s in first] == ["replica1", "replica2"]
            while not reported():  # the monitor thread measures meanwhile
                await asyncio.sleep(INTERVAL / 4)
            with StatementLog(router) as log:
                async with router.async_sessionmaker()() as session:
                    assert await session.scalar(sa.text("SELECT 1 AS probe")) == 1
            return router.status(), [s.node for s in log.statements if "probe" in s.sql]
        finally:
            await router.adispose()  # in the loop that made the connections

    statuses, nodes = asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert all(s.healthy for s in statuses)
    assert nodes[0].startswith("replica")


def replay_age(url: sa.URL) -> float:
    """Seconds since the last commit a PostgreSQL standby replayed was made."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            age = conn.scalar(
                sa.text(
                    "SELECT extract(epoch FROM clock_timestamp() - "
                    "pg_last_xact_replay_timestamp())::float8"
                )
            )
    finally:
        engine.dispose()
    return -1.0 if age is None else float(age)


@pytest.fixture
def quiet_standby(fresh_postgres_topology: Topology) -> Iterator[Topology]:
    """A PostgreSQL topology whose last commit is older than MAX_LAG, with replica1
    paused: a commit made now is one replica1 lacks, and the age of the last
    commit it replayed is over MAX_LAG though it is less than a second behind."""
    topology = fresh_postgres_topology
    engine = sa.create_engine(topology.primary_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE tick (id INTEGER PRIMARY KEY)"))
    topology.wait_for_catchup()
    wait_until(
        lambda: replay_age(topology.replica_urls[0]) > MAX_LAG + 0.5,
        timeout=10,
        what="the last commit replica1 replayed to be older than max_lag",
    )
    topology.pause_replay(0)
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO tick (id) VALUES (1)"))
    engine.dispose()
    try:
        yield topology
    finally:
        topology.resume_replay(0)


@pytest.mark.postgresql
@pytest.mark.parametrize("caught_up", [True, False], ids=["caught-up", "still-behind"])
def test_a_replica_is_left_out_for_lag_only_on_a_second_look(
    quiet_standby: Topology, caught_up: bool
) -> None:
    """A new monitor's first check finds replica1 short of the primary's first
    sample: its lag is then bounded only by the age of the last commit it
    replayed, over max_lag after a quiet spell, though it may lack only a moment
    of WAL. The monitor does not leave it out on that bound: it stays unjudged
    (no reads yet) for a second look. Caught up by then, it serves with no lag;
    still behind, it is left out for its lag."""
    topology = quiet_standby
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls, max_lag=MAX_LAG)
    # Driven round by round here, without its thread.
    monitor = LagMonitor(router.cluster, INTERVAL)
    try:
        monitor.check_once(router.cluster)
        first = {s.name: s for s in monitor.status(router.cluster)}
        assert first["replica1"].healthy is None, first["replica1"]
        assert first["replica1"].lag_seconds is not None
        assert first["replica1"].lag_seconds > MAX_LAG
        if caught_up:
            topology.resume_replay(0)
            topology.wait_for_catchup()
        monitor.check_once(router.cluster)
        second = {s.name: s for s in monitor.status(router.cluster)}
        if caught_up:
            assert second["replica1"].healthy is True, second["replica1"]
            assert (second["replica1"].lag_seconds or 0.0) < MAX_LAG
        else:
            assert second["replica1"].healthy is False, second["replica1"]
            assert (second["replica1"].reason or "").startswith("lag ")
    finally:
        monitor.stop()
        router.dispose()


@pytest.mark.postgresql
def test_a_check_that_answers_late_brings_the_replica_back_at_the_next_round(
    fresh_postgres_topology: Topology,
) -> None:
    """A replica too slow to answer one check in time (frozen here, a loaded
    host in real life) is marked down; once that check has answered after
    all, the next round probes it at once instead of after its backoff."""
    topology = fresh_postgres_topology
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls, max_lag=MAX_LAG)
    monitor = LagMonitor(router.cluster, INTERVAL)
    try:
        monitor.check_once(router.cluster)
        assert [s.healthy for s in monitor.status(router.cluster)] == [True, True]
        topology.freeze_replica(1)
        try:
            monitor.check_once(router.cluster)  # replica2 times out: down, backoff 1 s
        finally:
            topology.thaw_replica(1)
        down_at = monitor.down_since("replica2")
        assert down_at is not None
        assert monitor.status(router.cluster)[1].healthy is False
        wait_until(
            lambda: all(not check.is_alive() for check in monitor._in_flight.values()),
            timeout=5,
            what="the timed-out check to answer after the thaw",
        )
        monitor.check_once(router.cluster)
        assert time.monotonic() - down_at < FIRST_BACKOFF, "the probe was not due anyway"
        assert monitor.status(router.cluster)[1].healthy is True
    finally:
        monitor.stop()
        router.dispose()


def test_dense_primary_samples_reuse_the_monitor_s_connections(topology: Topology) -> None:
    """While a replica is behind, the monitor samples the primary's position
    between checks (every 50 ms) on its own pooled connections: twenty such
    samples open no new connection to any server (none is closed after a
    sample)."""
    connects: list[str] = []
    primary = sa.create_engine(topology.primary_url)
    replica = sa.create_engine(topology.replica_urls[0])
    for name, engine in (("primary", primary), ("replica1", replica)):
        sa.event.listen(
            engine,
            "do_connect",
            lambda dialect, record, cargs, cparams, name=name: connects.append(name),
        )
    writer = sa.create_engine(topology.primary_url)
    router = sr.ReplicaRouter(primary, [replica], max_lag=30.0, lag_check_interval=1.0)
    try:
        router.start()
        await_health(router, "replica1", True, timeout=10)
        monitor = router.cluster.monitor
        assert monitor is not None
        topology.pause_replay(0)
        with writer.begin() as conn:
            conn.execute(sa.text("CREATE TABLE dense_tick (id INTEGER)"))
        wait_until(lambda: monitor.primary_samples >= 3, timeout=10, what="dense samples")
        opened, samples = len(connects), monitor.primary_samples
        wait_until(
            lambda: monitor.primary_samples >= samples + 20, timeout=10, what="20 more samples"
        )
        assert connects[opened:] == []
    finally:
        router.dispose()
        for engine in (primary, replica, writer):
            engine.dispose()


def test_while_the_primary_is_down_a_replica_s_lag_grows_from_its_last_answer(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """A replica that had everything the primary last said is not known to have
    what the primary acknowledged since: while the primary does not answer, its
    lag grows from the primary's last answer, and past max_lag it serves no
    bounded or eventual read. Both serve again once the primary is back."""
    router.status()
    await_health(router, "replica1", True, timeout=5)
    await_health(router, "replica2", True, timeout=5)
    topology.stop_primary()
    try:
        wait_until(
            lambda: all(
                (s.reason or "").startswith("lag ") and s.healthy is False for s in router.status()
            ),
            timeout=MAX_LAG + 4 * INTERVAL + 3,
            what="both replicas left out for a lag grown past max_lag",
        )
        assert all((s.lag_seconds or 0.0) > MAX_LAG for s in router.status())
    finally:
        topology.start_primary()
    await_health(router, "replica1", True, timeout=15)
    await_health(router, "replica2", True, timeout=15)
