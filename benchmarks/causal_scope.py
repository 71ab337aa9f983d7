"""The two causal scopes side by side, under a concurrent multi-user workload.

Virtual users, one thread each, own a counter row. A request bumps the
user's counter and commits (one session), then, in a new session, reads the
user's own counter and two other users' counters. Each scope runs the same
workload, in the same run, at each injected apply delay:

- ``router``: the default; no token or context anywhere: every read must see
  every commit the process acknowledged before it began;
- ``session``: each user carries their own signed token from request to
  request (``causal_context(token)``), as the narrower scope requires for a
  user to read their own writes in a new session.

Reported per scope: reads served by replicas, read latency (p50, p99),
server-side waits per read, and stale reads: of one's own row (must be 0 in
both) and of others' rows, measured against what was acknowledged before the
read began (0 with the router scope; allowed with the session scope).

    python benchmarks/causal_scope.py [--backend postgresql|mariadb] [--requests 40]
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.consistency import CausalScopeKind
from sqlalchemy_replicas.testing import (
    MariaDBTopology,
    PostgresTopology,
    StatementLog,
    Topology,
    wait_until,
)

USERS = 8


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "counter"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    value: Mapped[int]


@dataclass
class Results:
    """Measurements of one scope at one delay, shared by the user threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acknowledged: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    stale_own: int = 0
    stale_others: int = 0
    reads: int = 0


def user_loop(
    router: sr.ReplicaRouter, results: Results, user: int, requests: int, carry_token: bool
) -> None:
    rng = random.Random(user)
    make = router.sessionmaker()
    token: str | None = None
    for _ in range(requests):
        with sr.causal_context(token if carry_token else None) as ctx:
            with make() as session:
                session.execute(
                    sa.update(Counter).where(Counter.id == user).values(value=Counter.value + 1)
                )
                session.commit()
            with results.lock:
                results.acknowledged[user] += 1
            others = rng.sample([u for u in range(USERS) if u != user], 2)
            with make() as session:
                for target in (user, *others):
                    with results.lock:
                        expected = results.acknowledged[target]
                    started = time.perf_counter()
                    seen = session.scalar(sa.select(Counter.value).where(Counter.id == target))
                    elapsed = time.perf_counter() - started
                    assert seen is not None
                    with results.lock:
                        results.latencies.append(elapsed)
                        results.reads += 1
                        if seen < expected:
                            if target == user:
                                results.stale_own += 1
                            else:
                                results.stale_others += 1
            if carry_token:
                token = ctx.token


def measure(
    topology: Topology, scope: CausalScopeKind, requests: int
) -> tuple[Results, StatementLog]:
    router = sr.ReplicaRouter(
        topology.primary_url,
        topology.replica_urls,
        secret="bench",
        wait_timeout=0.5,
        causal_scope=scope,
    )
    try:
        with router.primary.connect() as conn:
            values = {
                row.id: row.value for row in conn.execute(sa.select(Counter.id, Counter.value))
            }
        results = Results(acknowledged=values)
        wait_until(
            lambda: all(status.healthy for status in router.status()),
            timeout=30,
            what="both replicas in the lag monitor's view",
        )
        with StatementLog(router) as log:
            threads = [
                threading.Thread(
                    target=user_loop, args=(router, results, user, requests, scope == "session")
                )
                for user in range(USERS)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        return results, log
    finally:
        router.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["postgresql", "mariadb"], default="postgresql")
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    topology: Topology
    if args.backend == "postgresql":
        topology, delays = PostgresTopology(replicas=2), [0.0, 0.005]
    else:  # MASTER_DELAY takes whole seconds: only no delay is comparable
        topology, delays = MariaDBTopology(replicas=2), [0.0]
    with topology:
        engine = sa.create_engine(topology.primary_url)
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(Counter), [{"id": u, "value": 0} for u in range(USERS)])
        engine.dispose()
        topology.wait_for_catchup()
        print(
            f"{topology.server_version()}, 2 replicas, {USERS} users x {args.requests} "
            "requests x (1 write + 3 reads)"
        )
        print(
            f"{'delay':>6} {'scope':<8} {'on replicas':>12} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'waits/read':>11} {'stale own':>10} {'stale others':>13}"
        )
        for delay in delays:
            for replica in (0, 1):
                topology.set_apply_delay(replica, delay)
            for scope in ("router", "session"):
                results, log = measure(topology, scope, args.requests)
                reads = [
                    s
                    for s in log.statements
                    if s.sql.lstrip().startswith("SELECT") and "FROM counter" in s.sql
                ]
                on_replicas = sum(1 for s in reads if s.node != "primary")
                waits = sum(
                    1
                    for s in log.statements
                    if s.node != "primary"
                    and ("MASTER_GTID_WAIT" in s.sql or "RECURSIVE poll" in s.sql)
                )
                lat = sorted(results.latencies)
                p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                print(
                    f"{delay * 1000:>5.0f}ms {scope:<8} {on_replicas / len(reads):>11.0%} "
                    f"{statistics.median(lat) * 1000:>7.2f} {p99 * 1000:>7.2f} "
                    f"{waits / len(reads):>11.2f} {results.stale_own:>10} "
                    f"{results.stale_others:>13}"
                )
                topology.wait_for_catchup(timeout=60)
        for replica in (0, 1):
            topology.set_apply_delay(replica, 0)


if __name__ == "__main__":
    main()
