"""CPU cost of RoutingSession's routing work per statement, without a server.

Times the routing step alone (options, classification, policy, replica
choice) by giving it a no-op in place of Session.execute, for a primary-key
ORM select whose cache key is already computed (SQLAlchemy computes and
memoizes it for every execution anyway, so routing reuses it for free).
Steadier than the side-by-side run of overhead.py on a noisy machine; the
two together say what routing adds to a real statement.

    python benchmarks/routing_cost.py
"""

from __future__ import annotations

import os
import timeit
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.causal import CausalScope
from sqlalchemy_replicas.positions import PostgresPositions


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "account"
    id: Mapped[int] = mapped_column(primary_key=True)


def no_op(*args: Any, **kwargs: Any) -> None:
    return None


def replica_router(primary: sa.Engine, **options: Any) -> sr.ReplicaRouter:
    """A router over two replicas that routes reads to them without any I/O."""
    router = sr.ReplicaRouter(
        primary,
        ["postgresql+psycopg://u@127.0.0.1:2/db", "postgresql+psycopg://u@127.0.0.1:3/db"],
        **options,
    )
    router.cluster._positions = PostgresPositions()
    router.cluster.ensure_monitor = lambda: None  # type: ignore[method-assign]
    # The router's causal scope starts at the primary's position, read at its
    # first use (here it would try to connect for every statement): give it
    # one that both replicas are known to have applied, so reads take the
    # replica path (position check, pool pre-check) without I/O.
    router.cluster.process_scope = CausalScope()
    router.cluster.process_scope.add(router.cluster, 100)
    for name in router.replica_names:
        router.cluster.note_applied(name, 100)
    return router


def main() -> None:
    # URLs only: nothing connects. The replica routers are told their position
    # backend and get no lag monitor, so no server is needed.
    primary = sa.create_engine("postgresql+psycopg://u@127.0.0.1:1/db")
    routers: dict[str, sr.ReplicaRouter] = {
        "primary-bound": sr.ReplicaRouter(primary),
        "two replicas": replica_router(primary),
    }
    if hasattr(sr, "table_consistency"):  # table rules exist (not on older checkouts)
        # A rule on another table: the statement's tables are looked up (cached).
        routers["two replicas, rules (other table)"] = replica_router(
            primary, rules={"orders": "strong"}
        )
        # A rule on the table read: the read's level comes from the rule.
        routers["two replicas, rules (this table)"] = replica_router(
            primary, rules={Account: "eventual"}
        )
    statement = sa.select(Account).where(Account.id == 5)
    statement._generate_cache_key()
    number = int(os.environ.get("ROUTING_COST_NUMBER", "50000"))
    for label, router in routers.items():
        session = router.sessionmaker()()
        best = min(
            timeit.repeat(
                lambda session=session: session._execute_routed(  # type: ignore[misc]
                    no_op, statement, None, {}, None, {}
                ),
                number=number,
                repeat=7,
            )
        )
        print(f"routing work, {label:<33} {best / number * 1e6:6.2f} us per statement")


if __name__ == "__main__":
    main()
