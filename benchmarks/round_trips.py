"""Read-your-writes and commits on loopback and through an emulated network, side by side.

The "Done when" figures of issue #13, for each backend (PostgreSQL streaming
standbys, MariaDB GTID replicas; two replicas, no apply delay), in one run:
on loopback, and with every connection (primary and replicas, the router's
and the baselines', the lag monitor's too) going through
:mod:`benchmarks.netproxy`, which adds ``--rtt-ms`` per round trip (0.5 ms:
0.25 ms each way, as within a datacenter). Replication itself (standby to
primary) is not delayed: the replicas apply as fast as on loopback.

Each request is a user's write then a read of its own row right after the
commit, two ways, in shuffled order (so both see the same machine load):

- ``ours``: this library's default (``read_your_writes``): the write and
  its commit through a ``RoutingSession``, the read in a new one;
- ``naive``: naive read/write splitting: the write through a plain
  ``sqlalchemy.orm.Session`` on the primary, the read in a new
  ``RoutingSession`` under ``sr.consistency("eventual")`` (any replica, no
  position, no wait: it may be stale, which is counted).

Reported per backend, a column per network:

- **read after write**: p50/p90 of the read (from the read's call to its
  rows: pool checkout, routing, any wait, the read), ours against naive,
  and the ratio of p50s (goal: <= 1.1x through the network);
- **commit**: p50 of ``session.commit()`` of a ``RoutingSession`` against a
  plain Session's on the same primary (goal: <= 1.05x through the network);
- **client CPU**: p50 of the benchmark thread's own CPU over the same
  commit and read, ours against naive (steadier than wall times on a
  shared machine; what the library adds without the servers' share);
- **per write-then-read**: round trips, counted by the proxy on the
  application's own connections (the times a client spoke after the server
  answered, so statements pipelined together count once), split into the
  write (UPDATE and COMMIT) and the read; and the statements sent, counted
  with engine events: the application's, the library's position queries
  (the commit's position, a replica's applied position) and its causal
  waits. Work that makes the commit's position or the wait travel in the
  commit's or the read's own round trip shows as fewer round trips;
- **routing CPU per statement** (loopback: the client's CPU does not
  depend on the network; the proxy's thread would count in it): the same
  measurement as ``benchmarks/overhead.py`` (its ``measure()``), a plain
  Session against a ``RoutingSession`` reading a replica (router scope), in
  shuffled rounds (goal: <= 1.05x);
- on MariaDB, a third column: through the network with the replicas'
  connections allowing several statements (``?client_flag=65536``, the
  opt-in docs/round-trips.md describes), so the causal wait travels with
  the read;
- **flapping replicas**: ``benchmarks/wait_budget.py``'s flapping scenario
  (one of the two replicas paused, swapping every third request; its worker
  process, reads right after a commit), loopback and through the network:
  the share of reads replicas served, stale reads, the slowest read.

The routers are started (start position, first lag checks) and warmed up
before anything is timed. The proxy's self-check runs first and prints the
round trip it really adds.

    python benchmarks/round_trips.py [--backend postgresql|mariadb|both]
        [--requests 300] [--rtt-ms 0.5]

``--rtt-ms 0`` measures loopback only. A default run takes under a minute for both
backends. Compare ratios within one run: on a shared machine
absolute figures move from run to run.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import sys
import time
from collections import Counter as Tally
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pymysql.constants.CLIENT import MULTI_STATEMENTS
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import MariaDBTopology, PostgresTopology, Topology, wait_until

# The sibling benchmarks this one reuses, importable as the package they are in.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import netproxy, overhead, wait_budget

USERS = 8
WARM_UP = 20
CPU_ROUNDS = 7
CPU_STATEMENTS = 400
FLAPPING_REQUESTS = 60


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "round_trip_counter"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    value: Mapped[int]


def statement_kind(sql: str) -> str:
    """``wait``, ``position`` (the library reading a position) or ``app``."""
    if "RECURSIVE poll" in sql or "MASTER_GTID_WAIT" in sql:
        return "wait"
    if any(
        marker in sql
        for marker in ("pg_current_wal", "pg_last_wal_replay_lsn", "@@last_gtid", "@@gtid_")
    ):
        return "position"
    return "app"


def local_port(dbapi_connection: Any) -> int:
    """The local port of a DBAPI connection's socket (psycopg or PyMySQL)."""
    sock = getattr(dbapi_connection, "_sock", None)  # PyMySQL
    if sock is not None:
        return int(sock.getsockname()[1])
    with socket.socket(fileno=os.dup(dbapi_connection.fileno())) as dup:  # psycopg
        return int(dup.getsockname()[1])


@dataclass
class Way:
    """One way (ours or naive) on one network: its measurements."""

    reads: list[float] = field(default_factory=list)
    commits: list[float] = field(default_factory=list)
    #: The client's CPU (this thread's) over the same spans.
    read_cpu: list[float] = field(default_factory=list)
    commit_cpu: list[float] = field(default_factory=list)
    stale: int = 0
    on_replicas: int = 0
    statements: Tally[str] = field(default_factory=Tally)
    write_trips: int = 0
    read_trips: int = 0


class Mode:
    """A router and a plain engine on one network (loopback or the proxy)."""

    def __init__(self, name: str, primary: URL, replicas: list[URL], net: Any) -> None:
        self.name = name
        self.net: netproxy.Network | None = net
        self.router = sr.ReplicaRouter(primary, replicas, wait_timeout=0.5)
        self.plain = sa.create_engine(primary)
        self.make = self.router.sessionmaker()
        self.ways = {"ours": Way(), "naive": Way()}
        self.ports: set[int] = set()
        #: The way whose statements are being counted (None: not counted).
        self.counting: Way | None = None
        self._last_node = ""
        targets = [self.router.primary_target, *self.router.replica_targets]
        engines = [(t.name, t.sync_engine) for t in targets] + [("primary", self.plain)]
        for node, engine in engines:
            sa.event.listen(engine, "connect", self._connected)
            sa.event.listen(engine, "before_cursor_execute", partial(self._executed, node))

    def _connected(self, dbapi_connection: Any, record: Any) -> None:
        self.ports.add(local_port(dbapi_connection))

    def _executed(self, node: str, conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        if self.counting is not None:
            self.counting.statements[statement_kind(sql)] += 1
        self._last_node = node

    def trips(self) -> int:
        return 0 if self.net is None else self.net.round_trips(self.ports)

    def start(self) -> None:
        self.router.start()
        wait_until(
            lambda: all(s.healthy for s in self.router.status()),
            timeout=60,
            what=f"both replicas serving ({self.name})",
        )

    def request(self, way: str, user: int, written: dict[int, int], timed: bool) -> None:
        """One write then the read of the written row, ``way``'s way."""
        result = self.ways[way]
        self.counting = result if timed else None
        before = self.trips()
        write = sa.update(Counter).where(Counter.id == user).values(value=Counter.value + 1)
        with self.make() if way == "ours" else Session(self.plain) as session:
            session.execute(write)
            cpu_started = time.thread_time()
            started = time.perf_counter()
            session.commit()
            took = time.perf_counter() - started
            commit_cpu = time.thread_time() - cpu_started
        written[user] += 1
        between = self.trips()
        read = sa.select(Counter.value).where(Counter.id == user)
        level = sr.consistency("eventual") if way == "naive" else nullcontext()
        with self.make() as session, level:
            cpu_started = time.thread_time()
            started = time.perf_counter()
            seen = session.scalar(read)
            read_took = time.perf_counter() - started
            read_cpu = time.thread_time() - cpu_started
        self.counting = None
        if timed:
            result.commits.append(took)
            result.reads.append(read_took)
            result.commit_cpu.append(commit_cpu)
            result.read_cpu.append(read_cpu)
            result.stale += seen != written[user]
            result.on_replicas += self._last_node != "primary"
            result.write_trips += between - before
            result.read_trips += self.trips() - between

    def dispose(self) -> None:
        self.router.dispose()
        self.plain.dispose()


def proxied(net: netproxy.Network, url: URL) -> URL:
    assert url.port is not None
    return url.set(port=net.proxy(url.host or "127.0.0.1", url.port))


def p(values: list[float], q: float) -> float:
    """The ``q`` quantile in milliseconds."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def routing_cpu(mode: Mode) -> tuple[float, float]:
    """Median CPU us per statement: plain Session, RoutingSession (replica)."""
    makers: dict[str, Callable[[], Session]] = {
        "plain": sessionmaker(mode.plain),
        "routing": mode.router.sessionmaker(),
    }
    for make in makers.values():
        overhead.measure(make, 100)  # warm up caches, pools, the replicas' positions
    results: dict[str, list[float]] = {name: [] for name in makers}
    order = list(makers)
    for _ in range(CPU_ROUNDS):
        random.shuffle(order)
        for name in order:
            results[name].append(overhead.measure(makers[name], CPU_STATEMENTS))
    return statistics.median(results["plain"]), statistics.median(results["routing"])


def flapping(topology: Topology, urls: tuple[URL, list[URL]]) -> dict[str, Any]:
    """``wait_budget.py``'s flapping scenario on these URLs (this checkout)."""
    topology.reset()
    code = Path(__file__).resolve().parent.parent
    return wait_budget.run_worker(topology, code, "flapping", FLAPPING_REQUESTS, urls=urls)


def bench(topology: Topology, requests: int, net: netproxy.Network | None, rtt_ms: float) -> None:
    with topology:
        primary, replicas = topology.primary_url, list(topology.replica_urls)
        setup = sa.create_engine(primary)
        Base.metadata.create_all(setup)
        overhead.Base.metadata.create_all(setup)
        with Session(setup) as session:
            session.add_all(Counter(id=u, value=0) for u in range(USERS))
            session.add_all(
                overhead.Account(id=i, name=f"user{i}") for i in range(1, overhead.ROWS + 1)
            )
            session.commit()
        setup.dispose()
        topology.wait_for_catchup()
        urls = {"loopback": (primary, replicas)}
        if net is not None:
            urls[f"{rtt_ms:g} ms RTT"] = (
                proxied(net, primary),
                [proxied(net, u) for u in replicas],
            )
            if isinstance(topology, MariaDBTopology):
                # The opt-in that lets the wait travel with the read
                # (docs/round-trips.md): replicas allowing several statements.
                urls[f"{rtt_ms:g} ms RTT, multi"] = (
                    proxied(net, primary),
                    [
                        proxied(net, u).update_query_dict({"client_flag": str(MULTI_STATEMENTS)})
                        for u in replicas
                    ],
                )
        modes = [
            Mode(name, p_url, r_urls, net if name != "loopback" else None)
            for name, (p_url, r_urls) in urls.items()
        ]
        written = dict.fromkeys(range(USERS), 0)
        tasks = [(mode, way) for mode in modes for way in ("ours", "naive")]
        for mode in modes:
            mode.start()
        for i in range(WARM_UP + requests):
            random.shuffle(tasks)
            for mode, way in tasks:
                mode.request(way, i % USERS, written, timed=i >= WARM_UP)
        cpu = routing_cpu(modes[0])
        for mode in modes:
            mode.dispose()
        flaps = {
            name: flapping(topology, (p_url, r_urls)) for name, (p_url, r_urls) in urls.items()
        }
        report(topology.server_version(), requests, modes, cpu, flaps)


def report(
    version: str,
    requests: int,
    modes: list[Mode],
    cpu: tuple[float, float],
    flaps: dict[str, dict[str, Any]],
) -> None:
    width = 22
    print(f"\n{version}, 2 replicas, {requests} requests (write, then read own row) per way")

    def row(label: str, cells: list[str]) -> None:
        print(f"{label:<56}" + "".join(f"{cell:>{width}}" for cell in cells))

    row("", [m.name for m in modes])
    ways = {m.name: m.ways for m in modes}
    for way, label in (("ours", "read_your_writes (ours)"), ("naive", "naive (eventual)")):
        row(
            f"read after write p50 / p90 ms, {label}",
            [f"{p(w[way].reads, 0.5):.2f} / {p(w[way].reads, 0.9):.2f}" for w in ways.values()],
        )
    row(
        "  ratio of p50s, ours / naive (goal <= 1.1)",
        [f"{p(w['ours'].reads, 0.5) / p(w['naive'].reads, 0.5):.2f}x" for w in ways.values()],
    )
    row(
        "  reads on replicas, ours / naive",
        [
            f"{w['ours'].on_replicas / requests:.0%} / {w['naive'].on_replicas / requests:.0%}"
            for w in ways.values()
        ],
    )
    row(
        "  stale reads, ours / naive",
        [f"{w['ours'].stale} / {w['naive'].stale}" for w in ways.values()],
    )
    for way, label in (("ours", "RoutingSession"), ("naive", "plain Session")):
        row(f"commit p50 ms, {label}", [f"{p(w[way].commits, 0.5):.3f}" for w in ways.values()])
    row(
        "  ratio, RoutingSession / Session (goal <= 1.05)",
        [f"{p(w['ours'].commits, 0.5) / p(w['naive'].commits, 0.5):.2f}x" for w in ways.values()],
    )
    # The client's own CPU: steadier than wall times on a shared machine, and
    # what the library adds without the servers' share.
    for spans, label in (("commit_cpu", "commit"), ("read_cpu", "read after write")):
        row(
            f"client CPU p50 us, {label}, ours / naive",
            [
                f"{p(getattr(w['ours'], spans), 0.5) * 1000:.0f} / "
                f"{p(getattr(w['naive'], spans), 0.5) * 1000:.0f}"
                for w in ways.values()
            ],
        )
    print("per write-then-read, ours | naive:")
    row(
        "  round trips, write (proxy-counted)",
        [
            "-"
            if m.net is None
            else f"{m.ways['ours'].write_trips / requests:.2f} | "
            f"{m.ways['naive'].write_trips / requests:.2f}"
            for m in modes
        ],
    )
    row(
        "  round trips, read (proxy-counted)",
        [
            "-"
            if m.net is None
            else f"{m.ways['ours'].read_trips / requests:.2f} | "
            f"{m.ways['naive'].read_trips / requests:.2f}"
            for m in modes
        ],
    )
    for kind, label in (
        ("app", "application statements"),
        ("position", "position queries"),
        ("wait", "wait queries"),
    ):
        row(
            f"  {label}",
            [
                f"{w['ours'].statements[kind] / requests:.2f} | "
                f"{w['naive'].statements[kind] / requests:.2f}"
                for w in ways.values()
            ],
        )
    plain, routing = cpu
    print(
        f"routing CPU per statement (overhead.py's measure, loopback, {CPU_ROUNDS} rounds x "
        f"{CPU_STATEMENTS}): Session {plain:.1f} us, RoutingSession replica (router scope) "
        f"{routing:.1f} us, ratio {routing / plain:.3f} (goal <= 1.05)"
    )
    for name, r in flaps.items():
        print(
            f"flapping replicas ({name}, wait_budget.py, {r['reads']} reads): on replicas "
            f"{r['replica_share']:.0%}, stale {r['stale']}, read p50 {r['p50_ms']:.2f} ms, "
            f"max {r['max_ms']:.1f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("postgresql", "mariadb", "both"), default="both")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rtt-ms", type=float, default=0.5, help="0: loopback only")
    args = parser.parse_args()
    delay = args.rtt_ms / 2000
    with ExitStack() as stack:
        net = None
        if delay > 0:
            check = netproxy.self_check(delay)
            print(
                f"emulated network: a ping-pong takes {check['added'] + check['hop']:.3f} ms "
                f"more than on loopback (delay {check['added']:.3f} ms, asked "
                f"{args.rtt_ms:g}; proxy hop {check['hop']:.3f} ms)"
            )
            net = stack.enter_context(netproxy.Network(delay))
        backends = ("postgresql", "mariadb") if args.backend == "both" else (args.backend,)
        for backend in backends:
            topology: Topology = (
                PostgresTopology(replicas=2)
                if backend == "postgresql"
                else MariaDBTopology(replicas=2)
            )
            bench(topology, args.requests, net, args.rtt_ms)


if __name__ == "__main__":
    main()
