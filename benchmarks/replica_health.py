"""How fast reads move away from a sick replica, and what watching costs.

Against a real topology (two replicas), for each of several
``lag_check_interval`` values:

- **lag spike**: replica1's replay is paused while the primary commits
  every 20 ms; reported is the time from the pause to the first read of a
  sticky key preferring replica1 that goes elsewhere. Its lag passes
  ``max_lag`` ``max_lag`` seconds after the last primary sample it applied
  (up to one interval before the pause), so the target is at most
  ``max_lag`` plus one check interval plus one check.
- **kill**: replica1 is SIGKILLed under the same read loop; reported is the
  time from the kill to the first read served elsewhere, and how many reads
  failed (the target is zero).
- **monitor load**: statements the lag monitor sends to each replica per
  second over an idle stretch, and new connections it opens. Target: at most
  one lightweight query per replica per interval.

    python benchmarks/replica_health.py [--backend postgresql|mariadb]
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import MariaDBTopology, PostgresTopology, Topology, wait_until

MAX_LAG = 1.0
INTERVALS = (0.25, 0.5, 1.0)
IDLE_SECONDS = 10.0


def key_preferring(router: sr.ReplicaRouter, name: str) -> bytes:
    for n in range(1000):
        key = str(n).encode()
        if router.cluster.replica_order(key)[0].name == name:
            return key
    raise AssertionError(name)


class Reader:
    """Reads with a sticky key in a loop (eventual consistency, a session per
    read, like requests do); notes where each read ran and which failed."""

    def __init__(self, router: sr.ReplicaRouter, key: bytes) -> None:
        self.router = router
        self.key = key
        self.failures = 0
        self.moved_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._since = float("inf")
        self._last_node = "?"
        self._listeners = []
        for target in (router.primary_target, *router.replica_targets):

            def ran(*args: Any, _name: str = target.name) -> None:
                self._last_node = _name

            event.listen(target.sync_engine, "before_cursor_execute", ran)
            self._listeners.append((target.sync_engine, ran))

    def watch_from(self, when: float) -> None:
        """Record the first read after ``when`` that did not run on replica1."""
        self.moved_at = None
        self._since = when

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for engine, listener in self._listeners:
            event.remove(engine, "before_cursor_execute", listener)

    def _run(self) -> None:
        make = self.router.sessionmaker()
        while not self._stop.is_set():
            try:
                with sr.sticky(self.key), sr.consistency("eventual"), make() as session:
                    session.execute(sa.text("SELECT 1 AS probe"))
                    node = self._last_node
                done = time.monotonic()
                if self.moved_at is None and done > self._since and node != "replica1":
                    self.moved_at = done
            except Exception:
                self.failures += 1
            time.sleep(0.002)


def lag_spike(topology: Topology, interval: float) -> float:
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls, max_lag=MAX_LAG, lag_check_interval=interval
    )
    stop = threading.Event()

    def writer() -> None:
        engine = sa.create_engine(topology.primary_url)
        n = 0
        while not stop.is_set():
            n += 1
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO tick (id) VALUES (:n)"), {"n": n})
            time.sleep(0.02)
        engine.dispose()

    writing = threading.Thread(target=writer)
    try:
        wait_until(lambda: all(s.healthy for s in router.status()), timeout=20, what="healthy")
        writing.start()
        with Reader(router, key_preferring(router, "replica1")) as reader:
            time.sleep(2 * interval)  # settle into the steady state
            paused_at = time.monotonic()
            topology.pause_replay(0)
            reader.watch_from(paused_at)
            wait_until(lambda: reader.moved_at is not None, timeout=30, what="reads to move")
            assert reader.moved_at is not None
            return reader.moved_at - paused_at
    finally:
        stop.set()
        writing.join()
        router.dispose()
        topology.reset()
        _create_tick(topology)


def kill(topology: Topology, interval: float) -> tuple[float, int]:
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls, max_lag=MAX_LAG, lag_check_interval=interval
    )
    try:
        wait_until(lambda: all(s.healthy for s in router.status()), timeout=20, what="healthy")
        with Reader(router, key_preferring(router, "replica1")) as reader:
            time.sleep(2 * interval)
            killed_at = time.monotonic()
            topology.kill_replica(0)
            reader.watch_from(killed_at)
            wait_until(lambda: reader.moved_at is not None, timeout=30, what="reads to move")
            assert reader.moved_at is not None
            return reader.moved_at - killed_at, reader.failures
    finally:
        router.dispose()
        topology.reset()
        _create_tick(topology)


def monitor_load(topology: Topology, interval: float) -> tuple[dict[str, float], dict[str, int]]:
    names_and_urls = zip(topology.replica_names, topology.replica_urls, strict=True)
    ports = {url.port: name for name, url in names_and_urls}
    statements: Counter[str] = Counter()
    connects: Counter[str] = Counter()

    def on_statement(conn: Any, *args: Any) -> None:
        name = ports.get(conn.engine.url.port)
        if name:
            statements[name] += 1

    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls, lag_check_interval=interval
    )

    def on_checkout(conn: Any) -> None:
        name = ports.get(conn.engine.url.port)
        if name:
            connects[name] += 1

    event.listen(Engine, "before_cursor_execute", on_statement)
    event.listen(Engine, "engine_connect", on_checkout)
    try:
        router.status()  # starts the monitor; the application sends nothing
        time.sleep(IDLE_SECONDS)
        snapshot = dict(statements)
        opened = dict(connects)
    finally:
        event.remove(Engine, "before_cursor_execute", on_statement)
        event.remove(Engine, "engine_connect", on_checkout)
        router.dispose()
    return {name: snapshot.get(name, 0) / IDLE_SECONDS for name in ports.values()}, opened


def _create_tick(topology: Topology) -> None:
    engine = sa.create_engine(topology.primary_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS tick (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    topology.wait_for_catchup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("postgresql", "mariadb"), default="postgresql")
    args = parser.parse_args()
    # The library's warnings (replica down, read rerun) would interleave the table.
    logging.getLogger("sqlalchemy_replicas").setLevel(logging.ERROR)
    topology_class = PostgresTopology if args.backend == "postgresql" else MariaDBTopology
    with topology_class(replicas=2) as topology:
        _create_tick(topology)
        print(f"{topology.server_version()}, max_lag {MAX_LAG}s")
        print("interval | lag spike: moved after pause (bound) | kill: moved after, failed reads")
        for interval in INTERVALS:
            spike = lag_spike(topology, interval)
            moved, failed = kill(topology, interval)
            print(
                f"{interval:7.2f}s | {spike * 1000:6.0f} ms ({(MAX_LAG + interval) * 1000:.0f} ms "
                "+ one check) "
                f"| {moved * 1000:6.0f} ms, {failed} failed"
            )
        print(f"monitor load over {IDLE_SECONDS:.0f} s idle:")
        for interval in INTERVALS:
            per_second, opened = monitor_load(topology, interval)
            rates = ", ".join(f"{n} {q:.2f}/s" for n, q in sorted(per_second.items()))
            print(
                f"  interval {interval:4.2f}s: statements per replica {rates} "
                f"(1/interval = {1 / interval:.2f}); connections checked out {opened}"
            )


if __name__ == "__main__":
    main()
