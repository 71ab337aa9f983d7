"""Shared fixtures: every database test runs against both real topologies."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from sqlalchemy_replicas.testing import Topology, wait_until

#: ``provoke(topology, table, long_read)``: see :func:`provoke_recovery_conflict`.
ProvokeConflict = Callable[[Topology, str, Callable[[], None]], None]

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


@pytest.fixture
def provoke_recovery_conflict() -> ProvokeConflict:
    """A function that runs ``long_read`` (a read on replica1 that sleeps in
    ``pg_sleep(2)``) in a thread and makes replica1's replay conflict with it
    (``max_standby_streaming_delay`` 100 ms, then an ACCESS EXCLUSIVE lock on
    ``table`` taken on the primary), returning once the read has ended. The
    standby's setting is reset afterwards."""

    def provoke(topology: Topology, table: str, long_read: Callable[[], None]) -> None:
        standby = sa.create_engine(topology.replica_urls[0], isolation_level="AUTOCOMMIT")
        primary = sa.create_engine(topology.primary_url)

        def read_is_running() -> bool:
            with standby.connect() as conn:
                found = conn.scalar(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                        "AND query LIKE '%pg_sleep(2)%' AND pid <> pg_backend_pid()"
                    )
                )
            return bool(found == 1)

        try:
            with standby.connect() as conn:
                conn.execute(sa.text("ALTER SYSTEM SET max_standby_streaming_delay = '100ms'"))
                conn.execute(sa.text("SELECT pg_reload_conf()"))
            reader = threading.Thread(target=long_read)
            reader.start()
            wait_until(read_is_running, timeout=10, what="the long read on replica1")
            with primary.begin() as conn:  # replayed on the standby: it conflicts
                conn.execute(sa.text(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            reader.join(timeout=30)
        finally:
            with standby.connect() as conn:
                conn.execute(sa.text("ALTER SYSTEM RESET max_standby_streaming_delay"))
                conn.execute(sa.text("SELECT pg_reload_conf()"))
            standby.dispose()
            primary.dispose()

    return provoke
