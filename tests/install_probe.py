"""Sync routing on a real topology, run by ``test_install.py`` inside a fresh venv.

Usage: ``python -I install_probe.py BACKEND PRIMARY_URL REPLICA_URL...`` with
BACKEND ``postgresql`` or ``mariadb``. Through a :class:`RoutingSession`, it
writes a row that records the port of the server that wrote it, commits, then
reads the row together with the port of the server that answered and whether
that server is a replica. Prints one JSON object.

Not collected by pytest (no ``test_`` prefix); needs only the package and a driver.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import sqlalchemy as sa

import sqlalchemy_replicas as sr


def server_identity(backend: str) -> tuple[sa.ColumnElement[Any], sa.ColumnElement[Any]]:
    """SQL for what the answering server says of itself: its port, and whether it
    is a replica. On MariaDB from a table, not ``@@variables``: the router sends
    statements that read session variables to the primary."""
    if backend == "postgresql":
        return sa.func.inet_server_port(), sa.func.pg_is_in_recovery()
    variables = sa.table(
        "global_variables",
        sa.column("variable_name"),
        sa.column("variable_value"),
        schema="information_schema",
    )

    def variable(name: str) -> sa.ScalarSelect[Any]:
        value = variables.c.variable_value
        return sa.select(value).where(variables.c.variable_name == name).scalar_subquery()

    return variable("PORT"), variable("READ_ONLY") == "ON"


metadata = sa.MetaData()
item = sa.Table(
    "install_probe",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(20)),
    sa.Column("written_on", sa.Integer),
)


def main(backend: str, primary: str, replicas: list[str]) -> dict[str, object]:
    """Write on the primary, read after it; return where each ran."""
    port, is_replica = server_identity(backend)
    # A generous wait: the read must wait for a replica to apply the commit
    # rather than fall back to the primary on a busy machine.
    router = sr.ReplicaRouter(primary, replicas, wait_timeout=30.0)
    try:
        engine = router.primary
        assert isinstance(engine, sa.Engine)
        metadata.create_all(engine)
        with router.sessionmaker()() as session:
            session.execute(item.insert().values(id=1, name="written", written_on=port))
            session.commit()
            # Read-your-writes: this read may only run where the commit is applied.
            row = session.execute(
                sa.select(
                    item.c.name,
                    item.c.written_on,
                    port.label("read_on"),
                    is_replica.label("read_on_replica"),
                ).where(item.c.id == 1)
            ).one()
    finally:
        router.dispose()
    return {
        "sqlalchemy": sa.__version__,
        "name": row.name,
        "written_on": int(row.written_on),
        "read_on": int(row.read_on),
        "read_on_replica": bool(row.read_on_replica),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], sys.argv[3:])))
