"""The pytest plugin of sqlalchemy-replicas: fixtures for real replication topologies.

pytest loads this module automatically (entry point ``pytest11``, name
``sqlalchemy_replicas``) in every project where the package is installed, so
it is a guest in test runs that never asked for it. Until one of its fixtures
is used it must change nothing: it imports only pytest and the standard
library, adds no hooks, options, markers or header lines, and looks for no
server binaries. That is why it is a top-level module and not part of the
``sqlalchemy_replicas`` package: loading any module of the package runs the
package's ``__init__``, which imports SQLAlchemy and the router, and an
import that fails there would break the host's whole test run. (Hypothesis
moved its plugin to ``_hypothesis_pytestplugin`` for the same reason.)

Fixtures:

``postgres_topology`` / ``mariadb_topology``
    session-scoped: one :class:`~sqlalchemy_replicas.testing.PostgresTopology`
    / :class:`~sqlalchemy_replicas.testing.MariaDBTopology` with two
    replicas, started on first use and stopped (every process, the temp
    dir) when the test session ends.
``fresh_postgres_topology`` / ``fresh_mariadb_topology``
    function-scoped: the same topology after :meth:`~Topology.reset`:
    no fault injected, every server up, the application database empty and
    replicated.

A fixture whose driver (``psycopg``, ``pymysql``) or topology code cannot be
imported fails the test at setup, naming the extra to install; a missing
server binary fails it with :class:`~sqlalchemy_replicas.exc.ServerBinaryNotFound`.
Neither ever skips: a suite that silently stops testing replication proves
nothing. Set ``SQLALCHEMY_REPLICAS_PG_BINDIR`` to choose the PostgreSQL
binaries.

Does no I/O on import; the fixtures start and stop server processes.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from sqlalchemy_replicas.testing import MariaDBTopology, PostgresTopology

__all__ = [
    "fresh_mariadb_topology",
    "fresh_postgres_topology",
    "mariadb_topology",
    "postgres_topology",
]


def _require(fixture: str, *, driver: str, module: str, extra: str) -> None:
    """Import ``driver``, then ``module``, for ``fixture``, or fail the test.

    The driver is imported first and by itself: the topology code imports
    it only on its first connection, after starting servers, which would
    turn a missing driver into a server-start timeout instead of a message.

    :raises pytest.fail.Exception: naming what cannot be imported and the
        ``pip install`` command that provides it.
    """
    for name, what in ((driver, f"the {driver} driver"), (module, module)):
        try:
            importlib.import_module(name)
        except ImportError as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            continue
        # Failed outside the except block: the message says it all, and a
        # chained ImportError would only repeat it above a second header.
        pytest.fail(
            f"the {fixture} fixture cannot import {what} ({error}); "
            f"install it with: pip install 'sqlalchemy-replicas[{extra}]'",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def postgres_topology() -> Iterator[PostgresTopology]:
    """A PostgreSQL primary with two streaming replicas, for the whole test session."""
    module = "sqlalchemy_replicas.testing.postgres"
    _require("postgres_topology", driver="psycopg", module=module, extra="postgresql")
    from sqlalchemy_replicas.testing.postgres import PostgresTopology

    with PostgresTopology(replicas=2) as topology:
        yield topology


@pytest.fixture(scope="session")
def mariadb_topology() -> Iterator[MariaDBTopology]:
    """A MariaDB primary with two GTID replicas, for the whole test session."""
    module = "sqlalchemy_replicas.testing.mariadb"
    _require("mariadb_topology", driver="pymysql", module=module, extra="mysql")
    from sqlalchemy_replicas.testing.mariadb import MariaDBTopology

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
