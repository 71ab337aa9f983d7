"""Replication positions, one module per backend.

A *position* names a point in the primary's commit history: a PostgreSQL WAL
LSN, a MariaDB GTID position (per domain), a MySQL GTID set. Each backend
parses, formats, compares and merges positions (pure code), and captures the
position of a commit on the primary, reads the position a replica has
applied, and waits for a replica to reach one (I/O on a given connection).
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from ._base import DBAPIRunner, PositionBackend, SQLRunner
from .mariadb import MariaDBPositions
from .mysql import MySQLPositions
from .postgresql import PostgresPositions

__all__ = [
    "DBAPIRunner",
    "MariaDBPositions",
    "MySQLPositions",
    "PositionBackend",
    "PostgresPositions",
    "SQLRunner",
    "backend_for",
]


def backend_for(engine: Engine) -> PositionBackend | None:
    """The position backend for ``engine``'s database, or None when it has none.

    MySQL and MariaDB share a dialect; which one a server is becomes known
    when the dialect first connects, so call this after a connection exists.
    """
    dialect = engine.dialect
    if dialect.name == "postgresql":
        return PostgresPositions()
    if dialect.name in ("mysql", "mariadb"):
        return MariaDBPositions() if getattr(dialect, "is_mariadb", False) else MySQLPositions()
    return None
