"""Replica lag monitor: how far behind each replica is, measured by position.

Every ``lag_check_interval`` a background thread samples the primary's
position and each replica's applied position. A replica's lag is the time
since the newest primary sample it has applied: an upper bound, exact to
within one check interval, the same for every backend, and correct for an
idle primary (nothing to apply, no lag). A replica lagging more than
``max_lag`` (or unreachable) is left out of reads until it is back under
``max_lag`` by a margin (hysteresis).

A replica that fails a check, or that a session saw disconnect
(:meth:`LagMonitor.mark_down`), is down: it gets no reads and is checked
again only as its :class:`~sqlalchemy_replicas.breaker.Breaker` allows (1 s,
then doubling up to 30 s); the first check that gets through readmits it.

Each check is one query, run in a thread of its own with a timeout, so a
server that never answers is counted unreachable without stalling the
checks of the others. The monitor uses engines of its own (so its queries
never appear in the application's pools or events), AUTOCOMMIT, with the
sync driver even for async routers.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError

from .breaker import Breaker

if TYPE_CHECKING:
    from .positions import PositionBackend
    from .router import ReplicaRouter, RoutedEngine

__all__ = ["LagEstimator", "LagMonitor", "ReplicaStatus"]

logger = logging.getLogger("sqlalchemy_replicas.monitor")
_R = TypeVar("_R")

#: A left-out replica is readmitted once its lag is below max_lag times this.
READMIT_FRACTION: Final = 0.8
_SYNC_DRIVERS: Final = {
    "psycopg_async": "psycopg",
    "asyncpg": "psycopg",
    "aiomysql": "pymysql",
    "asyncmy": "pymysql",
}


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """One replica as the monitor last saw it.

    :ivar name: the replica's name.
    :ivar url: its URL, without the password.
    :ivar healthy: True when it gets reads (reachable, within ``max_lag``);
        None before the first check.
    :ivar lag_seconds: measured lag (an upper bound), None when unknown.
    :ivar position: the position it had applied at the last check (text).
    :ivar reason: why it gets no reads, when it gets none.
    :ivar lag_bytes: PostgreSQL: bytes of WAL it had still to replay at the
        last check (None elsewhere, or when unknown).
    :ivar lag_transactions: MariaDB/MySQL: transactions it had still to
        apply at the last check (None elsewhere, or when unknown).
    :ivar pool_full_skips: reads that went elsewhere (the next replica that
        qualified, or the primary) because its connection pool had no free
        connection, since the router started.
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


class LagEstimator:
    """Lag from a timeline of the primary's positions (pure, no I/O).

    :param reached: the backend's ``reached(applied, target)``.
    :param horizon: seconds of primary samples to keep.
    """

    def __init__(self, reached: Callable[[Any, Any], bool], horizon: float) -> None:
        self._reached = reached
        self._horizon = horizon
        self._samples: deque[tuple[float, Any]] = deque()

    def record_primary(self, when: float, position: Any) -> None:
        """The primary was at ``position`` at monotonic time ``when``."""
        self._samples.append((when, position))
        while self._samples and when - self._samples[0][0] > self._horizon:
            self._samples.popleft()

    def lag(self, applied: Any, now: float) -> tuple[float, bool]:
        """Seconds since the newest primary sample ``applied`` has reached (0
        when it has reached the latest one), and whether that is exact to a
        check interval. When it has reached no sample kept, the time since
        the oldest one is only a lower bound."""
        for when, position in reversed(self._samples):
            if self._reached(applied, position):
                return (0.0 if when == self._samples[-1][0] else max(0.0, now - when)), True
        if not self._samples:
            return 0.0, False
        return max(0.0, now - self._samples[0][0]), False


class _StillRunning(Exception):
    """A server's previous check is still waiting for its answer."""


class _Check:
    """One query on one server, in a thread of its own, so that a server that
    never answers costs a thread, not the monitor."""

    def __init__(self, question: Callable[[], Any], timeout: float) -> None:
        self._question = question
        self._timeout = timeout
        self._answer: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

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
            self._error = error


@dataclass
class _Health:
    # Left out for lag (or not replicating); being down is the breaker's.
    excluded: bool = False
    breaker: Breaker = field(default_factory=Breaker)
    checked: bool = False
    lag: float | None = None
    # False while the lag is only a lower bound (not reached any kept sample).
    lag_exact: bool = False
    position: Any | None = None
    reason: str | None = None
    # How much it had still to apply at the last check (backend.behind_unit).
    behind: int | None = None


class LagMonitor:
    """The background checks of one router's replicas.

    :param router: the router whose replicas to watch.
    :param interval: seconds between checks.
    """

    def __init__(self, router: ReplicaRouter[Any], interval: float) -> None:
        # Weak: a router the application dropped without dispose() is collected,
        # and then this thread ends by itself.
        self._router_ref = weakref.ref(router)
        self._name = router.name
        self._interval = interval
        self._health = {r.name: _Health() for r in router.replica_targets}
        self._estimator: LagEstimator | None = None
        self._engines: dict[str, Engine] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"sqlalchemy-replicas-monitor-{router.name}", daemon=True
        )
        self._all_out_logged = False
        self._primary_down_logged = False
        #: Seconds a check may take (connect included) before its server
        #: counts as unreachable.
        self.check_timeout = check_timeout(interval)
        # Server name -> its check still waiting for an answer.
        self._in_flight: dict[str, _Check] = {}

    def start(self) -> None:
        """Start checking in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop checking and close the monitor's own connections."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        for engine in self._engines.values():
            engine.dispose()

    def may_serve(self, name: str, max_lag: float | None, ignore_lag: bool) -> bool:
        """Whether replica ``name`` may serve a read: not left out (unless only
        for lag and ``ignore_lag``), and with ``max_lag``, measured within it."""
        health = self._health[name]
        if health.breaker.down:
            return False
        if max_lag is not None:
            return health.lag is not None and health.lag_exact and health.lag <= max_lag
        if not health.excluded:
            return True
        return ignore_lag and health.lag is not None

    def status(self, router: ReplicaRouter[Any]) -> list[ReplicaStatus]:
        """Every replica of ``router`` (the one this monitor watches) as last seen."""
        backend = router.positions
        result = []
        for replica in router.replica_targets:
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
                    (not health.excluded and not health.breaker.down) if health.checked else None,
                    health.lag,
                    position,
                    health.reason,
                    lag_bytes=health.behind if unit == "bytes" else None,
                    lag_transactions=health.behind if unit == "transactions" else None,
                    pool_full_skips=router.pool_full_skips(replica.name),
                )
            )
        return result

    def down_since(self, name: str) -> float | None:
        """When (``time.monotonic()``) replica ``name`` last went down, or None."""
        return self._health[name].breaker.down_since

    def mark_down(self, name: str, error: BaseException) -> None:
        """A session lost (or could not open) a connection to replica ``name``:
        no reads go there until a probe gets through."""
        health = self._health[name]
        with self._lock:
            tripped = health.breaker.trip(time.monotonic())
            if tripped:
                health.checked = True
                health.reason = f"disconnected: {_describe_error(error)}"
        if tripped:
            logger.warning(
                "replica %s is down (%s); no reads go there until a probe succeeds",
                name,
                _describe_error(error),
            )

    def check_once(self, router: ReplicaRouter[Any]) -> None:
        """Sample the primary, then every replica that is due (in parallel);
        update lags and exclusions. Each query gets :attr:`check_timeout`
        seconds: a server that accepts connections but answers nothing (a
        paused VM, a black-holed host) counts as unreachable, and cannot
        stall the checks of the others."""
        self._in_flight = {n: c for n, c in self._in_flight.items() if c.is_alive()}
        backend = router.positions
        if backend is None and router.positions_pending:
            backend = self._learn_positions(router)
        if backend is None:
            return
        if self._estimator is None:
            horizon = max(10.0, 3 * router.max_lag)
            self._estimator = LagEstimator(backend.reached, horizon)
        # Again: telling the server kind may just have asked the primary.
        self._in_flight = {n: c for n, c in self._in_flight.items() if c.is_alive()}
        primary = router.primary_target
        primary_position = None
        try:
            check = self._start(
                primary.name, functools.partial(self._ask, router, primary, backend.current)
            )
            primary_position = check.result(self.check_timeout)
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
            self._estimator.record_primary(time.monotonic(), primary_position)
        now = time.monotonic()
        due = [
            replica
            for replica in router.replica_targets
            if self._health[replica.name].breaker.probe_due(now)
        ]
        checks = {}
        for replica in due:
            try:
                checks[replica.name] = self._start(
                    replica.name, functools.partial(self._ask, router, replica, backend.applied)
                )
            except _StillRunning as error:
                self._check_failed(replica, error)
        deadline = time.monotonic() + self.check_timeout
        for replica in due:
            if replica.name not in checks:
                continue
            try:
                applied = checks[replica.name].result(deadline - time.monotonic())
            except Exception as error:
                self._check_failed(replica, error)
            else:
                self._check_succeeded(router, replica, applied, primary_position)
        self._log_when_all_out()

    def _learn_positions(self, router: ReplicaRouter) -> PositionBackend | None:
        """MySQL or MariaDB? An async router cannot connect outside its event
        loop: this thread's own sync connection to the primary tells (None
        while the primary is unreachable; the next round asks again)."""
        primary = router.primary_target
        try:
            check = self._start(
                primary.name,
                functools.partial(self._ask, router, primary, lambda conn: conn.engine),
            )
            engine = check.result(self.check_timeout)
        except Exception as error:
            logger.debug("lag check: the primary's server kind is unknown yet: %s", error)
            return None
        return router.learn_positions(engine)

    def _start(self, name: str, question: Callable[[], Any]) -> _Check:
        if name in self._in_flight:
            raise _StillRunning("the previous check has not answered yet")
        check = _Check(question, self.check_timeout)
        self._in_flight[name] = check
        return check

    def _check_failed(self, replica: RoutedEngine, error: BaseException) -> None:
        health = self._health[replica.name]
        with self._lock:
            tripped = health.breaker.check_failed(time.monotonic())
            health.checked, health.lag, health.lag_exact = True, None, False
            health.behind = None
            health.reason = f"unreachable: {_describe_error(error)}"
        if tripped:
            logger.warning(
                "replica %s is unreachable (%s); no reads go there until a probe succeeds",
                replica.name,
                _describe_error(error),
            )

    def _check_succeeded(
        self,
        router: ReplicaRouter[Any],
        replica: RoutedEngine,
        applied: Any | None,
        primary_position: Any | None,
    ) -> None:
        backend = router.positions
        assert backend is not None
        assert self._estimator is not None
        health = self._health[replica.name]
        with self._lock:
            came_back = health.breaker.succeed()
        if came_back:
            logger.info("replica %s is reachable again; its lag decides its reads", replica.name)
        if applied is None:
            with self._lock:
                health.checked, health.lag, health.excluded = True, None, True
                health.reason = "not replicating (no applied position)"
            return
        lag, exact = self._estimator.lag(applied, time.monotonic())
        router.note_applied(replica.name, applied)
        behind = None if primary_position is None else backend.behind(primary_position, applied)
        with self._lock:
            health.checked, health.lag, health.lag_exact = True, lag, exact
            health.position, health.behind = applied, behind
            if lag > router.max_lag:
                health.excluded = True
                health.reason = f"lag {lag:.1f}s > max_lag {router.max_lag}s"
            elif not health.excluded or lag <= router.max_lag * READMIT_FRACTION:
                health.excluded = False
                health.reason = None
            elif came_back:
                health.reason = f"lag {lag:.1f}s, not yet under {READMIT_FRACTION} * max_lag"

    def _log_when_all_out(self) -> None:
        all_out = all(h.excluded or h.breaker.down for h in self._health.values())
        if all_out and not self._all_out_logged:
            logger.warning(
                "no replica of %s qualifies (lagging or unreachable): reads go to the primary",
                self._name,
            )
        self._all_out_logged = all_out

    def _ask(
        self, router: ReplicaRouter[Any], target: RoutedEngine, question: Callable[[Connection], _R]
    ) -> _R:
        """One query on ``target``. A pooled connection that broke since the
        last check (the server restarted) is replaced and the query asked
        once more: a check costs one query, not a ping and a query."""
        engine = self._engine(router, target)
        try:
            with engine.connect() as conn:
                return question(conn)
        except DBAPIError as error:
            if not error.connection_invalidated:
                raise
        with engine.connect() as conn:
            return question(conn)

    def _engine(self, router: ReplicaRouter[Any], target: RoutedEngine) -> Engine:
        engine = self._engines.get(target.name)
        if engine is None:
            url = _sync_url(target.sync_engine.url)
            # AUTOCOMMIT, no ROLLBACK on return: a check is one round trip.
            engine = create_engine(
                url,
                pool_size=1,
                max_overflow=0,
                isolation_level="AUTOCOMMIT",
                skip_autocommit_rollback=True,
                connect_args=_connect_timeout(url, self._interval),
            )
            if target is router.primary_target:
                router.install_discovery(engine)
            self._engines[target.name] = engine
        return engine

    def _run(self) -> None:
        while not self._stop.is_set():
            router = self._router_ref()
            if router is None:
                break
            try:
                self.check_once(router)
            except Exception:  # never let the thread die; the next round retries
                logger.exception("lag check failed")
            del router  # hold no reference while sleeping
            self._stop.wait(self._interval)
        for engine in self._engines.values():
            engine.dispose()


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


def _describe_error(error: BaseException) -> str:
    """One line naming the error: the driver's exception, not SQLAlchemy's wrapper."""
    orig = getattr(error, "orig", None) or error
    text = " ".join(str(orig).split())
    return f"{type(orig).__name__}: {text[:200]}"


def _sync_url(url: URL) -> URL:
    """The same server through the sync driver of its dialect."""
    backend, _, driver = url.drivername.partition("+")
    sync_driver = _SYNC_DRIVERS.get(driver)
    return url.set(drivername=f"{backend}+{sync_driver}") if sync_driver else url
