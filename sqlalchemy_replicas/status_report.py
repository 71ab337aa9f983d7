"""What ``sqlalchemy-replicas status`` prints, from a snapshot (pure, no I/O).

:mod:`sqlalchemy_replicas._status_command` asks the servers and the lag
monitor and builds a :class:`StatusSnapshot`; everything here turns one into
the table for people (:func:`render_table`), the JSON for machines
(:func:`as_json`, :func:`render_json`) and the exit status
(:func:`exit_code`). docs/operations.md documents all three.

Exit status, usable as a monitoring check (the Nagios plugin convention)::

    0  OK        the primary and every replica are healthy
    1  WARNING   a replica lags more than max_lag, but all are reachable
    2  CRITICAL  a replica is down, unreachable, not a replica of this
                 primary or not checked; or the primary is unreachable
                 or read-only
    3  UNKNOWN   a configuration error (bad or missing settings or options)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

from .monitor import ReplicaStatus

__all__ = [
    "EXIT_CONFIG_ERROR",
    "EXIT_DOWN",
    "EXIT_LAGGING",
    "EXIT_OK",
    "JSON_VERSION",
    "PrimaryState",
    "ReplicaState",
    "StatusSnapshot",
    "as_json",
    "config_error_json",
    "exit_code",
    "primary_problem",
    "render_json",
    "render_table",
    "replica_health",
    "scrub",
    "summary",
]

EXIT_OK: Final = 0
EXIT_LAGGING: Final = 1
EXIT_DOWN: Final = 2
EXIT_CONFIG_ERROR: Final = 3

#: The ``version`` of the JSON document; raised only when a key changes
#: meaning or goes away (new keys may be added without raising it).
JSON_VERSION: Final = 1

#: ``status`` in the JSON, by exit status.
STATUS_WORDS: Final = {0: "ok", 1: "lagging", 2: "down", 3: "config_error"}
#: The first word of the summary line, by exit status (Nagios' names).
SUMMARY_WORDS: Final = {0: "OK", 1: "WARNING", 2: "CRITICAL", 3: "UNKNOWN"}

Role = Literal["primary", "replica", "replica (writable)", "read-only", "unknown"]
Health = Literal["healthy", "lagging", "down", "unknown"]


@dataclass(frozen=True, slots=True)
class PrimaryState:
    """The primary as the command found it.

    :ivar url: its URL, without the password.
    :ivar reachable: whether it answered the command's own query in time.
    :ivar role: what the server says it is (None when unreachable):
        PostgreSQL ``pg_is_in_recovery()``; MariaDB/MySQL ``@@read_only``
        and whether it has a replication source.
    :ivar read_only: whether the server refuses writes (PostgreSQL: in
        recovery; MariaDB/MySQL: ``@@read_only``); None when unreachable.
    :ivar position: its current replication position (text), when known.
    :ivar error: why it is unreachable (scrubbed of passwords).
    """

    url: str
    reachable: bool
    role: Role | None = None
    read_only: bool | None = None
    position: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """One replica: the lag monitor's view and the server's own answer.

    :ivar status: the router's :class:`~sqlalchemy_replicas.ReplicaStatus`.
    :ivar reachable: whether it answered the command's own query in time.
    :ivar role: what the server says it is (see :class:`PrimaryState`).
    :ivar read_only: see :class:`PrimaryState`.
    :ivar error: why the command's own query failed (scrubbed).
    """

    status: ReplicaStatus
    reachable: bool
    role: Role | None = None
    read_only: bool | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    """Everything one round of ``sqlalchemy-replicas status`` found.

    :ivar primary: the primary.
    :ivar replicas: the replicas, in the router's order.
    :ivar max_lag: the router's ``max_lag`` (seconds).
    :ivar checked_at: when the round ended (timezone-aware, UTC).
    :ivar backend: ``"postgresql"``, ``"mariadb"``, ``"mysql"`` or None (unknown).
    """

    primary: PrimaryState
    replicas: tuple[ReplicaState, ...]
    max_lag: float
    checked_at: datetime
    backend: str | None = None


# -- judging ----------------------------------------------------------------------


def primary_problem(primary: PrimaryState) -> str | None:
    """Why the primary is not usable (unreachable, or refuses writes), or None."""
    if not primary.reachable:
        return f"unreachable: {primary.error}" if primary.error else "unreachable"
    if primary.read_only:
        return f"read-only: the server reports itself as {primary.role or 'read-only'}"
    return None


def replica_health(replica: ReplicaState, max_lag: float) -> Health:
    """``healthy``, ``lagging`` (reachable and a replica of this primary,
    but over ``max_lag`` or not yet back under it: no reads), ``down``
    (unreachable, not a replica of this primary, not replicating, or it says
    it is a primary) or ``unknown`` (the monitor has no measurement)."""
    status = replica.status
    if not replica.reachable or replica.role == "primary":
        return "down"
    if status.healthy is None:
        return "unknown"
    if status.healthy:
        if status.lag_seconds is not None and status.lag_seconds > max_lag:
            return "lagging"
        return "healthy"
    return "down" if status.lag_seconds is None else "lagging"


def replica_reason(replica: ReplicaState, max_lag: float) -> str | None:
    """Why a replica is not healthy (None when it is)."""
    health = replica_health(replica, max_lag)
    if health == "healthy":
        return None
    status = replica.status
    if not replica.reachable:
        # The monitor's reason says more when it saw the same thing.
        if status.reason and status.healthy is False and status.lag_seconds is None:
            return status.reason
        return f"unreachable: {replica.error}" if replica.error else "unreachable"
    if replica.role == "primary":
        return "the server says it is a primary, not a replica"
    if status.reason:
        return status.reason
    if health == "lagging" and status.lag_seconds is not None:
        return f"lag {status.lag_seconds:.1f}s > max_lag {max_lag:g}s"
    return "not checked yet" if health == "unknown" else None


def exit_code(snapshot: StatusSnapshot) -> int:
    """0 all healthy; 1 a replica lagging, all reachable; 2 a replica down or
    unknown, or the primary unusable."""
    if primary_problem(snapshot.primary) is not None:
        return EXIT_DOWN
    healths = {replica_health(r, snapshot.max_lag) for r in snapshot.replicas}
    if healths & {"down", "unknown"}:
        return EXIT_DOWN
    if "lagging" in healths:
        return EXIT_LAGGING
    return EXIT_OK


def summary(snapshot: StatusSnapshot) -> str:
    """One line: the Nagios word of the exit status, then what is wrong, e.g.
    ``WARNING: replica1 lagging (lag 2.3s > max_lag 1s)``."""
    code = exit_code(snapshot)
    problems = []
    primary = primary_problem(snapshot.primary)
    if primary is not None:
        problems.append(f"primary {primary}")
    for replica in snapshot.replicas:
        health = replica_health(replica, snapshot.max_lag)
        if health != "healthy":
            reason = replica_reason(replica, snapshot.max_lag)
            problems.append(f"{replica.status.name} {health}" + (f" ({reason})" if reason else ""))
    if not problems:
        count = len(snapshot.replicas)
        text = f"primary and {count} replica{'' if count == 1 else 's'} healthy"
    else:
        text = "; ".join(problems)
    # One line: Nagios shows the first line of the output.
    return " ".join(f"{SUMMARY_WORDS[code]}: {text}".split())


# -- JSON -------------------------------------------------------------------------


def as_json(snapshot: StatusSnapshot) -> dict[str, Any]:
    """The snapshot as the documented JSON document (a dict of JSON types)."""
    code = exit_code(snapshot)
    primary = snapshot.primary
    return {
        "version": JSON_VERSION,
        "status": STATUS_WORDS[code],
        "exit_code": code,
        "summary": summary(snapshot),
        "checked_at": snapshot.checked_at.isoformat(),
        "backend": snapshot.backend,
        "max_lag": snapshot.max_lag,
        "primary": {
            "name": "primary",
            "url": primary.url,
            "reachable": primary.reachable,
            "role": primary.role,
            "read_only": primary.read_only,
            "healthy": primary_problem(primary) is None,
            "position": primary.position,
            "reason": primary_problem(primary),
        },
        "replicas": [_replica_json(r, snapshot.max_lag) for r in snapshot.replicas],
    }


def _replica_json(replica: ReplicaState, max_lag: float) -> dict[str, Any]:
    status = replica.status
    health = replica_health(replica, max_lag)
    return {
        "name": status.name,
        "url": status.url,
        "reachable": replica.reachable,
        "role": replica.role,
        "read_only": replica.read_only,
        "health": health,
        "healthy": health == "healthy",
        "lag_seconds": status.lag_seconds,
        "lag_bytes": status.lag_bytes,
        "lag_transactions": status.lag_transactions,
        "position": status.position,
        "reason": replica_reason(replica, max_lag),
        "pool_full_skips": status.pool_full_skips,
        "zone": status.zone,
    }


def render_json(snapshot: StatusSnapshot) -> str:
    """:func:`as_json` as one line of JSON (JSON Lines under ``--watch``)."""
    return json.dumps(as_json(snapshot), sort_keys=False)


def config_error_json(message: str) -> str:
    """The JSON document of a configuration error (exit status 3)."""
    return json.dumps(
        {
            "version": JSON_VERSION,
            "status": STATUS_WORDS[EXIT_CONFIG_ERROR],
            "exit_code": EXIT_CONFIG_ERROR,
            "summary": f"{SUMMARY_WORDS[EXIT_CONFIG_ERROR]}: {message}",
            "error": message,
        }
    )


# -- the table --------------------------------------------------------------------

COLUMNS: Final = ("NAME", "ROLE", "HEALTH", "LAG", "BEHIND", "POSITION", "URL", "REASON")


def render_table(snapshot: StatusSnapshot) -> str:
    """The summary line, then one aligned row per server (primary first)."""
    primary = snapshot.primary
    problem = primary_problem(primary)
    rows: list[Sequence[str]] = [
        (
            "primary",
            primary.role or "-",
            "healthy" if problem is None else "down",
            "-",
            "-",
            primary.position or "-",
            primary.url,
            problem or "",
        )
    ]
    for replica in snapshot.replicas:
        status = replica.status
        rows.append(
            (
                status.name,
                replica.role or "-",
                replica_health(replica, snapshot.max_lag),
                "-" if status.lag_seconds is None else f"{status.lag_seconds:.1f}s",
                _behind(status),
                status.position or "-",
                status.url,
                replica_reason(replica, snapshot.max_lag) or "",
            )
        )
    lines = [summary(snapshot), *_aligned([COLUMNS, *rows])]
    return "\n".join(lines) + "\n"


def _behind(status: ReplicaStatus) -> str:
    if status.lag_bytes is not None:
        return f"{status.lag_bytes} B"
    if status.lag_transactions is not None:
        return f"{status.lag_transactions} tx"
    return "-"


def _aligned(rows: Iterable[Sequence[str]]) -> list[str]:
    rows = [[" ".join(cell.split()) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


# -- secrets ----------------------------------------------------------------------

#: Secrets shorter than this are not replaced wherever they occur.
MIN_SECRET_LENGTH: Final = 4

# scheme://user:password@host -> scheme://user:***@host
# (greedy up to the last "@" before the path: a password may hold an unquoted "@")
_URL_PASSWORD: Final = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*):[^\s/]*@")
# libpq/ODBC key=value DSNs and driver messages: password=secret, pwd='secret'
_KEY_PASSWORD: Final = re.compile(
    r"(?P<key>\b(?:password|passwd|pwd)\s*[=:]\s*)(?P<value>'[^']*'|\"[^\"]*\"|[^\s,;&)]+)",
    re.IGNORECASE,
)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without passwords: each of ``secrets`` (the configured URLs'
    passwords, longest first) of at least :data:`MIN_SECRET_LENGTH`
    characters, the password of any ``scheme://user:pw@`` URL, and
    ``password=...`` pairs become ``***``. (Shorter secrets are left to the
    patterns: replacing every ``app`` would mangle user and database names.)"""
    wanted = {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}
    for secret in sorted(wanted, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _URL_PASSWORD.sub(r"\g<head>:***@", text)
    return _KEY_PASSWORD.sub(r"\g<key>***", text)
