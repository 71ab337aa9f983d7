"""MariaDB positions: GTID positions, one sequence number per replication domain."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ._base import PositionBackend, SQLRunner, WaitResult
from ._sources import addresses, source_rows

__all__ = [
    "WAIT_FAILED_ERROR",
    "WAIT_FAILED_PREFIX",
    "GtidPosition",
    "MariaDBPositions",
    "MariaDBPrimary",
    "MariaDBReplica",
    "MariaDBSource",
]

_GTID: Final = re.compile(r"(\d{1,10})-(\d{1,10})-(\d{1,20})", re.ASCII)
#: Domain and server ids are 32-bit, sequence numbers 64-bit (unsigned).
_MAX_ID: Final = 2**32 - 1
_MAX_SEQ: Final = 2**64 - 1

GtidPosition = Mapping[int, int]
"""Domain id -> highest sequence number applied in that domain."""


@dataclass(frozen=True, slots=True)
class MariaDBPrimary:
    """What identifies a MariaDB primary (MariaDB has no cluster id).

    :ivar server_id: its ``@@server_id``.
    :ivar port: the port it listens on (``@@port``).
    :ivar names: the host names and addresses it is known by: the primary
        URL's host and its addresses, ``@@hostname`` and ``@@report_host``.
    """

    server_id: int
    port: int
    names: frozenset[str]


@dataclass(frozen=True, slots=True)
class MariaDBSource:
    """One replication connection of a replica, as it reports it.

    :ivar host: ``Master_Host``; ``names`` adds its addresses.
    :ivar port: ``Master_Port``.
    :ivar server_id: ``Master_Server_Id`` (0 until it first connected).
    """

    host: str
    port: int
    server_id: int
    names: frozenset[str]


@dataclass(frozen=True, slots=True)
class MariaDBReplica:
    """What a MariaDB server says it replicates from, or why it will not say."""

    sources: tuple[MariaDBSource, ...] = ()
    problem: str | None = None


# MASTER_GTID_WAIT, unless no replication connection has both its threads
# running (STOP SLAVE [SQL_THREAD]): then -2 at once, once the target is not
# applied. Slaves_running counts the connections whose IO and SQL threads
# both run; a multi-source replica with one of them stopped still waits, as
# before. A short wait comes first (CASE stops at the first true branch): a
# paused replica refuses after FIRST_WAIT. Naming information_schema costs
# 65 to 110 us of server time per statement (MariaDB 10.11, against the first
# wait alone), even when its branch does not run: the table is opened with
# the statement.
FIRST_WAIT: Final = 0.002
_WAIT_APPLYING: Final = (
    f"SELECT CASE WHEN MASTER_GTID_WAIT(%s, LEAST(%s, {FIRST_WAIT})) = 0 THEN 0 "
    "WHEN (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS "
    "WHERE VARIABLE_NAME = 'SLAVES_RUNNING') = '0' THEN -2 "
    f"ELSE MASTER_GTID_WAIT(%s, GREATEST(%s - {FIRST_WAIT}, 0)) END"
)

# The same, as a statement that fails unless the target was reached (an
# anonymous compound statement, MariaDB 10.1.1+), sent ahead of a read (see
# sqlalchemy_replicas.pipelining): in one multi-statement query, it stops
# the read from running on a replica that is behind. The message says how
# it ended. Each statement of a compound statement opens its tables when it
# runs, so when the target is applied within FIRST_WAIT, the common case,
# information_schema is not opened: 25 to 45 us more than the first wait
# alone. <=> (NULL-safe; in parentheses, whatever the sql_mode makes of NOT):
# a wait that answers NULL is not taken for reached.
_WAIT_APPLYING_OR_FAIL: Final = (
    f"BEGIN NOT ATOMIC IF NOT (MASTER_GTID_WAIT(%s, LEAST(%s, {FIRST_WAIT})) <=> 0) THEN "
    "IF (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS "
    "WHERE VARIABLE_NAME = 'SLAVES_RUNNING') = '0' THEN "
    "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'sqlalchemy_replicas: stopped'; "
    f"ELSEIF NOT (MASTER_GTID_WAIT(%s, GREATEST(%s - {FIRST_WAIT}, 0)) <=> 0) THEN "
    "SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'sqlalchemy_replicas: timed_out'; "
    "END IF; END IF; END"
)
#: The error a failed :meth:`MariaDBPositions.wait_applying_or_fail` raises:
#: ER_SIGNAL_EXCEPTION, with this prefix and then ``stopped`` or ``timed_out``.
WAIT_FAILED_ERROR: Final = 1644
WAIT_FAILED_PREFIX: Final = "sqlalchemy_replicas: "


class MariaDBPositions(PositionBackend):
    """MariaDB GTID positions such as ``0-1-10,1-2-5``.

    Compared per domain by sequence number (server ids do not order GTIDs,
    as in ``MASTER_GTID_WAIT``). A domain the replica has never applied is
    not reached.
    """

    kind = "mariadb"

    def parse(self, text: str) -> dict[int, int]:
        position: dict[int, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            match = _GTID.fullmatch(part)
            if match is None:
                raise ValueError(f"not a MariaDB GTID: {part!r}")
            domain, server, seq = (int(group) for group in match.groups())
            if domain > _MAX_ID or server > _MAX_ID or seq > _MAX_SEQ:
                raise ValueError(f"a MariaDB GTID out of range: {part!r}")
            position[domain] = max(seq, position.get(domain, 0))
        return position

    def format(self, position: GtidPosition) -> str:
        # The server id does not matter to comparisons or MASTER_GTID_WAIT;
        # 0 keeps the text short and valid.
        return ",".join(f"{domain}-0-{seq}" for domain, seq in sorted(position.items()))

    def reached(self, applied: GtidPosition, target: GtidPosition) -> bool:
        return all(applied.get(domain, -1) >= seq for domain, seq in target.items())

    def merge(self, a: GtidPosition, b: GtidPosition) -> dict[int, int]:
        merged = dict(a)
        for domain, seq in b.items():
            merged[domain] = max(seq, merged.get(domain, 0))
        return merged

    behind_unit = "transactions"

    def behind(self, primary: GtidPosition, applied: GtidPosition) -> int:
        return sum(max(0, seq - applied.get(domain, 0)) for domain, seq in primary.items())

    #: The query :meth:`capture` runs, for a client that sends it with the
    #: ``COMMIT`` (see :mod:`sqlalchemy_replicas.pipelining`). @@last_gtid is
    #: this connection's own last commit: read it on the connection that
    #: committed, before it goes back to the pool. Empty when the connection
    #: never wrote: then the whole binlog position.
    capture_statement: str = "SELECT @@last_gtid, @@gtid_binlog_pos"

    def captured(self, row: Sequence[Any]) -> dict[int, int] | None:
        """The position in ``row``, the answer to :attr:`capture_statement` (pure).

        :raises ValueError: when ``row`` holds no GTID position.
        """
        text = row[0] or row[1]
        return self.parse(text) if text else None

    def capture(self, primary: SQLRunner) -> dict[int, int] | None:
        return self.captured(primary.exec_driver_sql(self.capture_statement).one())

    def current(self, primary: SQLRunner) -> dict[int, int] | None:
        text = primary.exec_driver_sql("SELECT @@gtid_binlog_pos").scalar()
        return self.parse(text) if text else None

    def lineage(self, primary: SQLRunner) -> str:
        # MariaDB has no cluster id: the primary's address and server id stand
        # for it (a failover changes it, and then old tokens are not trusted).
        row = primary.exec_driver_sql("SELECT @@hostname, @@port, @@server_id").one()
        return f"mariadb:{row[0]}:{row[1]}:{row[2]}"

    def primary_identity(self, primary: SQLRunner, host: str | None) -> MariaDBPrimary:
        server_id, port, hostname, report_host = primary.exec_driver_sql(
            "SELECT @@server_id, @@port, @@hostname, @@report_host"
        ).one()
        names = addresses(host) | {name for name in (hostname, report_host) if name}
        return MariaDBPrimary(int(server_id), int(port), frozenset(names))

    def replica_identity(self, replica: SQLRunner) -> MariaDBReplica:
        rows = source_rows(
            replica,
            "SHOW ALL SLAVES STATUS",
            "GRANT SLAVE MONITOR ON *.* TO the application's user (MariaDB 10.5+; "
            "REPLICATION CLIENT before)",
        )
        if isinstance(rows, str):
            return MariaDBReplica(problem=rows)
        return MariaDBReplica(
            tuple(
                MariaDBSource(
                    str(row["Master_Host"]),
                    int(row["Master_Port"]),
                    int(row.get("Master_Server_Id") or 0),
                    addresses(str(row["Master_Host"])),
                )
                for row in rows
            )
        )

    def not_a_replica(self, primary: MariaDBPrimary, replica: MariaDBReplica) -> str | None:
        if replica.problem is not None:
            return replica.problem
        if not replica.sources:
            return "it replicates from no server (no replication source is configured)"
        for source in replica.sources:
            # The address names the primary; the server id, once the source
            # has connected (0 before: a replica restarted while the primary
            # is down), tells it from another server later on that address.
            if (
                source.port == primary.port
                and source.names & primary.names
                and source.server_id in (0, primary.server_id)
            ):
                return None
        seen = ", ".join(
            f"{s.host}:{s.port} (server id {s.server_id or 'unknown: not connected yet'})"
            for s in replica.sources
        )
        return (
            f"it replicates from {seen}, not from the primary (server id "
            f"{primary.server_id}, port {primary.port}, known as "
            f"{', '.join(sorted(primary.names))})"
        )

    def applied(self, replica: SQLRunner) -> dict[int, int] | None:
        text = replica.exec_driver_sql("SELECT @@gtid_slave_pos").scalar()
        return self.parse(text) if text else None

    def wait(self, replica: SQLRunner, target: GtidPosition, timeout: float) -> bool:
        result = replica.exec_driver_sql(
            "SELECT MASTER_GTID_WAIT(%s, %s)", (self.format(target), timeout)
        ).scalar()
        return bool(result == 0)

    def wait_applying_or_fail(
        self, target: GtidPosition, timeout: float
    ) -> tuple[str, tuple[str, float, str, float]]:
        """A statement and its parameters (pure) that do :meth:`wait_applying`
        and fail (error :data:`WAIT_FAILED_ERROR`) unless ``target`` was
        reached: sent ahead of a read in one query, the read runs only on a
        replica that has applied it (see :mod:`sqlalchemy_replicas.pipelining`)."""
        text = self.format(target)
        return _WAIT_APPLYING_OR_FAIL, (text, timeout, text, timeout)

    def wait_applying(self, replica: SQLRunner, target: GtidPosition, timeout: float) -> WaitResult:
        text = self.format(target)
        result = replica.exec_driver_sql(_WAIT_APPLYING, (text, timeout, text, timeout)).scalar()
        if result == 0:
            return "reached"
        return "stopped" if result == -2 else "timed_out"
