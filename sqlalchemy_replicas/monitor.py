"""Replica lag monitor: how far behind each replica is, measured by position.

Every ``lag_check_interval`` a background thread samples the primary's
position and each replica's applied position. A replica's lag is an upper
bound on its staleness (now minus the commit time of the first transaction
it has not applied; 0 when it has everything the primary had, so an idle
primary gives no lag), tight to about 0.1 s whatever the interval. It is the
least of these bounds (:class:`LagEstimator`):

- positions: the time since the newest primary sample the replica has
  applied (each sample is timed *before* its query, so every commit it does
  not cover came later). Its error is the gap between samples, so besides
  the checks' own samples there are: (b) the router's own commits (their
  position and the time just before it was read, free, thinned to one per
  20 ms); (a) while a check found a replica behind in the last
  :data:`DENSE_HOLD` seconds, one primary-only sample every
  :data:`DENSE_SAMPLE_INTERVAL` (at most 20 cheap queries a second on the
  primary; none for an idle or caught-up cluster). Works on every backend,
  also for commits made by other processes and for sparse writes.
- PostgreSQL: the age of the last commit the standby replayed
  (``pg_last_xact_replay_timestamp()``, in the check's own query): the first
  commit it lacks is younger. Tight under steady writes from the first check,
  loose for sparse ones (then the positions bound wins); relies on the
  standby's and primary's clocks agreeing. MariaDB has no sub-second
  equivalent (``Seconds_Behind_Master`` is whole seconds).

What stays coarse (to one check interval): the first commit after an idle
period, made by another process, until the replica has applied it (MariaDB;
on PostgreSQL too until the replica replays any commit), because no sample
was taken just before it. A replica lagging more than
``max_lag`` (or unreachable) is left out of reads until it is back under
``max_lag`` by a margin (hysteresis). A replica that has applied no
sample kept is left out only after a second look, taken at once: its bound
is then only the age of its last replayed commit, loose after a quiet spell.

A replica serves no read before the monitor has checked that it replicates
from this primary (its identity: PostgreSQL's system identifier and recovery
state; MariaDB/MySQL's replication source), and none while a check says it
does not: a URL that points at another cluster's server never serves its
data. The identity is read on each new monitor connection and compared at
every check.

A replica that fails a check, or that a session saw disconnect
(:meth:`LagMonitor.mark_down`), is down: it gets no reads and is checked
again only as its :class:`~sqlalchemy_replicas.breaker.Breaker` allows (1 s,
then doubling up to 30 s); the first check that gets through readmits it.

Each check is one query, run in a thread of its own with a timeout, so a
server that never answers is counted unreachable without stalling the
checks of the others. The monitor uses engines of its own (so its queries
never appear in the application's pools or events), AUTOCOMMIT, with the
sync driver even for async routers. Their connections are opened through
the routed engines' own connect path (``connect_args``, ``creator``,
``do_connect`` listeners such as one setting an IAM token), so the monitor
connects exactly as the sessions do.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import queue
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar

from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError

from .breaker import Breaker
from .connections import probe_engine
from .exc import describe_error
from .urls import sync_url

if TYPE_CHECKING:
    from .positions import PositionBackend
    from .stats import StatsRecorder
    from .targets import RoutedEngine

__all__ = ["LagEstimator", "LagMonitor", "ReplicaStatus"]

logger = logging.getLogger("sqlalchemy_replicas.monitor")
_R = TypeVar("_R")

#: Seconds between the extra samples of the primary's position taken while
#: a replica is behind (:meth:`LagMonitor._between_checks`).
DENSE_SAMPLE_INTERVAL: Final = 0.05
#: ...until this many seconds after the last check that found one behind (a
#: replica that applies in bursts, as MariaDB's MASTER_DELAY does, is caught
#: up at some checks and behind again at the next).
DENSE_HOLD: Final = 10.0
#: A left-out replica is readmitted once its lag is below max_lag times this.
READMIT_FRACTION: Final = 0.8
#: Where a monitor connection keeps the identity its server gave (read once
#: per connection: a new connection may reach another server).
_IDENTITY_KEY: Final = "sqlalchemy_replicas.identity"


class Watched(Protocol):
    """What the monitor needs of the servers it watches: a router's shared
    state (:class:`~sqlalchemy_replicas.cluster.Cluster`), named here so that
    this module does not import it."""

    name: str
    replica_targets: tuple[RoutedEngine, ...]
    primary_target: RoutedEngine
    max_lag: float
    replica_zones: Mapping[str, str]

    @property
    def primary_url(self) -> str:
        """Where primary connections go now, without the password."""

    @property
    def positions(self) -> PositionBackend | None:
        """The replication-position backend (None until known)."""

    @property
    def positions_pending(self) -> bool:
        """Whether MySQL vs MariaDB is still unknown."""

    @property
    def stats_recorder(self) -> StatsRecorder:
        """Where replicas going down, coming back and lag exclusions are counted."""

    def learn_positions(self, engine: Engine) -> PositionBackend | None:
        """Tell the backend by ``engine``, a connected sync engine on the primary."""

    def install_discovery(self, engine: Engine) -> None:
        """Make ``engine`` connect to wherever the primary is now."""

    def note_applied(self, replica: str, position: Any) -> None:
        """Record that ``replica`` has applied ``position``."""

    def note_applied_within(self, replica: str, seconds: float) -> None:
        """``replica`` applied a commit at most ``seconds`` after the primary made it."""

    def pool_full_skips(self, replica: str) -> int:
        """Reads sent elsewhere because ``replica``'s pool was full."""


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica as the monitor last saw it.

    :ivar name: the replica's name.
    :ivar url: its URL, without the password.
    :ivar healthy: True when it gets reads (reachable, within ``max_lag``);
        None before the first check.
    :ivar lag_seconds: how stale the replica was at its last check, in
        seconds: an upper bound on the age of the oldest commit it had not
        applied (0 when it had everything the primary had), tight to about
        0.1 s whatever ``lag_check_interval`` (see the lag monitor section of
        docs/consistency.md); None when unknown. ``bounded(max_lag)`` reads
        and the ``max_lag`` exclusion use this figure.
    :ivar position: the position it had applied at the last check (text).
    :ivar reason: why it gets no reads, when it gets none.
    :ivar lag_bytes: PostgreSQL: bytes of WAL it had still to replay at the
        last check (None elsewhere, or when unknown).
    :ivar lag_transactions: MariaDB/MySQL: transactions it had still to
        apply at the last check (None elsewhere, or when unknown).
    :ivar pool_full_skips: reads that went elsewhere (the next replica that
        qualified, or the primary) because its connection pool had no free
        connection, since the router started.
    :ivar zone: its zone (the router's ``replica_zones``), or None.
    """

    name: str
    url: str
    healthy: bool | None
    lag_seconds: float | None
    position: str | None
    reason: str | None
    lag_bytes: int | None = None
    lag_transactions: int | None = None
    pool_full_skips: int = 0
    #: ``time.monotonic()`` of the check that measured ``lag_seconds`` (None
    #: before one did).
    lag_measured_at: float | None = None
    zone: str | None = None


class LagEstimator:
    """Lag from a timeline of the primary's positions (pure, no I/O; thread-safe).

    A sample ``(when, position)`` says: every commit not covered by
    ``position`` was made after ``when`` (so ``when`` must be taken *before*
    the position is read). A replica that has applied ``position`` is
    therefore at most ``now - when`` seconds stale: the lag is that bound
    for the newest sample it has applied, tightened by the age of the last
    commit it replayed when the backend tells it (the first commit it has
    not applied came after that one), and 0 when it has applied the newest
    sample (everything the primary had). Any subset of valid samples gives
    a valid (looser) bound, so samples may be dropped freely.

    :param reached: the backend's ``reached(applied, target)``.
    :param horizon: seconds of primary samples to keep.
    :param spacing: commit samples (:meth:`record_commit`) closer than this
        to the newest sample are dropped (the cost of a busy primary stays
        bounded: at most ``horizon / spacing`` of them).
    :param moves_only_with_commits: the backend's
        :attr:`~sqlalchemy_replicas.positions.PositionBackend.moves_only_with_commits`:
        whether two primary samples that differ prove a commit between them
        (see :meth:`applied_within`).
    """

    def __init__(
        self,
        reached: Callable[[Any, Any], bool],
        horizon: float,
        spacing: float = 0.02,
        *,
        moves_only_with_commits: bool = True,
    ) -> None:
        self._reached = reached
        self._horizon = horizon
        self._spacing = spacing
        self._moves_only_with_commits = moves_only_with_commits
        self._lock = threading.Lock()
        # Sorted by time.
        self._samples: list[tuple[float, Any]] = []
        # The commit samples among them (record_commit), sorted by time: each
        # names one commit made by its time (see applied_within).
        self._commits: list[tuple[float, Any]] = []

    def record_primary(self, when: float, position: Any) -> None:
        """The primary was at ``position`` at monotonic time ``when`` (or later)."""
        with self._lock:
            if self._samples and when < self._samples[-1][0]:
                bisect.insort(self._samples, (when, position), key=_sample_time)
            else:
                self._samples.append((when, position))
            self._forget(max(when, self._samples[-1][0]))

    def record_commit(self, when: float, position: Any) -> None:
        """A commit acknowledged at ``when`` is at ``position``: every later
        commit is not covered by it. Dropped within ``spacing`` of (or before)
        the newest sample."""
        with self._lock:
            if self._samples and when < self._samples[-1][0] + self._spacing:
                return
            self._samples.append((when, position))
            self._commits.append((when, position))
            self._forget(when)

    def _forget(self, newest: float) -> None:
        cut = bisect.bisect_left(self._samples, newest - self._horizon, key=_sample_time)
        if cut:
            del self._samples[:cut]
        cut = bisect.bisect_left(self._commits, newest - self._horizon, key=_sample_time)
        if cut:
            del self._commits[:cut]

    def reached_any(self, applied: Any) -> bool:
        """Whether ``applied`` covers any sample kept (its lag is then bounded
        by a sample, not only by the age of the last commit it replayed)."""
        with self._lock:
            return any(self._reached(applied, position) for _, position in self._samples)

    def lacking_for(self, applied: Any, now: float) -> float:
        """For how long, at least, a replica that has applied ``applied`` has
        lacked a commit: ``now`` minus the time of the oldest sample it has
        not reached (0 when it has reached them all). A lower bound on its
        staleness, where :meth:`lag` gives an upper one: evidence that it
        really is behind, not only that nothing proves it is not. (Loose by
        the time the primary took to answer that sample.)"""
        with self._lock:
            for when, position in self._samples:
                if not self._reached(applied, position):
                    return max(0.0, now - when)
        return 0.0

    def applied_within(
        self, applied: Any, now: float, last_replayed: float | None = None
    ) -> float | None:
        """How late, at most, a replica that has applied ``applied`` by
        ``now`` applied some commit; None without evidence (it has reached
        no sample, or no commit came between the samples it reached: a
        replica caught up with an idle primary shows nothing of how late it
        applies commits).

        Three kinds of evidence, the smallest bound wins: ``last_replayed``
        (the monotonic time, or earlier, of the last commit it applied, when
        the server tells it: PostgreSQL); the newest commit sample it has
        reached (a commit made through the router by that sample's time,
        loose by that commit's own round trip); and, where positions move
        only with commits (GTIDs; not PostgreSQL's LSN, which WAL that is no
        commit moves too, and a standby delaying commits applies that at
        once), the newest primary sample it has reached, when an earlier
        sample lacks something it has (commits made after the earlier
        sample's time). Each bound is ``now`` minus that time.
        """
        bounds = [] if last_replayed is None else [now - last_replayed]
        with self._lock:
            for when, position in reversed(self._commits):
                if self._reached(applied, position):
                    bounds.append(now - when)
                    break
            newest = self._newest_reached(applied) if self._moves_only_with_commits else None
            if newest is not None:
                position = self._samples[newest][1]
                for when, earlier in reversed(self._samples[:newest]):
                    if not self._reached(earlier, position):
                        bounds.append(now - when)
                        break
        return max(0.0, min(bounds)) if bounds else None

    def _newest_reached(self, applied: Any) -> int | None:
        """The index of the newest sample ``applied`` has reached, or None
        (called with the lock held)."""
        for index in range(len(self._samples) - 1, -1, -1):
            if self._reached(applied, self._samples[index][1]):
                return index
        return None

    @property
    def newest(self) -> Any | None:
        """The position of the newest sample, or None."""
        with self._lock:
            return self._samples[-1][1] if self._samples else None

    def lag(
        self,
        applied: Any,
        now: float,
        last_replayed: float | None = None,
        *,
        current: bool = True,
    ) -> tuple[float, bool]:
        """How stale a replica that has applied ``applied`` can be at ``now``,
        and whether that is an upper bound.

        0 when it has reached the newest sample and that sample is
        ``current`` (the primary answered it just before the replica was
        asked). Otherwise the least of: the time since the newest sample it
        has reached, and, with ``last_replayed`` (the monotonic time, or
        earlier, of the last commit it applied), the time since then. When
        neither is known (it reached no sample kept), the time since the
        oldest sample: only a lower bound.

        Not ``current`` (the primary did not answer this round: down,
        restarting, out of reach): commits may have been acknowledged after
        the newest sample and never reached the replica, so even a replica
        that has reached it is as stale as that sample is old.
        """
        with self._lock:
            samples = self._samples
            if not samples:  # nothing to compare with (the primary never answered)
                return 0.0, False
            bound: float | None = None
            index = self._newest_reached(applied)
            if index is not None:
                if current and index == len(samples) - 1:
                    return 0.0, True
                bound = now - samples[index][0]
            oldest = samples[0][0]
        if last_replayed is not None:
            replayed_bound = now - last_replayed
            bound = replayed_bound if bound is None else min(bound, replayed_bound)
        if bound is None:
            return max(0.0, now - oldest), False
        return max(0.0, bound), True


def _sample_time(sample: tuple[float, Any]) -> float:
    return sample[0]


class _StillRunning(Exception):
    """A server's previous check is still waiting for its answer."""


class _Check:
    """One query on one server, in a thread of its own, so that a server that
    never answers costs a thread, not the monitor."""

    def __init__(
        self,
        question: Callable[[], Any],
        timeout: float,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self._question = question
        self._timeout = timeout
        self._on_done = on_done
        self._answer: Any = None
        self._error: BaseException | None = None
        #: Set when the monitor stopped waiting for it (its server counted
        #: as unreachable); it may still answer later.
        self.timed_out = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def succeeded(self) -> bool:
        """True once it has ended with an answer (not an error)."""
        return not self._thread.is_alive() and self._error is None

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the answer (or the error)."""
        self._thread.join(max(0.0, timeout))

    def result(self, timeout: float) -> Any:
        """The answer, waiting up to ``timeout`` seconds for it.

        :raises TimeoutError: when there is none by then.
        """
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            raise TimeoutError(f"no answer within {self._timeout:g} s")
        if self._error is not None:
            raise self._error
        return self._answer

    def _run(self) -> None:
        try:
            self._answer = self._question()
        except BaseException as error:  # handed to result()
            # Without the locals of its frames (the router among them): the
            # monitor keeps a finished check until its next round.
            traceback.clear_frames(error.__traceback__)
            self._error = error
        finally:
            # The question holds the router: a finished check must not keep
            # alive a router the application dropped (the monitor holds it weakly).
            del self._question
        if self._on_done is not None:
            self._on_done()


@dataclass
class _Health:
    # True while the last check showed it replicates from this primary.
    verified: bool = False
    # Left out for lag, identity (or not replicating); being down is the breaker's.
    excluded: bool = False
    # Left out for lag (over max_lag) and not readmitted since: counted in stats.
    lag_excluded: bool = False
    breaker: Breaker = field(default_factory=Breaker)
    checked: bool = False
    lag: float | None = None
    # False while the lag is only a lower bound (not reached any kept sample).
    lag_exact: bool = False
    # For how long at least it had lacked a commit, at the last check.
    lacking_for: float | None = None
    position: Any | None = None
    reason: str | None = None
    # How much it had still to apply at the last check (backend.behind_unit).
    behind: int | None = None
    # time.monotonic() when ``lag`` was measured.
    measured_at: float | None = None
    # True while a judgement "over max_lag" awaits its quick second look
    # (see LagMonitor._judge).
    deferred: bool = False


class LagMonitor:
    """The background checks of one router's replicas.

    :param cluster: the shared state of the router whose replicas to watch.
    :param interval: seconds between checks.
    """

    def __init__(self, cluster: Watched, interval: float) -> None:
        # Weak: a router the application dropped without dispose() is collected,
        # and then this thread ends by itself.
        self._cluster_ref = weakref.ref(cluster)
        self._name = cluster.name
        self._interval = interval
        self._health = {r.name: _Health() for r in cluster.replica_targets}
        self._estimator: LagEstimator | None = None
        self._engines: dict[str, Engine] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"sqlalchemy-replicas-monitor-{cluster.name}", daemon=True
        )
        self._all_out_logged = False
        self._primary_down_logged = False
        #: Seconds a check may take (connect included) before its server
        #: counts as unreachable.
        self.check_timeout = check_timeout(interval)
        # Server name -> its check still waiting for an answer.
        self._in_flight: dict[str, _Check] = {}
        # What the primary said of itself on its latest connection.
        self._primary_identity: Any = None
        # Notified whenever a replica's check ends: first reads wait on it.
        self._checked = threading.Condition()
        #: True once every replica has been checked at least once.
        self.all_checked = not self._health
        #: Extra primary samples taken between checks so far (see
        #: :meth:`_between_checks`).
        self.primary_samples = 0
        # When a check last found a replica behind (time.monotonic()).
        self._behind_at: float | None = None
        # Set when a judgement was deferred: the next round comes at once.
        self._recheck_soon = False

    def start(self) -> None:
        """Start checking in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop checking and close the monitor's own connections."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self._close()

    def _close(self) -> None:
        """Close the monitor's own connections. A check still running holds
        one of them: disposing under it would leave that connection to the
        garbage collector, so wait for it first (each ends within
        check_timeout)."""
        deadline = time.monotonic() + self.check_timeout
        for check in list(self._in_flight.values()):
            check.wait(deadline - time.monotonic())
        for engine in list(self._engines.values()):
            engine.dispose()

    def may_serve(self, name: str, max_lag: float | None, ignore_lag: bool) -> bool:
        """Whether replica ``name`` may serve a read: shown to replicate from
        this primary, not left out (unless only for lag and ``ignore_lag``),
        and with ``max_lag``, measured within it."""
        health = self._health[name]
        if not health.verified or health.breaker.down:
            return False
        if max_lag is not None:
            return health.lag is not None and health.lag_exact and health.lag <= max_lag
        if not health.excluded:
            return True
        return ignore_lag and health.lag is not None

    def state(
        self, name: str, ignore_lag: bool
    ) -> tuple[bool, bool, float | None, bool, float | None]:
        """What a routing plan needs of replica ``name`` (no I/O): whether it
        may serve reads (as :meth:`may_serve` without a bound), whether it
        replicates from this primary and is up whatever its lag, its lag,
        whether that lag is exact, and for how long at least it had lacked a
        commit at the last check (:meth:`LagEstimator.lacking_for`)."""
        health = self._health[name]
        reachable = health.verified and not health.breaker.down
        may_serve = reachable and (not health.excluded or (ignore_lag and health.lag is not None))
        return may_serve, reachable, health.lag, health.lag_exact, health.lacking_for

    def status(self, cluster: Watched) -> list[ReplicaStatus]:
        """Every replica of ``cluster`` (the one this monitor watches) as last seen."""
        backend = cluster.positions
        result = []
        for replica in cluster.replica_targets:
            health = self._health[replica.name]
            position = (
                None
                if health.position is None or backend is None
                else backend.format(health.position)
            )
            unit = None if backend is None else backend.behind_unit
            result.append(
                ReplicaStatus(
                    replica.name,
                    replica.sync_engine.url.render_as_string(hide_password=True),
                    (health.verified and not health.excluded and not health.breaker.down)
                    if health.checked
                    else None,
                    health.lag,
                    position,
                    health.reason,
                    lag_bytes=health.behind if unit == "bytes" else None,
                    lag_transactions=health.behind if unit == "transactions" else None,
                    pool_full_skips=cluster.pool_full_skips(replica.name),
                    lag_measured_at=health.measured_at if health.lag is not None else None,
                    zone=cluster.replica_zones.get(replica.name),
                )
            )
        return result

    def await_first_checks(self, names: list[str], timeout: float) -> None:
        """Wait up to ``timeout`` seconds until each replica of ``names`` has
        been checked once.

        Before its first check a replica serves no read (its identity is not
        known): a read waits here at most its ``wait_timeout``, so a replica
        frozen at start-up costs it no more than that. Waiting for all of
        them, not the first to answer, keeps the read's choice the one it
        would make once they are known.
        """
        with self._checked:
            self._checked.wait_for(
                lambda: all(self._health[name].checked for name in names), timeout
            )

    def _notify_checked(self) -> None:
        with self._checked:
            self.all_checked = all(health.checked for health in self._health.values())
            self._checked.notify_all()

    def down_since(self, name: str) -> float | None:
        """When (``time.monotonic()``) replica ``name`` last went down, or None."""
        return self._health[name].breaker.down_since

    def _count_transition(self, name: str, *, down: bool) -> None:
        """Count replica ``name`` going down or coming back in the router's stats."""
        cluster = self._cluster_ref()
        if cluster is not None:
            recorder = cluster.stats_recorder
            if down:
                recorder.replica_down(name)
            else:
                recorder.replica_up(name)

    def _count_lag_transition(self, cluster: Watched, name: str, *, out: bool) -> None:
        """Count replica ``name`` left out for lag, or readmitted, in the router's stats."""
        if out:
            cluster.stats_recorder.replica_over_max_lag(name)
        else:
            cluster.stats_recorder.replica_under_max_lag(name)

    def mark_down(self, name: str, error: BaseException) -> None:
        """A session lost (or could not open) a connection to replica ``name``:
        no reads go there until a probe gets through."""
        health = self._health[name]
        with self._lock:
            tripped = health.breaker.trip(time.monotonic())
            if tripped:
                health.checked = True
                health.reason = f"disconnected: {describe_error(error)}"
        self._notify_checked()
        if tripped:
            self._count_transition(name, down=True)
            logger.warning(
                "replica %s is down (%s); no reads go there until a probe succeeds",
                name,
                describe_error(error),
            )

    def note_commit(self, when: float, position: Any) -> None:
        """A commit acknowledged through the router by ``when`` is at
        ``position`` (read on its connection after ``when``): one more sample
        of the primary's timeline, free. Ignored when it does not name every
        replication domain (stream) the primary has, as a MariaDB
        ``@@last_gtid`` with several domains: commits in the others may be
        older than ``when``."""
        estimator = self._estimator
        newest = None if estimator is None else estimator.newest
        if estimator is None or newest is None:
            return
        if isinstance(newest, Mapping) and not (
            isinstance(position, Mapping) and newest.keys() <= position.keys()
        ):
            return
        estimator.record_commit(when, position)

    def check_once(self, cluster: Watched) -> None:
        """Sample the primary, then every replica that is due (in parallel);
        update lags and exclusions. Each query gets :attr:`check_timeout`
        seconds: a server that accepts connections but answers nothing (a
        paused VM, a black-holed host) counts as unreachable, and cannot
        stall the checks of the others."""
        self._drop_finished()
        backend = cluster.positions
        if backend is None and cluster.positions_pending:
            backend = self._learn_positions(cluster)
        if backend is None:
            return
        if self._estimator is None:
            horizon = max(10.0, 3 * cluster.max_lag)
            self._estimator = LagEstimator(
                backend.reached, horizon, moves_only_with_commits=backend.moves_only_with_commits
            )
        # Again: telling the server kind may just have asked the primary.
        self._drop_finished()
        primary = cluster.primary_target
        primary_position = None
        host = make_url(cluster.primary_url).host
        try:
            check = self._start(
                primary.name,
                functools.partial(
                    self._ask,
                    cluster,
                    primary,
                    _identified(
                        functools.partial(backend.primary_identity, host=host),
                        _timed(backend.current),
                    ),
                ),
            )
            self._primary_identity, (asked, primary_position) = check.result(self.check_timeout)
        except Exception as error:
            # No new sample: lags are judged against the samples kept, and
            # down replicas are still probed (reads may need them most now).
            if not self._primary_down_logged:
                logger.warning("lag check: the primary is unreachable: %s", error)
            self._primary_down_logged = True
        else:
            if self._primary_down_logged:
                logger.info("lag check: the primary is reachable again")
            self._primary_down_logged = False
            if primary_position is not None:
                self._estimator.record_primary(asked, primary_position)
        now = time.monotonic()
        due = [
            replica
            for replica in cluster.replica_targets
            if self._health[replica.name].breaker.probe_due(now)
        ]
        checks = {}
        # Answers are taken as they come: one frozen replica does not hold
        # back the others' (their first reads wait on them).
        answered: queue.SimpleQueue[str] = queue.SimpleQueue()
        question = _identified(backend.replica_identity, _timed(backend.applied_with_age))
        for replica in due:
            try:
                checks[replica.name] = self._start(
                    replica.name,
                    functools.partial(self._ask, cluster, replica, question),
                    on_done=functools.partial(answered.put, replica.name),
                )
            except _StillRunning as error:
                self._check_failed(replica, error)
        deadline = time.monotonic() + self.check_timeout
        by_name = {replica.name: replica for replica in due}
        while checks:
            try:
                name = answered.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            check = checks.pop(name)
            try:
                identity, (asked, (applied, age)) = check.result(0)
            except Exception as error:
                self._check_failed(by_name[name], error)
            else:
                # The server measured the age at or after ``asked``: the last
                # commit it replayed was made at ``asked - age`` or later.
                last_replayed = None if age is None else asked - age
                self._judge(
                    cluster, by_name[name], identity, applied, primary_position, last_replayed
                )
        for name, check in checks.items():
            check.timed_out = True
            self._check_failed(by_name[name], _timed_out(check))
        if self._any_behind():
            self._behind_at = time.monotonic()
        self._log_when_all_out()

    def _learn_positions(self, cluster: Watched) -> PositionBackend | None:
        """MySQL or MariaDB? An async router cannot connect outside its event
        loop: this thread's own sync connection to the primary tells (None
        while the primary is unreachable; the next round asks again)."""
        primary = cluster.primary_target
        try:
            check = self._start(
                primary.name,
                functools.partial(self._ask, cluster, primary, lambda conn: conn.engine),
            )
            engine = check.result(self.check_timeout)
        except Exception as error:
            logger.debug("lag check: the primary's server kind is unknown yet: %s", error)
            return None
        return cluster.learn_positions(engine)

    def _drop_finished(self) -> None:
        """Forget the checks that have ended. A replica whose check timed out
        (so it went down) but answered since is alive, only slow (a loaded
        host, a long connect): it is probed in this round, not after its
        backoff, so one slow answer costs it one round of reads at most."""
        running = {}
        for name, check in self._in_flight.items():
            if check.is_alive():
                running[name] = check
            elif check.timed_out and check.succeeded and name in self._health:
                with self._lock:
                    self._health[name].breaker.probe_at_once()
        self._in_flight = running

    def _start(
        self, name: str, question: Callable[[], Any], on_done: Callable[[], None] | None = None
    ) -> _Check:
        if name in self._in_flight:
            raise _StillRunning("the previous check has not answered yet")
        check = _Check(question, self.check_timeout, on_done)
        self._in_flight[name] = check
        return check

    def _check_failed(self, replica: RoutedEngine, error: BaseException) -> None:
        health = self._health[replica.name]
        with self._lock:
            tripped = health.breaker.check_failed(time.monotonic())
            health.checked, health.lag, health.lag_exact = True, None, False
            health.lacking_for = None
            health.behind = None
            health.reason = f"unreachable: {describe_error(error)}"
        self._notify_checked()
        if tripped:
            self._count_transition(replica.name, down=True)
            logger.warning(
                "replica %s is unreachable (%s); no reads go there until a probe succeeds",
                replica.name,
                describe_error(error),
            )

    def _judge(
        self,
        cluster: Watched,
        replica: RoutedEngine,
        identity: Any,
        applied: Any | None,
        primary_position: Any | None,
        last_replayed: float | None = None,
    ) -> None:
        """Judge replica ``replica`` from a check that got through: readmit it
        if it was down, verify that it replicates from this primary, and
        measure its lag against ``max_lag`` (left out, or readmitted, with
        hysteresis). Whatever the verdict, first reads waiting for checks
        are woken."""
        try:
            backend = cluster.positions
            assert backend is not None
            assert self._estimator is not None
            health = self._health[replica.name]
            with self._lock:
                came_back = health.breaker.succeed()
            if came_back:
                self._count_transition(replica.name, down=False)
                logger.info(
                    "replica %s is reachable again; its lag decides its reads", replica.name
                )
            why = (
                "the primary has not answered yet to compare it with"
                if self._primary_identity is None
                else backend.not_a_replica(self._primary_identity, identity)
            )
            if why is not None:
                reason = f"not a replica of this primary: {why}"
                with self._lock:
                    health.checked, health.verified, health.excluded = True, False, True
                    health.lag, health.lag_exact, health.behind = None, False, None
                    health.lacking_for = None
                    logged, health.reason = health.reason == reason, reason
                if not logged:
                    logger.warning("replica %s gets no reads: %s", replica.name, reason)
                return
            if not health.verified and health.checked:
                logger.info("replica %s replicates from this primary again", replica.name)
            with self._lock:
                if not health.verified and health.reason is not None:
                    # Left out for its identity, not its lag: the lag decides now.
                    health.excluded, health.reason = False, None
                health.verified = True
            if applied is None:
                with self._lock:
                    health.checked, health.lag, health.excluded = True, None, True
                    health.reason = "not replicating (no applied position)"
                return
            now = time.monotonic()
            lag, exact = self._estimator.lag(
                applied, now, last_replayed, current=primary_position is not None
            )
            lacking_for = self._estimator.lacking_for(applied, now)
            cluster.note_applied(replica.name, applied)
            applied_within = self._estimator.applied_within(applied, now, last_replayed)
            if applied_within is not None:
                cluster.note_applied_within(replica.name, applied_within)
            behind = None if primary_position is None else backend.behind(primary_position, applied)
            # A replica that has applied no sample kept has a lag bounded only by
            # the age of the last commit it replayed: after a quiet spell that is
            # long even when all it lacks is WAL written a moment before the
            # primary's sample (a new monitor's first round, under load). Before
            # leaving a serving (or unchecked) replica out on that bound alone,
            # look once more right away: by then it has applied a sample, or the
            # bound stands.
            defer = (
                lag > cluster.max_lag
                and not health.excluded
                and not health.deferred
                and not self._estimator.reached_any(applied)
            )
            lag_transition = None
            with self._lock:
                health.lag, health.lag_exact, health.lacking_for = lag, exact, lacking_for
                health.position, health.behind, health.measured_at = applied, behind, now
                health.deferred = defer
                if defer:
                    self._recheck_soon = True
                    return
                health.checked = True
                if lag > cluster.max_lag:
                    health.excluded = True
                    health.reason = f"lag {lag:.1f}s > max_lag {cluster.max_lag}s"
                    if not health.lag_excluded:
                        health.lag_excluded = lag_transition = True
                elif not health.excluded or lag <= cluster.max_lag * READMIT_FRACTION:
                    health.excluded = False
                    health.reason = None
                    if health.lag_excluded:
                        health.lag_excluded = lag_transition = False
                elif came_back:
                    health.reason = f"lag {lag:.1f}s, not yet under {READMIT_FRACTION} * max_lag"
            if lag_transition is not None:
                self._count_lag_transition(cluster, replica.name, out=lag_transition)
        finally:
            self._notify_checked()

    def _log_when_all_out(self) -> None:
        all_out = all(h.excluded or h.breaker.down for h in self._health.values())
        if all_out and not self._all_out_logged:
            logger.warning(
                "no replica of %s qualifies (lagging or unreachable): reads go to the primary",
                self._name,
            )
        self._all_out_logged = all_out

    def _ask(
        self, cluster: Watched, target: RoutedEngine, question: Callable[[Connection], _R]
    ) -> _R:
        """One query on ``target``. A pooled connection that broke since the
        last check (the server restarted) is replaced and the query asked
        once more: a check costs one query, not a ping and a query."""
        engine = self._engine(cluster, target)
        try:
            with engine.connect() as conn:
                return question(conn)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
        with engine.connect() as conn:
            return question(conn)

    def _engine(self, cluster: Watched, target: RoutedEngine) -> Engine:
        engine = self._engines.get(target.name)
        if engine is None:
            timeouts = _connect_timeout(sync_url(target.sync_engine.url), self._interval)
            # AUTOCOMMIT, no ROLLBACK on return: a check is one round trip.
            engine = probe_engine(
                target,
                timeouts,
                install_discovery=(
                    cluster.install_discovery if target is cluster.primary_target else None
                ),
                pool_size=1,
                max_overflow=0,
                isolation_level="AUTOCOMMIT",
                skip_autocommit_rollback=True,
            )
            self._engines[target.name] = engine
        return engine

    def _run(self) -> None:
        while not self._stop.is_set():
            cluster = self._cluster_ref()
            if cluster is None:
                break
            self._recheck_soon = False
            try:
                self.check_once(cluster)
            except Exception:  # never let the thread die; the next round retries
                logger.exception("lag check failed")
            del cluster  # hold no reference while sleeping
            wait = DENSE_SAMPLE_INTERVAL if self._recheck_soon else self._interval
            self._between_checks(time.monotonic() + wait)
        # Stopped, or the router was collected without dispose(): either way
        # the monitor's connections are closed here, not left to the GC.
        self._close()

    def _between_checks(self, next_check: float) -> None:
        """Wait until ``next_check``; meanwhile, while a check found a replica
        behind within :data:`DENSE_HOLD` seconds, sample the primary's position every
        :data:`DENSE_SAMPLE_INTERVAL`, so that the next checks can tell when
        each of its commits was made to within that (an idle or caught-up
        cluster costs nothing)."""
        next_sample = time.monotonic() + DENSE_SAMPLE_INTERVAL
        while not self._stop.is_set():
            now = time.monotonic()
            if next_check - now <= 0:
                return
            dense = self._behind_at is not None and now - self._behind_at < DENSE_HOLD
            if not dense or next_check - now < DENSE_SAMPLE_INTERVAL / 2:
                self._stop.wait(next_check - now)
                return
            # On a fixed schedule: a slow sample does not widen the gaps.
            if self._stop.wait(max(0.0, next_sample - now)):
                return
            next_sample = max(next_sample + DENSE_SAMPLE_INTERVAL, time.monotonic())
            cluster = self._cluster_ref()
            if cluster is None:
                return
            try:
                self.sample_primary(cluster)
            except Exception as error:  # the next full check tells what is wrong
                logger.debug("lag check: a primary sample failed: %s", error)
            del cluster

    def _any_behind(self) -> bool:
        return any(
            health.lag is not None
            and (health.lag > 0 or not health.lag_exact)
            and not health.breaker.down
            for health in self._health.values()
        )

    def sample_primary(self, cluster: Watched) -> None:
        """One more sample of the primary's position for the lag estimate
        (none while its previous query is still running)."""
        backend = cluster.positions
        if backend is None or self._estimator is None:
            return
        primary = cluster.primary_target
        self._drop_finished()
        check = self._start(
            primary.name, functools.partial(self._ask, cluster, primary, _timed(backend.current))
        )
        asked, position = check.result(self.check_timeout)
        if position is not None:
            self._estimator.record_primary(asked, position)
        self.primary_samples += 1


def check_timeout(interval: float) -> float:
    """Seconds a check may take: 2, or twice the interval when that is longer."""
    return max(2.0, 2 * interval)


def _connect_timeout(url: URL, interval: float) -> dict[str, Any]:
    """Connect arguments that bound a check's connect to an unresponsive host
    (libpq rounds anything under 2 s up to 2 s)."""
    seconds = math.ceil(check_timeout(interval))
    driver = url.get_driver_name()
    if driver in ("psycopg", "psycopg2"):
        return {"connect_timeout": seconds}  # the whole handshake
    if driver in ("pymysql", "mysqldb"):
        # connect_timeout covers only the TCP connect, which the kernel
        # completes even for a frozen server: bound the reads too.
        return {"connect_timeout": seconds, "read_timeout": seconds}
    return {}


def _identified(
    read_identity: Callable[[Connection], Any], question: Callable[[Connection], _R]
) -> Callable[[Connection], tuple[Any, _R]]:
    """``question``, answered with the server's identity, read on the first
    use of each connection only (kept in the pooled connection's info)."""

    def ask(conn: Connection) -> tuple[Any, _R]:
        identity = conn.info.get(_IDENTITY_KEY)
        if identity is None:
            identity = conn.info[_IDENTITY_KEY] = read_identity(conn)
        return identity, question(conn)

    return ask


def _timed(question: Callable[[Connection], _R]) -> Callable[[Connection], tuple[float, _R]]:
    """``question``, answered with the monotonic time just before it was
    asked (what the server says holds at that time or later)."""

    def ask(conn: Connection) -> tuple[float, _R]:
        asked = time.monotonic()
        return asked, question(conn)

    return ask


def _timed_out(check: _Check) -> BaseException:
    try:
        check.result(0)
    except BaseException as error:
        return error
    return TimeoutError("no answer in time")
