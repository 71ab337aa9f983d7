"""Read-your-writes strategies side by side, against real replication lag.

Virtual users each keep a counter row. A request first reads the user's own
counter (it must show the user's last write), bumps it and commits, reads it
again, and reads another user's row. Four strategies, in one run, for each
injected apply delay on the replicas:

- ``read_your_writes``: this library (positions, bounded wait, primary);
- ``2s window``: after a user's write, their reads go to the primary for 2 s
  (Rails' default), else to a replica;
- ``pin request``: after a write, the rest of that request reads the primary;
  other reads go to a replica;
- ``naive``: every read to a replica.

Reported per strategy: stale own reads, share of reads served by replicas,
p50/p99 read latency, and extra round trips per read (position waits).

    python benchmarks/read_your_writes.py [--backend postgresql|mariadb] [--requests 60]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import (
    MariaDBTopology,
    PostgresTopology,
    StatementLog,
    Topology,
    wait_until,
)

USERS = 8
WINDOW = 2.0


class Base(DeclarativeBase):
    pass


class Counter(Base):
    __tablename__ = "counter"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    value: Mapped[int]


class Run:
    """One strategy's measurements."""

    def __init__(self) -> None:
        self.stale = 0
        self.own_reads = 0
        self.latencies: list[float] = []

    def read(self, session: Session, user: int, level: AbstractContextManager[object]) -> int:
        started = time.perf_counter()
        with level:
            value = session.scalar(sa.select(Counter.value).where(Counter.id == user))
        self.latencies.append(time.perf_counter() - started)
        assert value is not None
        return value


Strategy = Callable[[int, float, bool], AbstractContextManager[object]]


def ours(user: int, last_write: float, wrote_in_request: bool) -> AbstractContextManager[object]:
    return nullcontext()


def window(user: int, last_write: float, wrote_in_request: bool) -> AbstractContextManager[object]:
    recent = time.monotonic() - last_write < WINDOW
    return sr.consistency("strong" if recent else "eventual")


def pin_request(
    user: int, last_write: float, wrote_in_request: bool
) -> AbstractContextManager[object]:
    return sr.consistency("strong" if wrote_in_request else "eventual")


def naive(user: int, last_write: float, wrote_in_request: bool) -> AbstractContextManager[object]:
    return sr.consistency("eventual")


STRATEGIES: dict[str, Strategy] = {
    "read_your_writes": ours,
    "2s window": window,
    "pin request": pin_request,
    "naive": naive,
}


@contextmanager
def request_scope(use_tokens: bool, cookie: str | None) -> Iterator[sr.CausalContext | None]:
    if use_tokens:
        with sr.causal_context(cookie) as ctx:
            yield ctx
    else:
        yield None


def run(router: sr.ReplicaRouter, strategy: Strategy, requests: int, seed: int) -> Run:
    rng = random.Random(seed)
    result = Run()
    with router.primary.connect() as conn:
        written: dict[int, int] = dict(conn.execute(sa.select(Counter.id, Counter.value)).all())
    last_write = dict.fromkeys(range(USERS), 0.0)
    cookies: dict[int, str | None] = dict.fromkeys(range(USERS))
    make = router.sessionmaker()
    use_tokens = strategy is ours
    for i in range(requests):
        user = i % USERS
        with request_scope(use_tokens, cookies[user]) as ctx:
            with make() as session:
                seen = result.read(session, user, strategy(user, last_write[user], False))
                result.own_reads += 1
                result.stale += seen < written[user]
            with make() as session:
                session.execute(
                    sa.update(Counter).where(Counter.id == user).values(value=Counter.value + 1)
                )
                session.commit()
                written[user] += 1
                last_write[user] = time.monotonic()
            with make() as session:
                seen = result.read(session, user, strategy(user, last_write[user], True))
                result.own_reads += 1
                result.stale += seen < written[user]
                result.read(session, rng.randrange(USERS), strategy(user, last_write[user], True))
            if ctx is not None:
                cookies[user] = ctx.token
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["postgresql", "mariadb"], default="postgresql")
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    topology: Topology
    if args.backend == "postgresql":
        topology, delays = PostgresTopology(replicas=2), [0.0, 0.05, 0.5]
    else:  # MASTER_DELAY takes whole seconds
        topology, delays = MariaDBTopology(replicas=2), [0.0, 1.0]
    with topology:
        router = sr.ReplicaRouter(
            topology.primary_url,
            topology.replica_urls,
            secret="bench",
            wait_timeout=0.5,
            # Setting an apply delay restarts a PostgreSQL standby.
            engine_options={"pool_pre_ping": True},
        )
        Base.metadata.create_all(router.primary)
        with router.primary.begin() as conn:
            conn.execute(sa.insert(Counter), [{"id": u, "value": 0} for u in range(USERS)])
        topology.wait_for_catchup()
        print(f"{topology.server_version()}, 2 replicas, {args.requests} requests x 3 reads")
        header = f"{'delay':>6} {'strategy':<17} {'stale':>6} {'on replicas':>12}"
        print(header + f" {'p50 ms':>7} {'p99 ms':>7} {'extra RT/read':>14}")
        for delay in delays:
            for replica in (0, 1):
                topology.set_apply_delay(replica, delay)
            # A PostgreSQL standby restarts for a new delay: wait until the lag
            # monitor has seen both back, so that every strategy starts equal.
            wait_until(
                lambda: all(status.healthy for status in router.status()),
                timeout=30,
                what="both replicas to be back in the lag monitor's view",
            )
            for name, strategy in STRATEGIES.items():
                with StatementLog(router) as log:
                    result = run(router, strategy, args.requests, seed=1)
                reads = [
                    s
                    for s in log.statements
                    if s.sql.startswith("SELECT") and "FROM counter" in s.sql
                ]
                on_replicas = sum(1 for s in reads if s.node != "primary")
                waits = sum(
                    1
                    for s in log.statements
                    if s.node != "primary"
                    and ("MASTER_GTID_WAIT" in s.sql or "RECURSIVE poll" in s.sql)
                )
                lat = sorted(result.latencies)
                p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                print(
                    f"{delay * 1000:>5.0f}ms {name:<17} {result.stale:>6} "
                    f"{on_replicas / len(reads):>11.0%} {statistics.median(lat) * 1000:>7.2f} "
                    f"{p99 * 1000:>7.2f} {waits / len(reads):>14.2f}"
                )
            topology.wait_for_catchup(timeout=60)
        for replica in (0, 1):
            topology.set_apply_delay(replica, 0)
        router.dispose()


if __name__ == "__main__":
    main()
