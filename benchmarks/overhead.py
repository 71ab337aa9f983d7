"""Per-statement CPU overhead of RoutingSession against a plain Session.

All sessions run the same primary-key ORM select against the same real
PostgreSQL server:

- ``Session``: a plain Session on the engine;
- ``RoutingSession, primary-bound``: a router without replicas, so every
  statement goes to the primary and only the routing work differs;
- ``RoutingSession, replica path (session scope)``: a router over a real
  streaming replica with ``causal_scope="session"``: reads take the full
  replica path (classification, policy, AUTOCOMMIT read-only connection)
  with no position to check;
- ``RoutingSession, replica path (router scope)``: the default scope: every
  read also checks the router's position (the primary's at first use)
  against what the replica is known to have applied;
- ``Session, AUTOCOMMIT engine``: the control for the replica paths: a plain
  Session whose connections are in AUTOCOMMIT, as replica connections are;
- ``Flask-SQLAlchemy Session``: Flask-SQLAlchemy's session (its own
  ``get_bind`` picks the engine per model), in an app context;
- ``RoutingSession over Flask-SQLAlchemy, replica (router scope)``: the two
  combined: each statement also asks Flask-SQLAlchemy's ``get_bind`` whether
  the model lives in another database (it does not);
- ``RoutingSession, replica (router scope), explain on`` (where this checkout
  has ``sr.explain``): the same reads inside ``with sr.explain()``, each
  recorded with its SQL text. The router scope row is the one to compare
  with main for the cost of counting (``router.stats()``) and of explain off.

CPU time is the client's own, so which server answers matters little.
Rounds run them in shuffled order and ratios of medians are reported: on a
shared, noisy machine only figures taken side by side in one run mean
anything.

    python benchmarks/overhead.py [--statements 2000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import flask
import flask_sqlalchemy
import flask_sqlalchemy.session
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import PostgresTopology, StatementLog


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "account"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))


class FlaskRoutingSession(sr.RoutingSession, flask_sqlalchemy.session.Session):
    pass


ROWS = 100


def pk_selects(session: Session, statements: int) -> int:
    """Run ``statements`` primary-key selects; return CPU nanoseconds spent."""
    started = time.process_time_ns()
    for i in range(statements):
        session.execute(sa.select(Account).where(Account.id == i % ROWS + 1)).scalar_one()
    return time.process_time_ns() - started


EXPLAIN_ON = "RoutingSession, replica (router scope), explain on"
#: Reasons of explained reads the primary served (the replica path was not measured).
OFF_REPLICA: list[str] = []


def measure(make: Callable[[], Session], statements: int, *, explained: bool = False) -> float:
    """CPU microseconds per statement for one round in a fresh session
    (inside ``sr.explain()`` when ``explained``)."""
    with make() as session:
        if not explained:
            return pk_selects(session, statements) / statements / 1000
        with sr.explain() as log:
            spent = pk_selects(session, statements)
        assert len(log) == statements, len(log)
        OFF_REPLICA.extend(entry.reason for entry in log.on_primary())
        return spent / statements / 1000


RULE_ROUTERS: dict[str, sr.ReplicaRouter] = {}


def rule_variants(topology: PostgresTopology) -> dict[str, Callable[[], Session]]:
    """Routers with table rules (where this checkout has them): a rule on a table
    the statement does not read (its tables are looked up, cached), and one on
    the table it reads (eventual: the read takes the rule's level)."""
    if not hasattr(sr, "table_consistency"):
        return {}
    for label, rules in (
        ("RoutingSession, replica (router scope), rule on another table", {"orders": "strong"}),
        ("RoutingSession, replica, eventual rule on the table read", {Account: "eventual"}),
    ):
        RULE_ROUTERS[label] = sr.ReplicaRouter(
            topology.primary_url,
            topology.replica_urls,
            rules=rules,  # type: ignore[arg-type]
        )
    return {label: router.sessionmaker() for label, router in RULE_ROUTERS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--statements", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()

    with PostgresTopology(replicas=1) as topology:
        version = topology.server_version()
        engine = sa.create_engine(topology.primary_url)
        Base.metadata.create_all(engine)
        with Session(engine) as session:
            session.add_all(Account(id=i, name=f"user{i}") for i in range(1, ROWS + 1))
            session.commit()
        topology.wait_for_catchup()
        autocommit = sa.create_engine(topology.primary_url, isolation_level="AUTOCOMMIT")
        session_scope = sr.ReplicaRouter(
            topology.primary_url, topology.replica_urls, causal_scope="session"
        )
        router_scope = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
        router_scope.start()  # the replica checked before the first read
        app = flask.Flask(__name__)
        app.config["SQLALCHEMY_DATABASE_URI"] = topology.primary_url.render_as_string(
            hide_password=False
        )
        db = flask_sqlalchemy.SQLAlchemy(app)
        context = app.app_context()  # Flask-SQLAlchemy finds its engines through it
        context.push()
        makers: dict[str, Callable[[], Session]] = {
            "Session": sa.orm.sessionmaker(engine),
            # Control: replica reads run in AUTOCOMMIT; this is its cost alone.
            "Session, AUTOCOMMIT engine": sa.orm.sessionmaker(autocommit),
            "RoutingSession, primary-bound": sr.ReplicaRouter(engine).sessionmaker(),
            "RoutingSession, replica (session scope)": session_scope.sessionmaker(),
            "RoutingSession, replica (router scope)": router_scope.sessionmaker(),
            **({EXPLAIN_ON: router_scope.sessionmaker()} if hasattr(sr, "explain") else {}),
            **rule_variants(topology),
            "Flask-SQLAlchemy Session": sa.orm.sessionmaker(
                class_=flask_sqlalchemy.session.Session, db=db
            ),
            "RoutingSession over Flask-SQLAlchemy, replica (router scope)": sa.orm.sessionmaker(
                class_=FlaskRoutingSession, db=db, router=router_scope
            ),
        }
        for name, make in makers.items():
            measure(make, 200, explained=name == EXPLAIN_ON)  # warm up caches and the pools
        replica_paths = [
            (session_scope, makers["RoutingSession, replica (session scope)"]),
            (router_scope, makers["RoutingSession, replica (router scope)"]),
            *[(RULE_ROUTERS[name], makers[name]) for name in RULE_ROUTERS],
            (router_scope, makers["RoutingSession over Flask-SQLAlchemy, replica (router scope)"]),
        ]
        for router, make in replica_paths:  # each measures the replica path
            with StatementLog(router) as log, make() as session:
                pk_selects(session, 1)
            assert [s.node for s in log.statements] == ["replica1"], log.statements
        OFF_REPLICA.clear()
        results: dict[str, list[float]] = {name: [] for name in makers}
        order = list(makers)
        for _ in range(args.rounds):
            random.shuffle(order)  # no variant always runs first or last
            for name in order:
                results[name].append(
                    measure(makers[name], args.statements, explained=name == EXPLAIN_ON)
                )
        for flask_engine in db.engines.values():
            flask_engine.dispose()
        context.pop()
        session_scope.dispose()
        router_scope.dispose()
        for rule_router in RULE_ROUTERS.values():
            rule_router.dispose()
        engine.dispose()
        autocommit.dispose()

    print(f"{version}, {args.rounds} rounds x {args.statements} PK ORM selects, CPU time")
    if OFF_REPLICA:
        print(f"warning: {len(OFF_REPLICA)} explained reads ran on the primary: {set(OFF_REPLICA)}")
    # Medians, and minimums (the least disturbed rounds on a shared machine).
    base_median, base_min = statistics.median(results["Session"]), min(results["Session"])
    for name, values in results.items():
        median, least = statistics.median(values), min(values)
        print(
            f"{name:<62} median {median:6.1f} us (ratio {median / base_median:.3f})"
            f"  min {least:6.1f} us (ratio {least / base_min:.3f})"
        )


if __name__ == "__main__":
    main()
