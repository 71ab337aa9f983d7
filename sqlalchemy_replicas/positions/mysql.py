"""MySQL 8 positions: GTID sets.

No MySQL 8 server can be installed where this project's CI runs (no Docker;
not in Debian or PyPI): this module is tested at unit level only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ._base import PositionBackend, SQLRunner
from ._sources import source_rows

__all__ = ["GtidSet", "MySQLPositions", "MySQLReplica"]

_UUID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_INTERVAL: Final = re.compile(r"(\d{1,20})(?:-(\d{1,20}))?", re.ASCII)
#: Transaction numbers are 1 to 2**63 - 1.
_MAX_TRANSACTION: Final = 2**63 - 1

GtidSet = Mapping[str, tuple[tuple[int, int], ...]]
"""Source uuid -> sorted, disjoint, non-adjacent closed intervals of transaction numbers."""


def _normalize(intervals: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return tuple(merged)


@dataclass(frozen=True, slots=True)
class MySQLReplica:
    """The ``server_uuid`` of each source a MySQL server replicates from, or
    why it will not say."""

    source_uuids: tuple[str, ...] = ()
    problem: str | None = None


class MySQLPositions(PositionBackend):
    """MySQL GTID sets such as ``3E11FA47-71CA-11E1-9E33-C80AA9429562:1-5:7``.

    This session's own GTID needs ``session_track_gtids``, which PyMySQL
    cannot read, so a commit's position is ``@@GLOBAL.gtid_executed``: a
    superset of it (correct; a read may wait for a little more).
    """

    kind = "mysql"

    def parse(self, text: str) -> dict[str, tuple[tuple[int, int], ...]]:
        found: dict[str, list[tuple[int, int]]] = {}
        for part in filter(None, (p.strip() for p in text.replace("\n", "").split(","))):
            uuid, *ranges = part.split(":")
            uuid = uuid.strip().lower()
            if not _UUID.fullmatch(uuid) or not ranges:
                raise ValueError(f"not a MySQL GTID set member: {part!r}")
            for text_range in ranges:
                match = _INTERVAL.fullmatch(text_range.strip())
                if match is None:
                    raise ValueError(f"not a GTID interval: {text_range!r}")
                start = int(match.group(1))
                end = int(match.group(2) or start)
                if start < 1 or end < start or end > _MAX_TRANSACTION:
                    raise ValueError(f"not a GTID interval: {text_range!r}")
                found.setdefault(uuid, []).append((start, end))
        return {uuid: _normalize(intervals) for uuid, intervals in found.items()}

    def format(self, position: GtidSet) -> str:
        return ",".join(
            uuid + "".join(f":{s}" if s == e else f":{s}-{e}" for s, e in intervals)
            for uuid, intervals in sorted(position.items())
        )

    def reached(self, applied: GtidSet, target: GtidSet) -> bool:
        for uuid, intervals in target.items():
            have = applied.get(uuid, ())
            for start, end in intervals:
                if not any(s <= start and end <= e for s, e in have):
                    return False
        return True

    def merge(self, a: GtidSet, b: GtidSet) -> dict[str, tuple[tuple[int, int], ...]]:
        merged = {uuid: list(intervals) for uuid, intervals in a.items()}
        for uuid, intervals in b.items():
            merged.setdefault(uuid, []).extend(intervals)
        return {uuid: _normalize(intervals) for uuid, intervals in merged.items()}

    behind_unit = "transactions"

    def behind(self, primary: GtidSet, applied: GtidSet) -> int:
        missing = 0
        for uuid, intervals in primary.items():
            have = applied.get(uuid, ())
            for start, end in intervals:
                covered = sum(
                    max(0, min(end, e) - max(start, s) + 1) for s, e in have
                )  # applied intervals are disjoint
                missing += end - start + 1 - covered
        return missing

    def capture(self, primary: SQLRunner) -> dict[str, tuple[tuple[int, int], ...]] | None:
        text = primary.exec_driver_sql("SELECT @@GLOBAL.gtid_executed").scalar()
        return self.parse(text) if text else None

    def current(self, primary: SQLRunner) -> dict[str, tuple[tuple[int, int], ...]] | None:
        return self.capture(primary)

    def lineage(self, primary: SQLRunner) -> str:
        return f"mysql:{primary.exec_driver_sql('SELECT @@server_uuid').scalar()}"

    def primary_identity(self, primary: SQLRunner, host: str | None) -> str:
        # MySQL names every server by a uuid its replicas report as Source_UUID.
        return str(primary.exec_driver_sql("SELECT @@server_uuid").scalar()).lower()

    def replica_identity(self, replica: SQLRunner) -> MySQLReplica:
        rows = source_rows(
            replica,
            "SHOW REPLICA STATUS",  # MySQL 8.0.22+
            "GRANT REPLICATION CLIENT ON *.* TO the application's user",
        )
        if isinstance(rows, str):
            return MySQLReplica(problem=rows)
        return MySQLReplica(tuple(str(row.get("Source_UUID") or "").lower() for row in rows if row))

    def not_a_replica(self, primary: str, replica: MySQLReplica) -> str | None:
        if replica.problem is not None:
            return replica.problem
        if not replica.source_uuids:
            return "it replicates from no server (no replication source is configured)"
        if primary in replica.source_uuids:
            return None
        return (
            f"it replicates from server uuid {', '.join(replica.source_uuids)}, not from the "
            f"primary ({primary})"
        )

    def applied(self, replica: SQLRunner) -> dict[str, tuple[tuple[int, int], ...]] | None:
        text = replica.exec_driver_sql("SELECT @@GLOBAL.gtid_executed").scalar()
        return self.parse(text) if text else None

    def wait(self, replica: SQLRunner, target: GtidSet, timeout: float) -> bool:
        result = replica.exec_driver_sql(
            "SELECT WAIT_FOR_EXECUTED_GTID_SET(%s, %s)", (self.format(target), timeout)
        ).scalar()
        return bool(result == 0)
