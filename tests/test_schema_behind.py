"""Reads on a replica that is behind on schema (a migration it has not applied yet)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.connections import is_schema_behind
from sqlalchemy_replicas.testing import StatementLog, Topology


@pytest.fixture
def router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    """A router over both replicas; replicas have applied everything so far."""
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    yield router
    router.dispose()


def migrate_while_replicas_pause(router: sr.ReplicaRouter, topology: Topology) -> None:
    """Pause both replicas, then add a table and a column on the primary."""
    with router.primary.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE widget (id INTEGER PRIMARY KEY)")
        conn.exec_driver_sql("INSERT INTO widget (id) VALUES (1)")
    topology.wait_for_catchup()
    for index in range(len(topology.replica_urls)):
        topology.pause_replay(index)
    with router.primary.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE widget ADD COLUMN label VARCHAR(20)")
        conn.exec_driver_sql("UPDATE widget SET label = 'new'")
        conn.exec_driver_sql("CREATE TABLE gadget (id INTEGER PRIMARY KEY)")


@pytest.mark.parametrize(
    "sql",
    ["SELECT label FROM widget", "SELECT count(*) FROM gadget"],
    ids=["new-column", "new-table"],
)
def test_read_of_a_new_column_or_table_reruns_on_the_primary(
    router: sr.ReplicaRouter,
    topology: Topology,
    caplog: pytest.LogCaptureFixture,
    sql: str,
) -> None:
    """An eventual read naming a column or table the replica has not got yet fails
    there, runs again on the primary (the caller gets the primary's rows), and a
    warning names the replica."""
    migrate_while_replicas_pause(router, topology)
    with (
        StatementLog(router) as log,
        caplog.at_level(logging.WARNING, logger="sqlalchemy_replicas.routing"),
        sr.consistency("eventual"),
        router.sessionmaker()() as session,
    ):
        value = session.scalar(sa.text(sql))
    assert value == ("new" if "label" in sql else 0)
    nodes = [s.node for s in log.statements if s.sql == sql]
    assert nodes[0].startswith("replica")
    assert nodes[1:] == ["primary"]
    assert f"replica {nodes[0]} lacks an object this read names" in caplog.text


def test_a_table_missing_on_the_primary_too_raises_the_primarys_error(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """A read of a table that exists nowhere fails on the replica, then on the primary,
    and the caller gets the primary's error (the statement it names ran there)."""
    with (
        StatementLog(router) as log,
        sr.consistency("eventual"),
        router.sessionmaker()() as session,
        pytest.raises(sa.exc.DBAPIError) as raised,
    ):
        session.execute(sa.text("SELECT * FROM no_such_table"))
    assert is_schema_behind(raised.value)
    nodes = [s.node for s in log.statements if "no_such_table" in s.sql]
    assert nodes[0].startswith("replica")
    assert nodes[-1] == "primary"
    assert len(nodes) == 2


def test_other_statement_errors_are_not_rerun(router: sr.ReplicaRouter, topology: Topology) -> None:
    """A read that fails on a replica for another reason (a scalar subquery that returns
    two rows) is not run again: the replica's error reaches the caller."""
    with (
        StatementLog(router) as log,
        sr.consistency("eventual"),
        router.sessionmaker()() as session,
        pytest.raises(sa.exc.DBAPIError) as raised,
    ):
        session.execute(sa.text("SELECT (SELECT 1 UNION ALL SELECT 2)"))
    assert not is_schema_behind(raised.value)
    assert [s.node for s in log.statements if "UNION ALL" in s.sql] != []
    assert all(s.node != "primary" for s in log.statements if "UNION ALL" in s.sql)
