"""The state one router's sessions, causal scopes and lag monitor share.

One :class:`Cluster` per :class:`~sqlalchemy_replicas.ReplicaRouter`: its
servers (:class:`~sqlalchemy_replicas.targets.RoutedEngine`), the
replication-position backend and the primary's lineage, the positions each
replica is known to have applied, how the last causal wait on each failed,
the router's own causal scope, the stats recorder and the lag monitor that
judges the replicas' health. The router builds it and is the public face;
sessions, causal scopes and the monitor use it without importing the router,
so the modules depend on one another in one direction only (router ->
session -> cluster -> monitor, causal, plan).

Thread- and asyncio-safe: every mutable field is guarded by a lock or
replaced whole. Most methods do no I/O; those that do say so (they read a
position on the primary).
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.engine import Engine

from . import zones
from ._asyncio import call_blocking, in_async_greenlet
from ._listeners import Listeners
from .causal import CAPTURED_KEY, COMMITTED_KEY, CausalScope, current_scope
from .discovery import PrimaryDiscovery
from .monitor import LagMonitor, ReplicaStatus
from .pipelining import capture_commit
from .plan import ReplicaState, WaitFailure
from .positions import DBAPIRunner, PositionBackend, SQLRunner, backend_for
from .stats import StatsRecorder
from .targets import RoutedEngine
from .token import UNKNOWN_POSITION, TokenEntry, TokenError, verify

__all__ = ["Cluster"]

logger = logging.getLogger("sqlalchemy_replicas.causal")


class Cluster:
    """A primary and its replicas, with what is known about them right now.

    :param name: the router's name (causal tokens, logs, the monitor's thread).
    :param primary: the primary.
    :param replicas: the replicas, in configuration order.
    :param discovery: where primary connections go (``primary_candidates``).
    :param listeners: what the router attached to engines (removed on dispose).
    :param secret: the key that signs causal token entries, or None.
    :param token_max_age: seconds a causal token stays acceptable.
    :param max_lag: seconds of lag past which a replica gets no reads.
    :param wait_timeout: seconds a read may wait for a replica to catch up.
    :param lag_check_interval: seconds between the lag monitor's checks.
    :param weights: each replica's share of sticky keys, in configuration order.
    :param replica_zones: replica name -> zone, for the replicas given one.
    :param local: which replicas are in the application's zone, in
        configuration order (:func:`~sqlalchemy_replicas.zones.local_replicas`).
    """

    def __init__(
        self,
        *,
        name: str,
        primary: RoutedEngine,
        replicas: tuple[RoutedEngine, ...],
        discovery: PrimaryDiscovery,
        listeners: Listeners,
        secret: str | bytes | None,
        token_max_age: float,
        max_lag: float,
        wait_timeout: float,
        lag_check_interval: float,
        weights: tuple[float, ...],
        replica_zones: Mapping[str, str],
        local: tuple[bool, ...],
    ) -> None:
        self.name = name
        self.primary_target = primary
        self.replica_targets = replicas
        self.replica_names = tuple(r.name for r in replicas)
        self._replicas_by_name = {r.name: r for r in replicas}
        self.discovery = discovery
        self.listeners = listeners
        self.secret = secret
        self.token_max_age = token_max_age
        self.max_lag = max_lag
        self.wait_timeout = wait_timeout
        self.lag_check_interval = lag_check_interval
        self._weights = weights
        self.replica_zones = replica_zones
        self._local = local
        #: Operator switch: route reads to lagging replicas too (say, when the
        #: primary is overloaded). Unreachable replicas still get none.
        self.ignore_lag = False
        #: The live counters behind the router's ``stats()`` (sessions and the
        #: lag monitor update them).
        self.stats_recorder = StatsRecorder()
        self._monitor: LagMonitor | None = None
        self._monitor_lock = threading.Lock()
        self._next_replica = itertools.count()
        # The orders of preference, computed once (zones.preference is pure
        # and took a few microseconds per read): without a sticky key, one
        # per turn of the round robin's cycle; per sticky key, as keys come.
        self._rotations = _round_robin_orders(replicas, weights, local)
        self._sticky_orders: dict[bytes, tuple[RoutedEngine, ...]] = {}
        self._positions: PositionBackend | None = None
        self._lineage: str | None = None
        # Replica name -> a position it is known to have applied (a lower
        # bound, from earlier checks): reads that need no more skip the wait.
        self._applied: dict[str, Any] = {}
        self._applied_lock = threading.Lock()
        # Replica name -> (the position it was known to have applied when a
        # wait on it last failed (None: none known; what a refusal is judged
        # against), whether it refused the wait as not applying): see
        # wait_failure().
        self._wait_failures: dict[str, tuple[Any, bool]] = {}
        # Replica name -> reads sent elsewhere because its pool was full.
        self._pool_full_skips: dict[str, int] = {}
        self._pool_full_lock = threading.Lock()
        self.disposed = False
        # Every commit acknowledged through this router. It starts "unknown",
        # so the first read that consults it replaces that by the primary's
        # current position (one query): what a migration or seed script
        # committed before this process started is included, and until the
        # primary answers, such reads go to the primary.
        self.process_scope = CausalScope()

    # -- the servers ------------------------------------------------------------

    @property
    def is_async(self) -> bool:
        """True when the engines are ``AsyncEngine`` objects."""
        return self.primary_target.is_async

    @property
    def primary_url(self) -> str:
        """Where primary connections go now, without the password."""
        return self.discovery.current_url.render_as_string(hide_password=True)

    def install_discovery(self, engine: Engine) -> None:
        """Make ``engine`` (a private engine on the primary, such as the lag
        monitor's) connect to wherever the primary is now."""
        self.discovery.install(engine, self.listeners)

    def primary_moved(self) -> None:
        """Primary connections go to another server now: its history may
        differ (MariaDB names it by address), so the lineage is read again."""
        self._lineage = None

    def replica_target(self, name: str) -> RoutedEngine:
        """The replica named ``name``."""
        return self._replicas_by_name[name]

    # -- positions ----------------------------------------------------------------

    @property
    def positions(self) -> PositionBackend | None:
        """The replication-position backend of this database, or None for a
        database without one (e.g. SQLite). MySQL and MariaDB share a
        dialect, so telling them apart may connect to the primary once; an
        async cluster asked outside its event loop's greenlet cannot connect
        there, and returns None until the lag monitor's own connection tells
        (:meth:`learn_positions`)."""
        if self._positions is None:
            engine = self.primary_target.sync_engine
            if server_kind_unknown(engine):
                if self.is_async and not in_async_greenlet():
                    return None
                with engine.connect() as connection:  # initializes the dialect
                    connection.info[CAPTURED_KEY] = True  # nothing to capture
            self._positions = backend_for(engine)
        return self._positions

    @property
    def positions_pending(self) -> bool:
        """True while MySQL vs MariaDB is unknown (no I/O)."""
        return self._positions is None and server_kind_unknown(self.primary_target.sync_engine)

    def learn_positions(self, engine: Engine) -> PositionBackend | None:
        """Tell MySQL from MariaDB by ``engine``, a sync engine on the primary
        that has connected (the lag monitor's), when the cluster's own (async)
        engine could not; return the backend."""
        if self._positions is None and not server_kind_unknown(engine):
            self._positions = backend_for(engine)
        return self.positions

    def lineage(self, primary: SQLRunner | None = None) -> str:
        """The primary's history (see :meth:`PositionBackend.lineage`), read once,
        on ``primary`` if given, else on a new connection."""
        if self._lineage is None:
            backend = self.positions
            assert backend is not None
            if primary is not None:
                self._lineage = backend.lineage(primary)
            else:
                with self.primary_target.sync_engine.connect() as connection:
                    connection.info[CAPTURED_KEY] = True  # nothing to capture
                    self._lineage = backend.lineage(connection)
        return self._lineage

    @property
    def known_lineage(self) -> str | None:
        """The primary's history if it was read already, else None (no I/O)."""
        return self._lineage

    def current_position(self) -> Any | None:
        """Everything committed on the primary so far, asked on a connection
        of its own (the lineage too, when not known yet).

        :raises Exception: whatever the driver raises when the primary is unreachable.
        """
        backend = self.positions
        assert backend is not None
        with self.primary_target.sync_engine.connect() as connection:
            connection.info[CAPTURED_KEY] = True  # nothing to capture
            self.lineage(connection)
            return backend.current(connection)

    def accept_token_entry(self, entry: TokenEntry) -> Any:
        """Verify this cluster's entry of a causal token; return its position
        (None for :data:`~sqlalchemy_replicas.token.UNKNOWN_POSITION`).

        :raises TokenError: with the reason, for any entry not to be trusted.
        """
        if self.secret is None:
            raise TokenError("no_secret", "this router has no secret to verify tokens with")
        verify(self.secret, self.name, entry, now=time.time(), max_age=self.token_max_age)
        backend = self.positions
        if backend is None or entry.kind != backend.kind:
            # Another database kind under the same name and secret.
            raise TokenError("wrong_database", f"a {entry.kind!r} position")
        position = None
        if entry.position != UNKNOWN_POSITION:
            try:
                position = backend.parse(entry.position)
            except Exception as exc:  # pure parsing of untrusted text: any failure
                raise TokenError("malformed", str(exc)) from None
        if entry.lineage != self.lineage():
            raise TokenError("other_lineage", f"position from {entry.lineage!r}")
        return position

    # -- commits --------------------------------------------------------------------

    def commit_scopes(self) -> list[CausalScope]:
        """The scopes a commit acknowledged here belongs to: the cluster's,
        and the enclosing ``causal_context()``'s, if any."""
        context = current_scope()
        return [self.process_scope] if context is None else [self.process_scope, context]

    def capture_core_commit(self, dbapi_connection: Any, record: Any, reset_state: Any) -> None:
        """Pool reset of a primary connection: record the position of what
        Core code (``with router.primary.begin()``) committed on it, in the
        router's scope and the enclosing causal_context's. Sessions record
        their own commits and mark the connection, so it is not captured
        twice; a connection that committed nothing costs no query."""
        captured = record.info.pop(CAPTURED_KEY, False)
        committed = record.info.pop(COMMITTED_KEY, False)
        if captured or not committed or not self.replica_targets:
            return
        scopes = self.commit_scopes()
        if reset_state.terminate_only or not reset_state.asyncio_safe:
            # The connection is being discarded (or cannot be used from here):
            # whatever it committed, its position cannot be read.
            for scope in scopes:
                scope.mark_unknown(self)
            return
        self.record_commit(DBAPIRunner(dbapi_connection, record.info), scopes)

    def record_commit(self, primary: SQLRunner, scopes: list[CausalScope]) -> bool:
        """Read the position of what was just committed on ``primary`` (the
        committing connection) into ``scopes``. When it cannot be read, the
        scopes' reads go to the primary. Returns whether it was read."""
        try:
            backend = self.positions
            if backend is None:
                return False
            self.lineage(primary)
            # Taken with the COMMIT when the driver pipelines it (pipelining).
            acknowledged, position = capture_commit(backend, primary)
        except Exception as error:  # the commit is done; only its position is lost
            logger.warning(
                "could not read the position of a commit on %s (%s); reads in this "
                "scope go to the primary",
                self.name,
                error,
            )
            for scope in scopes:
                scope.mark_unknown(self)
            return False
        if position is not None:
            for scope in scopes:
                scope.add(self, position)
            monitor = self._monitor
            if monitor is not None:  # a free sample for the lag estimate
                monitor.note_commit(acknowledged, position)
        return True

    # -- what is known about each replica ---------------------------------------------

    def note_wait_failed(self, replica: str, *, stopped: bool = False) -> None:
        """A wait on ``replica`` timed out (or failed), or with ``stopped``
        was refused because it was not applying at all (replay paused).
        Remembered until it is seen to apply commits again: see
        :meth:`wait_failure`."""
        with self._applied_lock:
            self._wait_failures[replica] = (self._applied.get(replica), stopped)

    def note_applied_within(self, replica: str, seconds: float) -> None:
        """The lag monitor saw ``replica`` apply a commit at most ``seconds``
        after the primary made it: within ``wait_timeout``, a wait on it that
        timed out no longer makes it suspect (see :meth:`wait_failure`)."""
        if seconds <= self.wait_timeout and replica in self._wait_failures:
            with self._applied_lock:
                failure = self._wait_failures.get(replica)
                if failure is not None and not failure[1]:
                    del self._wait_failures[replica]

    def wait_failure(self, replica: str) -> WaitFailure | None:
        """How the last wait on ``replica`` failed, if it has not been seen
        to apply commits again since (None otherwise):

        - ``"timed_out"`` (suspect: reads do not wait on it): until the lag
          monitor sees it apply a commit within ``wait_timeout`` of the
          primary making it (:meth:`note_applied_within`). Seeing it apply
          more is no such proof: a replica that applies every commit a
          second late applies the one a wait missed a second later, and
          would be waited on in vain again after each commit.
        - ``"stopped"`` (it said it was not applying: reads ask it last):
          until it is seen to apply more than it had when it refused.

        Judged by what it applied, not by a fixed time: a replica paused for
        a minute stays so for that minute, and one that resumed is trusted
        again as soon as it is seen applying."""
        if replica not in self._wait_failures:
            return None  # the common case: no lock, no comparison
        with self._applied_lock:
            failure = self._wait_failures.get(replica)
            if failure is None:
                return None
            (before, stopped), now = failure, self._applied.get(replica)
            if not stopped:
                return "timed_out"
            backend = self._positions
            if now is None or (
                before is not None and (backend is None or backend.reached(before, now))
            ):
                return "stopped"  # nothing new applied since
            del self._wait_failures[replica]
            return None

    def note_pool_full(self, replica: RoutedEngine) -> None:
        """A read that ``replica`` would have served goes elsewhere: its pool
        had no free connection (counted in :meth:`status`)."""
        with self._pool_full_lock:
            self._pool_full_skips[replica.name] = self._pool_full_skips.get(replica.name, 0) + 1

    def pool_full_skips(self, replica: str) -> int:
        """Reads sent elsewhere because ``replica``'s pool was full, so far."""
        return self._pool_full_skips.get(replica, 0)

    def known_applied(self, replica: str) -> Any | None:
        """A position ``replica`` is known to have applied, or None."""
        return self._applied.get(replica)

    def note_applied(self, replica: str, position: Any) -> None:
        """Record that ``replica`` has applied ``position``."""
        backend = self.positions
        assert backend is not None
        with self._applied_lock:
            known = self._applied.get(replica)
            self._applied[replica] = position if known is None else backend.merge(known, position)

    # -- the replicas a read may use ----------------------------------------------------

    def _preference(self, sticky_key: bytes | None) -> tuple[RoutedEngine, ...]:
        """Every replica, in a read's order of preference: those in the app's
        zone first, then the others, each group in the sticky key's
        rendezvous order, or without a key, round robin (each read starts at
        the next replica; :func:`~sqlalchemy_replicas.zones.preference`).
        Before the lag monitor's first check of each, waits for it up to
        wait_timeout (as a causal wait would)."""
        if sticky_key is None:
            order = self._rotations[next(self._next_replica) % len(self._rotations)]
        else:
            found = self._sticky_orders.get(sticky_key)
            if found is None:
                found = tuple(
                    self.replica_targets[i]
                    for i in zones.preference(
                        self.replica_names, self._weights, self._local, key=sticky_key
                    )
                )
                if len(self._sticky_orders) >= _STICKY_ORDERS_KEPT:
                    # Bounded: the app's users are unbounded. Clearing all is
                    # cheap, and the active users' orders come straight back.
                    self._sticky_orders.clear()
                self._sticky_orders[sticky_key] = found
            order = found
        monitor = self._monitor or self.ensure_monitor()
        if monitor is not None and not monitor.all_checked and self.wait_timeout > 0:
            # Not yet known to replicate from this primary: give the monitor's
            # first check up to wait_timeout, as a causal wait would get.
            call_blocking(monitor.await_first_checks, [r.name for r in order], self.wait_timeout)
        return order

    def replica_order(
        self, sticky_key: bytes | None, *, max_lag: float | None = None
    ) -> list[RoutedEngine]:
        """The replicas that may serve a read, in order of preference (see
        :meth:`replica_snapshot`). Left out: replicas the lag monitor
        excludes (over ``max_lag`` or unreachable) and, with ``max_lag``,
        those not measured within it.
        """
        if not self.replica_targets:
            return []
        order = self._preference(sticky_key)
        monitor = self._monitor
        if monitor is None:
            return list(order) if max_lag is None else []
        return [r for r in order if monitor.may_serve(r.name, max_lag, self.ignore_lag)]

    def replica_snapshot(self, sticky_key: bytes | None) -> list[ReplicaState]:
        """Every replica as a routing plan sees it (:mod:`~sqlalchemy_replicas.plan`),
        in the read's order of preference: the sticky key's rendezvous order,
        or without a key, round robin. No I/O, but before the lag monitor
        has checked each replica once it waits for that up to wait_timeout."""
        if not self.replica_targets:
            return []
        order = self._preference(sticky_key)
        monitor = self._monitor
        applied = self._applied
        failures = self._wait_failures
        ignore_lag = self.ignore_lag
        states = []
        for replica in order:
            name = replica.name
            if monitor is None:
                may_serve, reachable, lag, exact, lacking_for = True, True, None, False, None
            else:
                may_serve, reachable, lag, exact, lacking_for = monitor.state(name, ignore_lag)
            states.append(
                ReplicaState(
                    name,
                    may_serve,
                    reachable,
                    applied.get(name),
                    lag,
                    exact,
                    self.wait_failure(name) if name in failures else None,
                    lacking_for,
                )
            )
        return states

    # -- health -------------------------------------------------------------------------

    def mark_down(self, replica: RoutedEngine, error: BaseException) -> None:
        """``replica`` lost a connection (or refused one): no reads go there
        until the lag monitor's probe, spaced by an exponential backoff
        (1 s to 30 s), gets through."""
        monitor = self.ensure_monitor()
        if monitor is not None:
            monitor.mark_down(replica.name, error)

    def down_since(self, name: str) -> Callable[[], float | None]:
        """A function telling since when replica ``name`` is marked down
        (None: it is not), for a pool listener: it must not keep the
        cluster alive, so it holds it weakly."""
        cluster_ref = weakref.ref(self)

        def down_since() -> float | None:
            cluster = cluster_ref()
            monitor = None if cluster is None else cluster._monitor
            return None if monitor is None else monitor.down_since(name)

        return down_since

    @property
    def monitor(self) -> LagMonitor | None:
        """The lag monitor, if it runs (no I/O: it is not started)."""
        return self._monitor

    def ensure_monitor(self) -> LagMonitor | None:
        """The lag monitor, started at the first call (None for a database
        without replication positions, or without replicas)."""
        if self._monitor is None and self.replica_targets:
            with self._monitor_lock:
                if self._monitor is None and (self.positions is not None or self.positions_pending):
                    self._monitor = LagMonitor(self, self.lag_check_interval)
                    self._monitor.start()
        return self._monitor

    def stop_monitor(self) -> None:
        """Stop the lag monitor, if it runs."""
        with self._monitor_lock:
            if self._monitor is not None:
                self._monitor.stop()
                self._monitor = None

    def status(self) -> list[ReplicaStatus]:
        """Each replica as the lag monitor last saw it (see the router's
        ``status()``). Starts the monitor if it is not running."""
        monitor = self.ensure_monitor()
        if monitor is None:
            return [
                ReplicaStatus(
                    r.name,
                    r.safe_url,
                    None,
                    None,
                    None,
                    "no replication positions",
                    pool_full_skips=self.pool_full_skips(r.name),
                    zone=self.replica_zones.get(r.name),
                )
                for r in self.replica_targets
            ]
        return monitor.status(self)


def server_kind_unknown(engine: Engine) -> bool:
    """A MySQL-dialect engine not connected yet: MySQL or MariaDB is unknown
    (a ``mariadb://`` URL says so; the first connection sets the version)."""
    dialect = engine.dialect
    return dialect.name == "mysql" and getattr(dialect, "server_version_info", None) is None


#: How many sticky keys' orders of preference a cluster keeps.
_STICKY_ORDERS_KEPT = 10_000


def _round_robin_orders(
    replicas: tuple[RoutedEngine, ...], weights: tuple[float, ...], local: tuple[bool, ...]
) -> tuple[tuple[RoutedEngine, ...], ...]:
    """The keyless orders of preference, one per turn of their cycle: each zone
    group rotates with its own size, so the orders repeat after the least
    common multiple of the two sizes (1 turn without replicas)."""
    names = [r.name for r in replicas]
    near = sum(local)
    cycle = max(1, math.lcm(near or 1, (len(replicas) - near) or 1))
    return tuple(
        tuple(replicas[i] for i in zones.preference(names, weights, local, key=None, turn=turn))
        for turn in range(cycle)
    )
