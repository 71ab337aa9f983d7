"""PostgreSQL positions: WAL LSNs."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from ._base import PositionBackend, SQLRunner, WaitResult

__all__ = ["PostgresIdentity", "PostgresPositions", "has_wait_for", "normalize_insert_lsn"]

_LSN: Final = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
# Sizes of the headers PostgreSQL puts at the start of every WAL page and of
# every WAL segment's first page (64-bit builds, MAXALIGNed).
_SHORT_PAGE_HEADER: Final = 24
_LONG_PAGE_HEADER: Final = 40

# What the primary has committed, as a position its standbys can reach.
# With synchronous_commit on (or local, remote_write, remote_apply), every
# acknowledged commit is flushed before COMMIT returns: the flush LSN covers
# them all, and it is exactly what walsenders stream. The insert LSN would
# also cover WAL that nothing flushes soon (records written outside a commit
# that ends in a flush: by the time a standby could receive them, the router
# may have waited out its budget), so a position taken from it can be
# reached by no standby until the next commit: reads then wait, then go to
# the primary, and the lag monitor sees every standby fall behind. With
# synchronous_commit off, commits are acknowledged before their flush (the
# WAL writer flushes them within wal_writer_delay): only the insert LSN
# covers them (REPLICATION_FACTS: 198 of 200 stale reads with the flush
# LSN). The session's own setting decides, as it decides its commits'. The
# block and segment sizes let us undo the insert LSN's page-header quirk
# (normalize_insert_lsn; harmless on a flush LSN, which never points into a
# page header).
# NULL on a server in recovery, where the WAL functions raise: the query
# cannot fail (but for a cancel or a lost connection), which the commit that
# carries it relies on (see pipelining: an error there is the COMMIT's).
_CAPTURE: Final = (
    "SELECT CASE WHEN pg_is_in_recovery() THEN NULL "
    "WHEN current_setting('synchronous_commit') = 'off' "
    "THEN pg_current_wal_insert_lsn() ELSE pg_current_wal_flush_lsn() END::text, "
    "current_setting('wal_block_size')::int, pg_size_bytes(current_setting('wal_segment_size'))"
)
_APPLIED: Final = "SELECT pg_last_wal_replay_lsn()::text"
# The commit timestamp of the last transaction replayed is the primary's
# clock; clock_timestamp() the standby's (the same clock on one host; NTP
# skew otherwise). NULL until the standby has replayed a transaction.
_APPLIED_WITH_AGE: Final = (
    "SELECT pg_last_wal_replay_lsn()::text, "
    "extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8"
)
_IDENTITY: Final = "SELECT system_identifier::text, pg_is_in_recovery() FROM pg_control_system()"
# PostgreSQL 15-18 have no server-side wait for an LSN (19 adds WAIT FOR LSN):
# a recursive query polls the replay position on the server with growing
# sleeps (1 ms doubling to 16 ms) until it is reached or time is up. No round
# trip per poll, no client-side sleep.
_WAIT: Final = """
WITH RECURSIVE poll(n, reached) AS (
    SELECT 0, coalesce(pg_last_wal_replay_lsn() >= %(target)s::pg_lsn, false)
  UNION ALL
    SELECT n + 1, (
        SELECT coalesce(pg_last_wal_replay_lsn() >= %(target)s::pg_lsn, false)
        FROM (SELECT pg_sleep(least(0.001 * power(2, n), 0.016))) AS slept
    )
    FROM poll
    WHERE NOT reached AND clock_timestamp() < now() + %(timeout)s * interval '1 second'
)
SELECT bool_or(reached) FROM poll
"""
# The same, stopping at once when replay is paused (pg_wal_replay_pause(),
# or a recovery target): it would not apply the target before the timeout.
# A server out of recovery (promoted) applies nothing either; the CASE keeps
# the pause function, which raises there, from running on it.
_REPLAY_STATE: Final = """SELECT
        coalesce(pg_last_wal_replay_lsn() >= %(target)s::pg_lsn, false) AS reached,
        CASE WHEN pg_is_in_recovery()
            THEN pg_get_wal_replay_pause_state() <> 'not paused'
            ELSE true
        END AS stopped"""
_WAIT_APPLYING: Final = f"""
WITH RECURSIVE poll(n, reached, stopped) AS (
    SELECT 0, state.reached, state.stopped FROM ({_REPLAY_STATE}) AS state
  UNION ALL
    SELECT poll.n + 1, state.reached, state.stopped
    FROM poll, LATERAL (
        {_REPLAY_STATE}
        FROM (SELECT pg_sleep(least(0.001 * power(2, poll.n), 0.016))) AS slept
    ) AS state
    WHERE NOT poll.reached AND NOT poll.stopped
      AND clock_timestamp() < now() + %(timeout)s * interval '1 second'
)
SELECT bool_or(reached), bool_or(stopped) FROM poll
"""


# PostgreSQL 19's own wait (WAIT FOR LSN, a utility statement: no bind
# parameters, so the LSN, formatted by format_lsn, and the timeout are
# written in). NO_THROW: it answers 'success', 'timeout' or 'not in
# recovery' instead of raising. It does not notice paused replay, so the
# replay state is asked first (_REPLAY_STATE), in its own round trip.
_WAIT_FOR_RESULTS: Final[dict[str, WaitResult]] = {
    "success": "reached",
    "timeout": "timed_out",
    # Promoted while waiting (or no standby at all): it applies nothing more.
    "not in recovery": "stopped",
}


def has_wait_for(server: SQLRunner) -> bool:
    """Whether ``server`` (a SQLAlchemy Connection) has ``WAIT FOR LSN``
    (PostgreSQL 19 and later), from its dialect's server version (no I/O)."""
    version = getattr(getattr(server, "dialect", None), "server_version_info", None)
    return version is not None and tuple(version[:1]) >= (19,)


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> ``0x16B374D848``; raises ValueError for anything else."""
    match = _LSN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a PostgreSQL LSN: {text!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    """``0x16B374D848`` -> ``'16/B374D848'``."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def normalize_insert_lsn(lsn: int, block_size: int, segment_size: int) -> int:
    """Undo the page-header quirk of ``pg_current_wal_insert_lsn()``.

    When the last record ends exactly at a page boundary, the insert LSN
    points past the next page's header, which replay never reaches until
    more WAL arrives: waiting for it would hang. The boundary itself covers
    the record.
    """
    if lsn % segment_size == _LONG_PAGE_HEADER:
        return lsn - _LONG_PAGE_HEADER
    if lsn % block_size == _SHORT_PAGE_HEADER:
        return lsn - _SHORT_PAGE_HEADER
    return lsn


@dataclass(frozen=True, slots=True)
class PostgresIdentity:
    """What a PostgreSQL server says of itself.

    :ivar system_identifier: set by initdb and kept by every streaming
        standby of the cluster: a server with another one is another cluster.
    :ivar in_recovery: True for a standby.
    """

    system_identifier: str
    in_recovery: bool


class PostgresPositions(PositionBackend):
    """WAL LSNs, as integers."""

    kind = "pg"
    moves_only_with_commits = False

    def parse(self, text: str) -> int:
        return parse_lsn(text)

    def format(self, position: int) -> str:
        return format_lsn(position)

    def reached(self, applied: int, target: int) -> bool:
        return applied >= target

    def merge(self, a: int, b: int) -> int:
        return max(a, b)

    behind_unit = "bytes"

    def behind(self, primary: int, applied: int) -> int:
        return max(0, primary - applied)

    #: The query :meth:`capture` runs, for a driver that sends it in the
    #: commit's own round trip (see :mod:`sqlalchemy_replicas.pipelining`).
    capture_statement: str = _CAPTURE

    def captured(self, row: Sequence[Any]) -> int:
        """The position in ``row``, the answer to :attr:`capture_statement` (pure).

        :raises ValueError: when ``row`` holds no LSN.
        """
        if row[0] is None:
            raise ValueError("the server is in recovery (a standby): it has no commit position")
        return normalize_insert_lsn(parse_lsn(row[0]), int(row[1]), int(row[2]))

    def capture(self, primary: SQLRunner) -> int | None:
        return self.captured(primary.exec_driver_sql(self.capture_statement).one())

    def current(self, primary: SQLRunner) -> int | None:
        # The flush (or insert) LSN is global: the same query serves both.
        return self.capture(primary)

    def lineage(self, primary: SQLRunner) -> str:
        # Set by initdb, kept by streaming standbys (and by a promoted one,
        # whose LSNs continue the same sequence).
        sysid = primary.exec_driver_sql(
            "SELECT system_identifier::text FROM pg_control_system()"
        ).scalar()
        return f"pg:{sysid}"

    def primary_identity(self, primary: SQLRunner, host: str | None) -> PostgresIdentity:
        return self._identity(primary)

    def replica_identity(self, replica: SQLRunner) -> PostgresIdentity:
        return self._identity(replica)

    def not_a_replica(self, primary: PostgresIdentity, replica: PostgresIdentity) -> str | None:
        if replica.system_identifier != primary.system_identifier:
            return (
                f"its system identifier is {replica.system_identifier}, the primary's is "
                f"{primary.system_identifier}: it belongs to another cluster"
            )
        if not replica.in_recovery:
            return "it is not in recovery: a primary (promoted, or this primary), not a standby"
        return None

    @staticmethod
    def _identity(server: SQLRunner) -> PostgresIdentity:
        sysid, in_recovery = server.exec_driver_sql(_IDENTITY).one()
        return PostgresIdentity(str(sysid), bool(in_recovery))

    def applied(self, replica: SQLRunner) -> int | None:
        text = replica.exec_driver_sql(_APPLIED).scalar()
        return None if text is None else parse_lsn(text)

    def applied_with_age(self, replica: SQLRunner) -> tuple[int | None, float | None]:
        text, age = replica.exec_driver_sql(_APPLIED_WITH_AGE).one()
        return (None if text is None else parse_lsn(text)), (None if age is None else float(age))

    def wait(self, replica: SQLRunner, target: int, timeout: float) -> bool:
        if has_wait_for(replica):
            status = replica.exec_driver_sql(self.wait_for_statement(target, timeout)).scalar()
            return self.wait_for_result(status) == "reached"
        reached = replica.exec_driver_sql(
            _WAIT, {"target": format_lsn(target), "timeout": timeout}
        ).scalar()
        return bool(reached)

    def wait_applying(self, replica: SQLRunner, target: int, timeout: float) -> WaitResult:
        if has_wait_for(replica):
            # Already there, or not applying: one round trip, as before.
            # Else PostgreSQL 19's own wait, which wakes as soon as replay
            # passes the target (the polling query sleeps up to 16 ms).
            state = self.wait_applying_result(
                replica.exec_driver_sql(_REPLAY_STATE, {"target": format_lsn(target)}).one()
            )
            if state != "timed_out":
                return state
            status = replica.exec_driver_sql(self.wait_for_statement(target, timeout)).scalar()
            return self.wait_for_result(status)
        return self.wait_applying_result(
            replica.exec_driver_sql(*self.wait_applying_query(target, timeout)).one()
        )

    def wait_for_statement(self, target: int, timeout: float) -> str:
        """PostgreSQL 19's ``WAIT FOR LSN`` for ``target``, up to ``timeout``
        seconds, answering instead of raising (pure). The timeout is rounded up
        to whole milliseconds, and is at least 1: 0 would wait forever."""
        milliseconds = max(1, math.ceil(timeout * 1000))
        return f"WAIT FOR LSN '{format_lsn(target)}' WITH (TIMEOUT '{milliseconds}ms', NO_THROW)"

    def wait_for_result(self, status: str) -> WaitResult:
        """How a ``WAIT FOR LSN ... NO_THROW`` ended, from its status (pure).

        :raises ValueError: for a status PostgreSQL does not document.
        """
        try:
            return _WAIT_FOR_RESULTS[status]
        except KeyError:
            raise ValueError(f"unknown WAIT FOR status: {status!r}") from None

    def wait_applying_query(self, target: int, timeout: float) -> tuple[str, dict[str, Any]]:
        """The statement and parameters :meth:`wait_applying` runs (pure), for a
        driver that sends them ahead of a read (see :mod:`sqlalchemy_replicas.pipelining`)."""
        return _WAIT_APPLYING, {"target": format_lsn(target), "timeout": timeout}

    def wait_applying_result(self, row: Sequence[Any]) -> WaitResult:
        """How the wait ended, from ``row``, the answer to :meth:`wait_applying_query` (pure)."""
        reached, stopped = row
        if reached:
            return "reached"
        return "stopped" if stopped else "timed_out"
