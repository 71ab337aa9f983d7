"""Per-statement CPU overhead of RoutingSession against a plain Session.

Both sessions run the same primary-key ORM select against the same real
PostgreSQL server (a router without replicas, so every statement goes to the
primary and only the routing differs). Rounds alternate between the two, and
the ratio of medians is reported: on a shared, noisy machine only figures
taken side by side in one run mean anything.

    python benchmarks/overhead.py [--statements 2000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import PostgresTopology


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "account"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))


ROWS = 100


def pk_selects(session: Session, statements: int) -> int:
    """Run ``statements`` primary-key selects; return CPU nanoseconds spent."""
    started = time.process_time_ns()
    for i in range(statements):
        session.execute(sa.select(Account).where(Account.id == i % ROWS + 1)).scalar_one()
    return time.process_time_ns() - started


def measure(make: Callable[[], Session], statements: int) -> float:
    """CPU microseconds per statement for one round in a fresh session."""
    with make() as session:
        return pk_selects(session, statements) / statements / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    with PostgresTopology(replicas=0) as topology:
        version = topology.server_version()
        engine = sa.create_engine(topology.primary_url)
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            session.add_all(Account(id=i, name=f"user{i}") for i in range(1, ROWS + 1))
            session.commit()
        router = sr.ReplicaRouter(engine)
        plain = sa.orm.sessionmaker(engine)
        routed = router.sessionmaker()
        measure(plain, 200)  # warm up caches and the pool
        measure(routed, 200)
        plain_us: list[float] = []
        routed_us: list[float] = []
        for _ in range(args.rounds):
            plain_us.append(measure(plain, args.statements))
            routed_us.append(measure(routed, args.statements))
        engine.dispose()

    p, r = statistics.median(plain_us), statistics.median(routed_us)
    print(f"{version}, {args.rounds} rounds x {args.statements} PK selects")
    print(f"plain Session    CPU per statement: {p:7.1f} us (median)")
    print(f"RoutingSession   CPU per statement: {r:7.1f} us (median)")
    print(f"ratio RoutingSession / Session: {r / p:.3f}")


if __name__ == "__main__":
    main()
