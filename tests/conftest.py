"""Shared fixtures: every database test runs against both real topologies."""

from __future__ import annotations

import pytest

from sqlalchemy_replicas.testing import Topology

BACKENDS = [
    pytest.param("postgresql", marks=pytest.mark.postgresql, id="postgresql"),
    pytest.param("mariadb", marks=pytest.mark.mariadb, id="mariadb"),
]


@pytest.fixture(params=BACKENDS)
def topology(request: pytest.FixtureRequest) -> Topology:
    """A freshly reset real topology: PostgreSQL streaming, then MariaDB GTID."""
    name = "postgres" if request.param == "postgresql" else "mariadb"
    fresh: Topology = request.getfixturevalue(f"fresh_{name}_topology")
    return fresh
