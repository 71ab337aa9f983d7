"""Replica identity and first contact: a server that is not a replica of this
primary never serves a read, from the first one; a replica frozen at start-up
costs a read no more than ``wait_timeout``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.positions.mariadb import (
    MariaDBPositions,
    MariaDBPrimary,
    MariaDBReplica,
    MariaDBSource,
)
from sqlalchemy_replicas.positions.mysql import MySQLPositions, MySQLReplica
from sqlalchemy_replicas.positions.postgresql import PostgresIdentity, PostgresPositions
from sqlalchemy_replicas.testing import (
    MariaDBTopology,
    PostgresTopology,
    StatementLog,
    Topology,
    wait_until,
)

WAIT_TIMEOUT = 0.5
#: Where a frozen replica used to hold the first read: the driver's own
#: timeouts, which these tests set low so that the old behaviour fails fast.
DRIVER_TIMEOUT = 5

# -- the pure comparison ------------------------------------------------------


def test_postgres_standby_of_another_cluster_is_not_a_replica() -> None:
    backend = PostgresPositions()
    primary = PostgresIdentity("7311", in_recovery=False)
    assert backend.not_a_replica(primary, PostgresIdentity("7311", in_recovery=True)) is None
    other = backend.not_a_replica(primary, PostgresIdentity("9001", in_recovery=True))
    assert other is not None
    assert "another cluster" in other
    assert "9001" in other
    promoted = backend.not_a_replica(primary, PostgresIdentity("7311", in_recovery=False))
    assert promoted is not None
    assert "not in recovery" in promoted


def test_mariadb_replica_must_replicate_from_the_primarys_address_port_and_server_id() -> None:
    backend = MariaDBPositions()
    primary = MariaDBPrimary(1, 3306, frozenset({"db1", "10.0.0.5"}))

    def source(host: str, port: int = 3306, server_id: int = 1) -> MariaDBReplica:
        return MariaDBReplica((MariaDBSource(host, port, server_id, frozenset({host})),))

    assert backend.not_a_replica(primary, source("10.0.0.5")) is None
    # Not connected to its source since it started: the address decides.
    assert backend.not_a_replica(primary, source("db1", server_id=0)) is None
    for stranger in (source("10.0.0.9"), source("db1", port=3307), source("db1", server_id=7)):
        reason = backend.not_a_replica(primary, stranger)
        assert reason is not None
        assert "not from the primary" in reason
    multi = MariaDBReplica((*source("10.9.9.9").sources, *source("db1").sources))
    assert backend.not_a_replica(primary, multi) is None  # one of its sources is ours
    none = backend.not_a_replica(primary, MariaDBReplica())
    assert none is not None
    assert "no replication source" in none
    denied = MariaDBReplica(problem="grant SLAVE MONITOR")
    assert backend.not_a_replica(primary, denied) == "grant SLAVE MONITOR"


def test_mysql_replica_must_name_the_primarys_uuid_as_its_source() -> None:
    backend = MySQLPositions()
    uuid = "3e11fa47-71ca-11e1-9e33-c80aa9429562"
    assert backend.not_a_replica(uuid, MySQLReplica((uuid,))) is None
    other = backend.not_a_replica(uuid, MySQLReplica(("0a0a0a0a-71ca-11e1-9e33-c80aa9429562",)))
    assert other is not None
    assert uuid in other
    assert backend.not_a_replica(uuid, MySQLReplica()) is not None
    assert backend.not_a_replica(uuid, MySQLReplica(problem="denied")) == "denied"


# -- against real servers -------------------------------------------------------


@pytest.fixture(scope="module")
def other_postgres() -> Iterator[PostgresTopology]:
    with PostgresTopology(replicas=1) as topology:
        yield topology


@pytest.fixture(scope="module")
def other_mariadb() -> Iterator[MariaDBTopology]:
    with MariaDBTopology(replicas=1) as topology:
        yield topology


@pytest.fixture
def other_cluster(topology: Topology, request: pytest.FixtureRequest) -> Topology:
    """Another cluster of the same kind, holding a row of its own."""
    name = "other_postgres" if isinstance(topology, PostgresTopology) else "other_mariadb"
    other: Topology = request.getfixturevalue(name)
    other.reset()
    _create_marker_table(other, "theirs")
    other.wait_for_catchup()
    return other


def _create_marker_table(topology: Topology, owner: str) -> None:
    engine = sa.create_engine(topology.primary_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE marker (id INTEGER PRIMARY KEY, owner TEXT)"))
            conn.execute(sa.text("INSERT INTO marker VALUES (1, :owner)"), {"owner": owner})
    finally:
        engine.dispose()


def _status(router: sr.ReplicaRouter[Any], name: str) -> sr.ReplicaStatus:
    return next(status for status in router.status() if status.name == name)


@pytest.fixture
def ours(topology: Topology) -> Topology:
    _create_marker_table(topology, "ours")
    topology.wait_for_catchup()
    return topology


def test_servers_of_another_cluster_never_serve_a_read(
    ours: Topology, other_cluster: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """From the router's very first read, at every level, reads come from the
    primary or its own replica; another cluster's replica and primary get
    none, and status() and the log say why."""
    caplog.set_level(logging.WARNING, logger="sqlalchemy_replicas.monitor")
    router = sr.ReplicaRouter(
        ours.primary_url,
        {
            "ours": ours.replica_urls[0],
            "stranger": other_cluster.replica_urls[0],
            "stranger_primary": other_cluster.primary_url,
        },
        wait_timeout=WAIT_TIMEOUT,
        lag_check_interval=0.2,
    )
    Session = router.sessionmaker()
    owners = []
    try:
        with StatementLog(router) as log:
            for level in ("eventual", "read_your_writes", "monotonic") * 6:
                with Session(consistency=level) as session:
                    owners.append(session.scalar(sa.text("SELECT owner FROM marker")))
        with Session() as session:
            session.execute(sa.text("UPDATE marker SET owner = 'ours, updated'"))
            session.commit()
            owners.append(session.scalar(sa.text("SELECT owner FROM marker")))
        assert owners[:-1] == ["ours"] * 18
        assert owners[-1] == "ours, updated"
        assert log.counts()["stranger"] == log.counts()["stranger_primary"] == 0
        assert log.counts()["ours"] > 0  # our replica was used: the check can tell
        stranger, stranger_primary = (
            _status(router, "stranger"),
            _status(router, "stranger_primary"),
        )
        for status in (stranger, stranger_primary):
            assert status.healthy is False
            assert status.reason is not None
            assert "not a replica of this primary" in status.reason
        assert _status(router, "ours").healthy is True
        warned = [r.getMessage() for r in caplog.records if "stranger" in r.getMessage()]
        assert any("not a replica of this primary" in message for message in warned)
    finally:
        router.dispose()


@pytest.mark.postgresql
def test_postgres_reason_names_the_other_clusters_system_identifier(
    fresh_postgres_topology: PostgresTopology, other_postgres: PostgresTopology
) -> None:
    router = sr.ReplicaRouter(
        fresh_postgres_topology.primary_url, {"stranger": other_postgres.replica_urls[0]}
    )
    try:
        router.start()
        reason = _status(router, "stranger").reason
        assert reason is not None
        assert "another cluster" in reason
    finally:
        router.dispose()


def test_async_reads_never_come_from_another_cluster(
    ours: Topology, other_cluster: Topology
) -> None:
    async def main() -> list[str | None]:
        router = sr.ReplicaRouter[AsyncEngine](
            ours.async_primary_url,
            {"ours": ours.async_replica_urls[0], "stranger": other_cluster.async_replica_urls[0]},
            wait_timeout=WAIT_TIMEOUT,
        )
        Session = router.async_sessionmaker()
        try:
            owners = []
            for _ in range(8):
                async with Session() as session:
                    result = await session.execute(
                        sa.text("SELECT owner FROM marker"),
                        execution_options={"consistency": "eventual"},
                    )
                    owners.append(result.scalar())
            await router.astart()  # waits for every replica's first check
            assert _status(router, "stranger").healthy is False
            return owners
        finally:
            await router.adispose()

    assert asyncio.run(main()) == ["ours"] * 8


@pytest.mark.mariadb
def test_mariadb_user_without_slave_monitor_gets_no_replica_reads_and_is_told_the_grant(
    fresh_mariadb_topology: MariaDBTopology,
) -> None:
    """Without the privilege to read a replica's source the router cannot
    show it replicates from this primary: no reads there, and status()
    names the grant that fixes it."""
    topology = fresh_mariadb_topology
    database = topology.primary_url.database
    # As root, on the primary (users replicate): the app user may not create users.
    topology.admin_execute(
        "primary",
        "CREATE USER IF NOT EXISTS 'plain'@'%' IDENTIFIED BY 'plain'",
        f"GRANT ALL ON {database}.* TO 'plain'@'%'",
    )
    topology.wait_for_catchup()

    def as_plain(url: sa.URL) -> sa.URL:
        return url.set(username="plain", password="plain")

    router = sr.ReplicaRouter(
        as_plain(topology.primary_url), [as_plain(u) for u in topology.replica_urls]
    )
    try:
        router.start()
        with StatementLog(router) as log, router.sessionmaker()() as session:
            session.execute(sa.text("SELECT 1"), execution_options={"consistency": "eventual"})
        assert log.counts()["primary"] == 1
        for status in router.status():
            assert status.healthy is False
            assert status.reason is not None
            assert "SLAVE MONITOR" in status.reason
    finally:
        router.dispose()
        topology.admin_execute("primary", "DROP USER 'plain'@'%'")


# -- a replica frozen at start-up ------------------------------------------------


def _driver_timeouts(topology: Topology, *, is_async: bool = False) -> dict[str, Any]:
    """The bounded driver timeouts docs/failures.md recommends (aiomysql has
    no read timeout)."""
    if isinstance(topology, PostgresTopology) or is_async:
        return {"connect_args": {"connect_timeout": DRIVER_TIMEOUT}}
    return {"connect_args": {"connect_timeout": DRIVER_TIMEOUT, "read_timeout": DRIVER_TIMEOUT}}


@pytest.mark.parametrize("level", ["eventual", "read_your_writes"])
def test_a_replica_frozen_at_start_up_costs_the_first_read_at_most_wait_timeout(
    topology: Topology, level: str
) -> None:
    """The first read of a new router does not contact a replica the monitor
    has not checked: it waits at most wait_timeout for the first check, and
    the frozen replica never gets it."""
    topology.freeze_replica(0)
    router = sr.ReplicaRouter(
        topology.primary_url,
        topology.replica_urls,
        wait_timeout=WAIT_TIMEOUT,
        engine_options=_driver_timeouts(topology),
    )
    try:
        with StatementLog(router) as log, router.sessionmaker()() as session:
            started = time.monotonic()
            session.execute(sa.text("SELECT 1"), execution_options={"consistency": level})
            elapsed = time.monotonic() - started
        assert log.counts()["replica1"] == 0
        # Bounded by wait_timeout plus the start position query, under load;
        # the driver's timeout (DRIVER_TIMEOUT) is what it took before.
        assert elapsed < WAIT_TIMEOUT + 1.5, elapsed
        wait_until(
            lambda: _status(router, "replica1").healthy is False,
            timeout=10,
            what="the monitor to find replica1 unreachable",
        )
    finally:
        topology.thaw_replica(0)
        router.dispose()


def test_async_first_read_waits_off_the_event_loop(topology: Topology) -> None:
    """With every replica frozen the first read waits the whole wait_timeout
    for their first check, in a worker thread: other tasks keep running
    meanwhile, and the read then goes to the primary within the bound."""
    topology.freeze_replica(0)
    topology.freeze_replica(1)

    async def main() -> tuple[float, float]:
        router = sr.ReplicaRouter[AsyncEngine](
            topology.async_primary_url,
            topology.async_replica_urls,
            wait_timeout=WAIT_TIMEOUT,
            engine_options=_driver_timeouts(topology, is_async=True),
        )
        longest_gap = 0.0
        reading = True

        async def tick() -> None:
            nonlocal longest_gap
            last = time.monotonic()
            while reading:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                longest_gap, last = max(longest_gap, now - last), now

        try:
            async with router.async_sessionmaker()() as session:
                await session.execute(sa.text("SELECT 1"))  # the start position, first
                ticker = asyncio.create_task(tick())
                started = time.monotonic()
                await session.execute(
                    sa.text("SELECT 1"), execution_options={"consistency": "eventual"}
                )
                elapsed = time.monotonic() - started
                reading = False
                await ticker
        finally:
            await router.adispose()
        return elapsed, longest_gap

    try:
        elapsed, longest_gap = asyncio.run(main())
    finally:
        topology.thaw_replica(0)
        topology.thaw_replica(1)
    assert elapsed < WAIT_TIMEOUT + 1.5, elapsed
    # Blocking the loop for the wait would leave a gap of about WAIT_TIMEOUT.
    assert longest_gap < WAIT_TIMEOUT / 2, longest_gap


def test_start_waits_for_the_first_check_so_the_first_read_finds_replicas_known(
    topology: Topology,
) -> None:
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    try:
        router.start()
        assert all(status.healthy is True for status in router.status())
        with StatementLog(router) as log, router.sessionmaker()() as session:
            session.execute(sa.text("SELECT 1"), execution_options={"consistency": "eventual"})
        assert log.counts()["primary"] == 0
    finally:
        router.dispose()
