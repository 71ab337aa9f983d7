"""Primary discovery: writes follow a failover to the candidate that accepts
writes, never reach a read-only node, and fail with PrimaryUnavailable when no
primary is left, while eventual and bounded reads go on from the replicas.

Promotions cannot be undone, so those tests start topologies of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.exc import PrimaryUnavailable
from sqlalchemy_replicas.testing import MariaDBTopology, PostgresTopology, Topology
from sqlalchemy_replicas.testing._process import wait_until

BACKENDS = [
    pytest.param(PostgresTopology, marks=pytest.mark.postgresql, id="postgresql"),
    pytest.param(MariaDBTopology, marks=pytest.mark.mariadb, id="mariadb"),
]


@pytest.fixture(params=BACKENDS)
def own_topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """A topology for this test alone (a promotion cannot be undone)."""
    with request.param(replicas=2) as topology:
        yield topology


def create_schema(topology: Topology) -> None:
    engine = sa.create_engine(topology.primary_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE note (id INTEGER PRIMARY KEY, body VARCHAR(20))"))
        conn.execute(sa.text("INSERT INTO note VALUES (1, 'before')"))
    engine.dispose()
    topology.wait_for_catchup()


def bodies_on(url: sa.URL) -> list[str]:
    """The notes stored on one server, asked directly."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.scalars(sa.text("SELECT body FROM note ORDER BY id")))
    finally:
        engine.dispose()


def test_writes_follow_a_failover_to_the_promoted_replica(own_topology: Topology) -> None:
    """replica1 is promoted and the old primary stopped: the next write lands on
    replica1, found among the candidates although replica2 (still a replica,
    read-only) is listed first; the write's own session reads it back."""
    topology = own_topology
    create_schema(topology)
    old_primary, (new_primary, other) = topology.primary_url, topology.replica_urls
    router = sr.ReplicaRouter(
        old_primary, topology.replica_urls, primary_candidates=[other, new_primary]
    )
    make = router.sessionmaker()
    try:
        with make() as session:
            session.execute(sa.text("INSERT INTO note VALUES (2, 'old primary')"))
            session.commit()
        assert router.primary_url == old_primary.render_as_string(hide_password=True)

        topology.wait_for_catchup()
        topology.promote_replica(0)
        topology.stop_primary()

        with make() as session:
            session.execute(sa.text("INSERT INTO note VALUES (3, 'new primary')"))
            session.commit()
            assert session.scalar(sa.text("SELECT body FROM note WHERE id = 3")) == "new primary"
        assert router.primary_url == new_primary.render_as_string(hide_password=True)
        assert bodies_on(new_primary) == ["before", "old primary", "new primary"]
        assert bodies_on(other) == ["before", "old primary"]  # a replica: written nowhere
    finally:
        router.dispose()


def test_async_writes_follow_a_failover(own_topology: Topology) -> None:
    """The same through the async drivers (psycopg async, aiomysql): discovery
    runs inside the event loop's connection attempts."""
    topology = own_topology
    create_schema(topology)
    new_primary = topology.replica_urls[0]
    router = sr.ReplicaRouter[AsyncEngine](
        topology.async_primary_url,
        topology.async_replica_urls,
        primary_candidates=topology.async_replica_urls,
    )

    async def main() -> object:
        make = router.async_sessionmaker()
        async with make() as session:  # pools a connection to the old primary
            await session.execute(sa.text("INSERT INTO note VALUES (2, 'old primary')"))
            await session.commit()
        topology.wait_for_catchup()
        topology.promote_replica(0)
        topology.stop_primary()
        async with make() as session:
            await session.execute(sa.text("INSERT INTO note VALUES (3, 'new primary')"))
            await session.commit()
            body = await session.scalar(sa.text("SELECT body FROM note WHERE id = 3"))
        await router.adispose()
        return body

    assert asyncio.run(main()) == "new primary"
    assert bodies_on(new_primary) == ["before", "old primary", "new primary"]


def test_without_a_primary_writes_raise_and_eventual_reads_go_on(topology: Topology) -> None:
    """The primary is stopped and no candidate is configured: a write raises
    PrimaryUnavailable naming the primary and the fix; eventual and bounded
    reads are still served by the replicas, and a replica that dies and
    comes back meanwhile is readmitted."""
    create_schema(topology)
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls, lag_check_interval=0.2)
    make = router.sessionmaker()
    try:
        wait_until(lambda: all(s.healthy for s in router.status()), timeout=10, what="healthy")
        topology.stop_primary()
        with make() as session, pytest.raises(PrimaryUnavailable) as raised:
            session.execute(sa.text("INSERT INTO note VALUES (2, 'lost')"))
        message = str(raised.value)
        assert f"127.0.0.1:{topology.primary_url.port}" in message
        assert "primary_candidates" in message
        assert isinstance(raised.value.__cause__, Exception)

        for level in ("eventual", "bounded"):
            with make() as session, sr.consistency(level):
                assert session.scalar(sa.text("SELECT body FROM note WHERE id = 1")) == "before"

        # Replicas are still probed while the primary is away.
        topology.kill_replica(0)
        with make() as session, sr.consistency("eventual"):
            for _ in range(2):
                assert session.scalar(sa.text("SELECT body FROM note WHERE id = 1")) == "before"
        topology.start_replica(0, await_replicating=False)
        wait_until(lambda: all(s.healthy for s in router.status()), timeout=40, what="readmitted")
    finally:
        router.dispose()


def test_no_candidate_accepting_writes_raises_primary_unavailable(topology: Topology) -> None:
    """With the primary stopped and only replicas (read-only) as candidates, a
    write is refused before it reaches any server."""
    create_schema(topology)
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls, primary_candidates=topology.replica_urls
    )
    try:
        topology.stop_primary()
        with router.sessionmaker()() as session, pytest.raises(PrimaryUnavailable) as raised:
            session.execute(sa.text("INSERT INTO note VALUES (2, 'lost')"))
        assert str(raised.value).count("read-only") == 2
        assert bodies_on(topology.replica_urls[0]) == ["before"]
    finally:
        router.dispose()


@pytest.mark.mariadb
def test_a_write_refused_by_a_demoted_primary_sends_the_next_one_to_the_new_primary() -> None:
    """The old MariaDB primary stays up but turns read_only, and replica1 is
    promoted: the first write on a pooled connection is refused (nothing
    written anywhere), and the next one reaches replica1."""
    with MariaDBTopology(replicas=2) as topology:
        create_schema(topology)
        old_primary, (new_primary, _) = topology.primary_url, topology.replica_urls
        router = sr.ReplicaRouter(
            old_primary, topology.replica_urls, primary_candidates=[new_primary]
        )
        make = router.sessionmaker()
        try:
            with make() as session:  # a pooled connection to the old primary
                session.execute(sa.text("INSERT INTO note VALUES (2, 'old primary')"))
                session.commit()
            topology.wait_for_catchup()
            topology.set_primary_read_only(True)
            topology.promote_replica(0)

            with make() as session, pytest.raises(sa_exc.DBAPIError):
                session.execute(sa.text("INSERT INTO note VALUES (3, 'refused')"))
            with make() as session:
                session.execute(sa.text("INSERT INTO note VALUES (4, 'new primary')"))
                session.commit()
            assert bodies_on(new_primary) == ["before", "old primary", "new primary"]
            assert bodies_on(old_primary) == ["before", "old primary"]
        finally:
            router.dispose()


@pytest.mark.postgresql
@pytest.mark.parametrize("with_candidates", [False, True], ids=["alone", "candidates"])
def test_the_application_s_do_connect_listener_still_applies(
    fresh_postgres_topology: Topology, with_candidates: bool
) -> None:
    """A do_connect listener that edits the connect arguments (as one that sets
    an IAM token does) still shapes every primary connection: without
    candidates whenever it is registered (the router adds no do_connect
    listener then), with candidates when registered before the router."""
    topology = fresh_postgres_topology
    primary = sa.create_engine(topology.primary_url)

    def name_the_app(dialect: object, record: object, cargs: object, cparams: Any) -> None:
        cparams["application_name"] = "shaped-by-the-app"

    if with_candidates:
        sa.event.listen(primary, "do_connect", name_the_app)
        router = sr.ReplicaRouter(
            primary, topology.replica_urls, primary_candidates=topology.replica_urls
        )
    else:
        router = sr.ReplicaRouter(primary, topology.replica_urls)
        sa.event.listen(primary, "do_connect", name_the_app)
    try:
        with router.sessionmaker()() as session, sr.consistency("strong"):
            assert session.scalar(sa.text("SHOW application_name")) == "shaped-by-the-app"
    finally:
        router.dispose()
        primary.dispose()
