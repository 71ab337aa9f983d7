"""pytest fixtures for real replication topologies.

Loaded automatically (entry point ``pytest11``) when sqlalchemy-replicas is
installed. Fixtures:

``postgres_topology`` / ``mariadb_topology``
    session-scoped: one :class:`~sqlalchemy_replicas.testing.PostgresTopology`
    / :class:`~sqlalchemy_replicas.testing.MariaDBTopology` with two
    replicas, started on first use and stopped (every process, the temp
    dir) when the test session ends.
``fresh_postgres_topology`` / ``fresh_mariadb_topology``
    function-scoped: the same topology after :meth:`~Topology.reset`:
    no fault injected, every server up, the application database empty and
    replicated.

A missing server binary fails the fixture with
:class:`~sqlalchemy_replicas.exc.ServerBinaryNotFound`, it never skips: a
suite that silently stops testing replication proves nothing. Set
``SQLALCHEMY_REPLICAS_PG_BINDIR`` to choose the PostgreSQL binaries.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..exc import ServerBinaryNotFound
from ._binaries import mariadb_binaries, postgres_bindir
from .mariadb import MariaDBTopology
from .postgres import PostgresTopology

__all__ = [
    "fresh_mariadb_topology",
    "fresh_postgres_topology",
    "mariadb_topology",
    "postgres_topology",
]


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Name the server binaries the topologies will use, or why there are none."""
    lines = []
    for label, find in (("PostgreSQL", postgres_bindir), ("MariaDB", mariadb_binaries)):
        try:
            found = find()
        except ServerBinaryNotFound as exc:
            lines.append(f"sqlalchemy-replicas {label}: MISSING ({exc})")
        else:
            where = found if isinstance(found, Path) else found[0]
            lines.append(f"sqlalchemy-replicas {label} binaries: {where}")
    return lines


@pytest.fixture(scope="session")
def postgres_topology() -> Iterator[PostgresTopology]:
    """A PostgreSQL primary with two streaming replicas, for the whole test session."""
    with PostgresTopology(replicas=2) as topology:
        yield topology


@pytest.fixture(scope="session")
def mariadb_topology() -> Iterator[MariaDBTopology]:
    """A MariaDB primary with two GTID replicas, for the whole test session."""
    with MariaDBTopology(replicas=2) as topology:
        yield topology


@pytest.fixture
def fresh_postgres_topology(postgres_topology: PostgresTopology) -> PostgresTopology:
    """The session's PostgreSQL topology, reset: no faults, all up, no data."""
    postgres_topology.reset()
    return postgres_topology


@pytest.fixture
def fresh_mariadb_topology(mariadb_topology: MariaDBTopology) -> MariaDBTopology:
    """The session's MariaDB topology, reset: no faults, all up, no data."""
    mariadb_topology.reset()
    return mariadb_topology
