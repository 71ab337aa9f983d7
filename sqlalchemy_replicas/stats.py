"""Routing counters: what :meth:`ReplicaRouter.stats` returns, and the codes it counts by.

Reasons are a small closed set of stable codes (:data:`REASON_CODES`), not
free text, so that an exporter can use them as labels without unbounded
cardinality; the human-readable text stays in logs and in ``explain()``.

Counting costs one uncontended lock and a dict update per routing decision.
Observers (:class:`RoutingObserver`, e.g. the OpenTelemetry integration) see
each decision, wait and rerun as it happens; with none registered they cost
one attribute check.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal, NamedTuple, Protocol, TypeAlias

from .consistency import ConsistencyLevel

__all__ = [
    "FALLBACK_CODES",
    "REASON_CODES",
    "RERUN_CAUSES",
    "WAIT_BUCKETS",
    "DecisionKey",
    "Reason",
    "ReasonCode",
    "RerunCause",
    "RouterStats",
    "RoutingObserver",
    "StatsRecorder",
    "TargetKind",
    "WaitOutcome",
    "WaitStats",
]

TargetKind: TypeAlias = Literal["primary", "replica"]

ReasonCode: TypeAlias = Literal[
    # On the primary, because of the statement or the transaction:
    "write",  # writes, locks, or is not provably read-only
    "declared_write",  # execution option read_only=False
    "pinned",  # the transaction already wrote or locked
    "savepoint",  # inside begin_nested()
    "strong",  # consistency "strong"
    "no_replicas",  # the router has no replica
    # On a replica:
    "read",  # a provable read, any replica that may serve (eventual)
    "declared_read",  # execution option read_only=True
    "nothing_to_wait_for",  # no commit in the causal scope
    "known_caught_up",  # known to have applied the scope's commits
    "caught_up_after_wait",  # applied them within wait_timeout
    "within_lag_bound",  # bounded: measured lag within the bound
    "monotonic_same_replica",  # monotonic: the replica the scope reads from
    # On the primary, a read that a replica could not serve (a fallback):
    "no_replica_available",  # every replica lagging, down or unverified
    "not_caught_up",  # no replica applied the scope's commits in time
    "pool_full",  # the qualifying replicas had no free connection
    "position_unknown",  # a commit (or a replica's applied position) is unknown
    "monotonic_replica_out",  # monotonic: the scope's replica is left out
    # On the primary, run again there after a replica could not serve it:
    "schema_behind",  # the replica lacks a table or column (migration not applied)
    "recovery_conflict",  # the replica cancelled the read (PostgreSQL hot standby)
    "refused_write",  # the read-only replica refused it as a write
]
"""Why a statement went where it went: a stable code (see docs/operations.md)."""

REASON_CODES: Final[tuple[ReasonCode, ...]] = (
    "write",
    "declared_write",
    "pinned",
    "savepoint",
    "strong",
    "no_replicas",
    "read",
    "declared_read",
    "nothing_to_wait_for",
    "known_caught_up",
    "caught_up_after_wait",
    "within_lag_bound",
    "monotonic_same_replica",
    "no_replica_available",
    "not_caught_up",
    "pool_full",
    "position_unknown",
    "monotonic_replica_out",
    "schema_behind",
    "recovery_conflict",
    "refused_write",
)

#: Reasons for which a read meant for a replica went to the primary.
FALLBACK_CODES: Final[frozenset[str]] = frozenset(
    {"no_replica_available", "not_caught_up", "pool_full", "position_unknown",
     "monotonic_replica_out", "schema_behind", "recovery_conflict", "refused_write"}
)  # fmt: skip

RerunCause: TypeAlias = Literal[
    "replica_failed",  # the replica went away during the read: marked down
    "pool_full",  # its last free connection went to another thread
    "schema_behind",  # the replica lacks a table or column (migration not applied)
    "recovery_conflict",  # the replica cancelled the read (PostgreSQL hot standby)
    "refused_write",  # the read-only replica refused it as a write
]
"""Why a statement that went to a replica ran again elsewhere."""

RERUN_CAUSES: Final[tuple[RerunCause, ...]] = (
    "replica_failed",
    "pool_full",
    "schema_behind",
    "recovery_conflict",
    "refused_write",
)

WaitOutcome: TypeAlias = Literal["reached", "timed_out", "failed"]

#: Upper bounds (seconds) of the causal wait histogram's buckets; the last
#: bucket, +inf, is implicit.
WAIT_BUCKETS: Final[tuple[float, ...]] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Reason(NamedTuple):
    """Why a statement went where it went: a stable ``code`` and the human
    ``text`` written to logs and ``explain()``."""

    code: ReasonCode
    text: str


class DecisionKey(NamedTuple):
    """What a routing decision is counted by."""

    target: TargetKind
    reason: ReasonCode
    level: ConsistencyLevel


@dataclass(frozen=True, slots=True)
class WaitStats:
    """Causal waits: a read waiting for a replica to apply the scope's commits.

    :ivar count: waits begun.
    :ivar reached: the replica applied the position in time (it served the read).
    :ivar timed_out: it did not within ``wait_timeout``.
    :ivar failed: the wait raised (the replica went away, or refused the query),
        or the replica refused it at once because it was not applying (replay
        paused, replication stopped).
    :ivar total_seconds: the time spent waiting, all outcomes.
    :ivar buckets: cumulative histogram of wait durations: ``(upper bound,
        waits that took at most that long)`` for each of :data:`WAIT_BUCKETS`
        then ``float("inf")`` (the count), as Prometheus's ``le`` buckets.
    """

    count: int = 0
    reached: int = 0
    timed_out: int = 0
    failed: int = 0
    total_seconds: float = 0.0
    buckets: tuple[tuple[float, int], ...] = tuple((b, 0) for b in (*WAIT_BUCKETS, float("inf")))


def _frozen(counts: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(counts))


@dataclass(frozen=True, slots=True)
class RouterStats:
    """A snapshot of one router's counters, from its creation (or the last
    :meth:`~sqlalchemy_replicas.ReplicaRouter.reset_stats`) to the snapshot.

    :ivar decisions: routing decisions by :class:`DecisionKey` (target kind,
        reason code, consistency level). One per statement a session
        routes and per flush; a statement run again elsewhere after a
        replica could not serve it adds one decision per rerun.
    :ivar waits: causal waits (:class:`WaitStats`).
    :ivar fallbacks: reads meant for a replica that the primary served, by
        reason code (those of :data:`FALLBACK_CODES`): the decisions to the
        primary with those reasons, summed over levels.
    :ivar reruns: statements that went to a replica and ran again elsewhere,
        by :data:`RerunCause`.
    :ivar replicas_down: per replica, the times it was marked down (a lost
        connection, or an unreachable lag check).
    :ivar replicas_up: per replica, the times it was readmitted after being down.
    :ivar replicas_over_max_lag: per replica, the times the lag monitor left
        it out of reads for lag (a check measured it over ``max_lag``).
    :ivar replicas_under_max_lag: per replica, the times it was readmitted
        after that (a check measured it back under ``max_lag`` by the
        readmission margin). Being down and lagging are counted apart: a
        replica left out for lag that goes down and comes back already
        caught up counts one of each pair.
    :ivar rejected_tokens: causal tokens ignored, by reason (``malformed``,
        ``bad_signature``, ``expired``, ...). Per process, shared by every
        router (tokens are checked before a router is known), and not reset
        by ``reset_stats()``.
    :ivar since: when counting began (``time.time()``).
    """

    decisions: Mapping[DecisionKey, int]
    waits: WaitStats
    fallbacks: Mapping[str, int]
    reruns: Mapping[str, int]
    replicas_down: Mapping[str, int]
    replicas_up: Mapping[str, int]
    rejected_tokens: Mapping[str, int]
    since: float
    replicas_over_max_lag: Mapping[str, int] = field(default_factory=lambda: _frozen({}))
    replicas_under_max_lag: Mapping[str, int] = field(default_factory=lambda: _frozen({}))

    def decisions_by_target(self) -> dict[TargetKind, int]:
        """Decisions per target kind: ``{"primary": n, "replica": m}``."""
        totals: dict[TargetKind, int] = {"primary": 0, "replica": 0}
        for key, count in self.decisions.items():
            totals[key.target] += count
        return totals

    def decisions_by_reason(self) -> dict[ReasonCode, int]:
        """Decisions per reason code (levels and targets summed)."""
        totals: dict[ReasonCode, int] = {}
        for key, count in self.decisions.items():
            totals[key.reason] = totals.get(key.reason, 0) + count
        return totals

    @property
    def total_decisions(self) -> int:
        """Every routing decision counted."""
        return sum(self.decisions.values())


@dataclass(slots=True)
class _Waits:
    count: int = 0
    reached: int = 0
    timed_out: int = 0
    failed: int = 0
    total_seconds: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS) + 1))


class RoutingObserver(Protocol):
    """Told of each routing event of one router, in the thread (and context)
    of the session that routes: the OpenTelemetry integration is one.

    Called outside the counters' lock, after the event is counted. An
    observer must be quick and must not raise.
    """

    def decision(self, to_primary: bool, reason: ReasonCode, level: ConsistencyLevel) -> None:
        """A statement (or a flush) was routed, to the primary or a replica."""

    def wait(self, outcome: WaitOutcome, seconds: float) -> None:
        """A causal wait ended after ``seconds``."""

    def rerun(self, cause: RerunCause) -> None:
        """A statement that went to a replica runs again elsewhere."""


class StatsRecorder:
    """A router's live counters. Thread- and asyncio-safe: every update holds
    one small lock (uncontended, it costs well under a microsecond)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Replaced whole (never mutated), so the hot path reads it unlocked.
        self._observers: tuple[RoutingObserver, ...] = ()
        self._reset()

    def add_observer(self, observer: RoutingObserver) -> None:
        """Tell ``observer`` of every decision, wait and rerun from now on
        (once, however often it is added)."""
        with self._lock:
            if observer not in self._observers:
                self._observers = (*self._observers, observer)

    def remove_observer(self, observer: RoutingObserver) -> None:
        """Stop telling ``observer`` (no error if it was not added)."""
        with self._lock:
            self._observers = tuple(o for o in self._observers if o is not observer)

    def _reset(self) -> None:
        # Plain tuples (to_primary, reason, level) on the hot path: a
        # NamedTuple costs a Python-level __new__ per statement.
        self._decisions: dict[tuple[bool, ReasonCode, ConsistencyLevel], int] = {}
        self._fallbacks: dict[str, int] = {}
        self._reruns: dict[str, int] = {}
        self._down: dict[str, int] = {}
        self._up: dict[str, int] = {}
        self._over_lag: dict[str, int] = {}
        self._under_lag: dict[str, int] = {}
        self._waits = _Waits()
        self._since = time.time()

    def reset(self) -> None:
        """Start counting from zero (the process-wide rejected tokens excepted)."""
        with self._lock:
            self._reset()

    def decision(self, to_primary: bool, reason: ReasonCode, level: ConsistencyLevel) -> None:
        """Count one routing decision (and a fallback, for a fallback reason)."""
        key = (to_primary, reason, level)
        with self._lock:
            decisions = self._decisions
            decisions[key] = decisions.get(key, 0) + 1
            if to_primary and reason in FALLBACK_CODES:
                self._fallbacks[reason] = self._fallbacks.get(reason, 0) + 1
        if self._observers:
            for observer in self._observers:
                observer.decision(to_primary, reason, level)

    def rerun(self, cause: RerunCause) -> None:
        """Count a statement run again elsewhere (its new target is counted
        as a decision)."""
        with self._lock:
            self._reruns[cause] = self._reruns.get(cause, 0) + 1
        if self._observers:
            for observer in self._observers:
                observer.rerun(cause)

    def wait(self, outcome: WaitOutcome, seconds: float) -> None:
        """Count one causal wait that took ``seconds``."""
        index = bisect.bisect_left(WAIT_BUCKETS, seconds)
        with self._lock:
            waits = self._waits
            waits.count += 1
            if outcome == "reached":
                waits.reached += 1
            elif outcome == "timed_out":
                waits.timed_out += 1
            else:
                waits.failed += 1
            waits.total_seconds += seconds
            waits.buckets[index] += 1
        if self._observers:
            for observer in self._observers:
                observer.wait(outcome, seconds)

    def replica_down(self, name: str) -> None:
        """Count replica ``name`` marked down."""
        with self._lock:
            self._down[name] = self._down.get(name, 0) + 1

    def replica_up(self, name: str) -> None:
        """Count replica ``name`` readmitted after being down."""
        with self._lock:
            self._up[name] = self._up.get(name, 0) + 1

    def replica_over_max_lag(self, name: str) -> None:
        """Count replica ``name`` left out of reads for lag."""
        with self._lock:
            self._over_lag[name] = self._over_lag.get(name, 0) + 1

    def replica_under_max_lag(self, name: str) -> None:
        """Count replica ``name`` readmitted after being left out for lag."""
        with self._lock:
            self._under_lag[name] = self._under_lag.get(name, 0) + 1

    def snapshot(self, rejected_tokens: Mapping[str, int]) -> RouterStats:
        """The counters now, as an immutable :class:`RouterStats`."""
        with self._lock:
            waits = self._waits
            cumulative, running = [], 0
            for bound, count in zip((*WAIT_BUCKETS, float("inf")), waits.buckets, strict=True):
                running += count
                cumulative.append((bound, running))
            return RouterStats(
                decisions=MappingProxyType(
                    {
                        DecisionKey("primary" if primary else "replica", reason, level): count
                        for (primary, reason, level), count in self._decisions.items()
                    }
                ),
                waits=WaitStats(
                    waits.count,
                    waits.reached,
                    waits.timed_out,
                    waits.failed,
                    waits.total_seconds,
                    tuple(cumulative),
                ),
                fallbacks=_frozen(self._fallbacks),
                reruns=_frozen(self._reruns),
                replicas_down=_frozen(self._down),
                replicas_up=_frozen(self._up),
                rejected_tokens=_frozen(rejected_tokens),
                since=self._since,
                replicas_over_max_lag=_frozen(self._over_lag),
                replicas_under_max_lag=_frozen(self._under_lag),
            )
