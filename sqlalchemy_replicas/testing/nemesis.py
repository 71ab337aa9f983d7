"""The nemesis: a schedule of real faults against a topology while clients run.

One fault at a time, in a background thread: wait a random gap, inject the
next fault from a shuffled deck of the enabled kinds (so a short run sees
every kind), keep it for a random duration, heal it,
record it in the :class:`~.history.History`. :meth:`Nemesis.stop` heals
whatever is in force and then everything the topology can be healed of, so
the run ends on a healthy topology.

The schedule is timed on purpose (faults arrive at random moments of the
workload); healing waits on real conditions (a restarted replica replicates
again, see :meth:`~.Topology.start_replica`).

Does I/O: server signals and admin queries through the topology, and
connection checkouts for pool exhaustion.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from sqlalchemy.engine import Engine

from .history import Fault, History

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

    from ._topology import Topology

__all__ = ["FAULTS", "AsyncPoolHolder", "Nemesis", "PoolHolder", "SyncPoolHolder", "heal_all"]

#: Every fault kind, in the order reports list them.
FAULTS: Final[tuple[str, ...]] = (
    "pause_replay",
    "apply_delay",
    "kill_replica",
    "freeze_replica",
    "restart_primary",
    "exhaust_pool",
)


class PoolHolder(Protocol):
    """Something whose connection pool the nemesis can exhaust."""

    #: Shown in reports, e.g. ``sync:replica1``.
    name: str

    def hold(self) -> Callable[[], None]:
        """Check out every connection the pool allows; return what gives them back."""
        ...


def _pool_capacity(engine: Engine) -> int:
    """Connections a pool hands out at most (0: unbounded or unknown)."""
    pool = engine.pool
    size = getattr(pool, "size", None)
    overflow = getattr(pool, "_max_overflow", None)
    if not callable(size) or not isinstance(overflow, int) or overflow < 0:
        return 0
    return int(size()) + overflow


class SyncPoolHolder:
    """Holds all connections of a sync engine's pool.

    Checkouts that time out (clients hold the rest) or fail (the server is
    down) end the grab: what could be held is held.
    """

    def __init__(self, name: str, engine: Engine) -> None:
        self.name = name
        self._engine = engine

    def hold(self) -> Callable[[], None]:
        held = []
        for _ in range(_pool_capacity(self._engine)):
            try:
                held.append(self._engine.connect())
            except Exception:
                break

        def release() -> None:
            for connection in held:
                connection.close()

        return release


class AsyncPoolHolder:
    """Holds all connections of an async engine's pool, on its event loop."""

    def __init__(self, name: str, engine: AsyncEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self._engine = engine
        self._loop = loop

    def hold(self) -> Callable[[], None]:
        async def grab() -> list[AsyncConnection]:
            held = []
            for _ in range(_pool_capacity(self._engine.sync_engine)):
                try:
                    held.append(await self._engine.connect())
                except Exception:
                    break
            return held

        held = asyncio.run_coroutine_threadsafe(grab(), self._loop).result(timeout=60)

        async def give_back() -> None:
            for connection in held:
                await connection.close()

        def release() -> None:
            asyncio.run_coroutine_threadsafe(give_back(), self._loop).result(timeout=60)

        return release


class Nemesis:
    """Injects random faults into ``topology`` until stopped, then heals all.

    :param topology: a started topology.
    :param history: where each fault is recorded.
    :param faults: the fault kinds to choose from (see :data:`FAULTS`):
        ``pause_replay`` (a replica stops applying), ``apply_delay`` (a replica
        applies each change ``apply_delay`` seconds late), ``kill_replica``
        (crash, then restart), ``freeze_replica`` (SIGSTOP, then SIGCONT),
        ``restart_primary`` (crash the primary, then restart it),
        ``exhaust_pool`` (hold every connection of one of ``pools``).
    :param pools: pools ``exhaust_pool`` may pick from.
    :param duration: (min, max) seconds a fault stays in force.
    :param gap: (min, max) seconds between faults.
    :param apply_delay: the delay ``apply_delay`` sets, seconds.
    :param seed: seeds the schedule.
    """

    def __init__(
        self,
        topology: Topology,
        history: History,
        *,
        faults: Sequence[str] = FAULTS,
        pools: Sequence[PoolHolder] = (),
        duration: tuple[float, float] = (0.5, 2.0),
        gap: tuple[float, float] = (0.2, 1.0),
        apply_delay: float = 1.0,
        seed: int | None = None,
    ) -> None:
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault kinds {unknown}; choose from {list(FAULTS)}")
        self.faults = [
            f
            for f in faults
            if (f != "exhaust_pool" or pools)
            and (f == "restart_primary" or f == "exhaust_pool" or topology.replica_count)
        ]
        self._topology = topology
        self._history = history
        self._pools = list(pools)
        self._duration = duration
        self._gap = gap
        self._apply_delay = apply_delay
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Errors from injecting or healing, as ``label: error``.
        self.errors: list[str] = []

    def start(self) -> None:
        """Start injecting faults in a background thread."""
        if not self.faults:
            return
        self._thread = threading.Thread(target=self._run, name="nemesis", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Heal the fault in force, stop, then heal everything (:func:`heal_all`)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            heal_all(self._topology)
        except Exception as error:
            self.errors.append(f"heal_all: {type(error).__name__}: {error}")

    def _run(self) -> None:
        deck: list[str] = []
        while not self._stop.wait(self._rng.uniform(*self._gap)):
            if not deck:
                deck = list(self.faults)
                self._rng.shuffle(deck)
            self.inject_one(deck.pop())

    def inject_one(self, kind: str) -> Fault:
        """Inject ``kind``, keep it for a random duration (or until stopped),
        heal it; record and return the fault."""
        target, inject, heal = self._plan(kind)
        start = time.monotonic()
        errors: list[str] = []
        healer: Callable[[], None] | None = None
        try:
            healer = inject()
        except Exception as error:
            errors.append(f"inject: {type(error).__name__}: {error}")
        try:
            if healer is not None or heal is not None:
                self._stop.wait(self._rng.uniform(*self._duration))
        finally:
            try:
                if healer is not None:
                    healer()
                elif heal is not None:
                    heal()
            except Exception as error:
                errors.append(f"heal: {type(error).__name__}: {error}")
        fault = Fault(kind, target, start, time.monotonic(), "; ".join(errors) or None)
        if fault.error:
            self.errors.append(f"{fault.label}: {fault.error}")
        self._history.add_fault(fault)
        return fault

    def _plan(
        self, kind: str
    ) -> tuple[str, Callable[[], Callable[[], None] | None], Callable[[], None] | None]:
        """``(target, inject, heal)`` for ``kind``; ``inject`` may return its own
        healer (then ``heal`` is unused) and ``heal`` runs also when injecting
        failed half-way."""
        top = self._topology
        if kind == "exhaust_pool":
            pool = self._rng.choice(self._pools)
            return pool.name, pool.hold, None
        if kind == "restart_primary":
            return "primary", _call(top.kill_primary), top.start_primary
        index = self._rng.randrange(top.replica_count)
        name = top.replica_names[index]
        if kind == "pause_replay":
            return name, _call(top.pause_replay, index), lambda: top.resume_replay(index)
        if kind == "apply_delay":
            return (
                name,
                _call(top.set_apply_delay, index, self._apply_delay),
                lambda: top.set_apply_delay(index, 0),
            )
        if kind == "kill_replica":
            return name, _call(top.kill_replica, index), lambda: top.start_replica(index)
        return name, _call(top.freeze_replica, index), lambda: top.thaw_replica(index)


def _call(fn: Callable[..., Any], *args: Any) -> Callable[[], None]:
    def run() -> None:
        fn(*args)

    return run


def heal_all(topology: Topology) -> None:
    """Undo every fault a nemesis can inject, keeping the data: thaw, start
    what is down (the primary first), remove apply delays, resume replay."""
    for index in range(topology.replica_count):
        topology.thaw_replica(index)
    if not topology.is_running():
        topology.start_primary()
    for index in range(topology.replica_count):
        if not topology.is_running(index):
            topology.start_replica(index)
        topology.set_apply_delay(index, 0)
        topology.resume_replay(index)
