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
- ``RoutingSession, replica (router scope), OpenTelemetry on, recording span``:
  a router instrumented with ``integrations.opentelemetry.instrument()``, its
  reads inside a span the SDK records (every statement sets its attributes);
- ``RoutingSession, replica (router scope), Prometheus collector registered``:
  a router exported by ``integrations.prometheus.register()`` (the collector
  reads the counters at scrape time only: this row should match the plain
  router scope row). The time of one scrape is printed after the table.

After the table: the routing work alone within a real loop of statements
(``routing_within_statements``): the router scope row's extra, without the
noise of the server's and the driver's share.

CPU time is the client's own, so which server answers matters little; and
the benchmark thread's own: the routers' lag monitors (and, in
``round_trips.py``, the emulated network's threads) run in threads of their
own, whose CPU would otherwise count against every row, the plain Session's
too, as noise.
Rounds run them in shuffled order and ratios of medians are reported: on a
shared, noisy machine only figures taken side by side in one run mean
anything.

    python benchmarks/overhead.py [--statements 2000] [--rounds 21] [--only REGEX]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial
from typing import Any

import flask
import flask_sqlalchemy
import flask_sqlalchemy.session
import prometheus_client
import sqlalchemy as sa
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.integrations import opentelemetry as sr_otel
from sqlalchemy_replicas.integrations import prometheus
from sqlalchemy_replicas.testing import PostgresTopology, StatementLog, wait_until


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
    started = time.thread_time_ns()
    for i in range(statements):
        session.execute(sa.select(Account).where(Account.id == i % ROWS + 1)).scalar_one()
    return time.thread_time_ns() - started


EXPLAIN_ON = "RoutingSession, replica (router scope), explain on"
#: Reasons of explained reads the primary served (the replica path was not measured).
OFF_REPLICA: list[str] = []


OTEL_ON = "RoutingSession, replica (router scope), OpenTelemetry on, recording span"
PROMETHEUS_ON = "RoutingSession, replica (router scope), Prometheus collector registered"
#: Per variant, what each round runs inside (default: nothing).
WITHIN: dict[str, Callable[[], AbstractContextManager[object]]] = {}


def measure(
    make: Callable[[], Session],
    statements: int,
    *,
    explained: bool = False,
    within: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> float:
    """CPU microseconds per statement for one round in a fresh session
    (inside ``sr.explain()`` when ``explained``; inside ``within()``)."""
    with make() as session, within():
        if not explained:
            return pk_selects(session, statements) / statements / 1000
        with sr.explain() as log:
            spent = pk_selects(session, statements)
        assert len(log) == statements, len(log)
        OFF_REPLICA.extend(entry.reason for entry in log.on_primary())
        return spent / statements / 1000


def routing_within_statements(make: Callable[[], Session], statements: int) -> float:
    """Microseconds per statement that ``RoutingSession`` spends routing (its
    ``execute()`` outside Session's own), within a real loop of statements.

    Steadier than the ratios (no server's or driver's share to vary), and
    about three times :mod:`routing_cost`'s tight loop of the same work:
    among SQLAlchemy's and the driver's code, the routing code runs with
    cold caches. Each statement's cache key is computed beforehand:
    classification reuses it, and SQLAlchemy would compute it anyway.
    """
    routed_execute = sr.RoutingSession._execute_routed
    spent = 0
    clock = time.perf_counter_ns  # no I/O is timed: wall time is CPU time

    def timed(session: sr.RoutingSession, method: Callable[..., Any], *rest: Any) -> Any:
        nonlocal spent
        inner = 0

        def session_execute(*args: Any, **kwargs: Any) -> Any:
            nonlocal inner
            started = clock()
            try:
                return method(*args, **kwargs)
            finally:
                inner += clock() - started

        started = clock()
        try:
            return routed_execute(session, session_execute, *rest)
        finally:
            spent += clock() - started - inner

    sr.RoutingSession._execute_routed = timed  # type: ignore[method-assign, assignment]
    try:
        with make() as session:
            for i in range(statements):
                statement = sa.select(Account).where(Account.id == i % ROWS + 1)
                statement._generate_cache_key()
                session.execute(statement).scalar_one()
    finally:
        sr.RoutingSession._execute_routed = routed_execute  # type: ignore[method-assign]
    return spent / statements / 1000


def all_healthy(router: sr.ReplicaRouter) -> bool:
    """Whether every replica of ``router`` serves reads now."""
    return all(replica.healthy for replica in router.status())


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
    parser.add_argument(
        "--only",
        metavar="REGEX",
        help="measure only the variants whose name matches (and the plain Session)",
    )
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
        # Each instrumented the same way as router_scope, on engines of its own.
        otel_router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
        otel_router.start()
        sr_otel.instrument(otel_router)
        tracer = TracerProvider().get_tracer(__name__)  # records; exports nowhere
        WITHIN[OTEL_ON] = lambda: tracer.start_as_current_span("request")
        prometheus_router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
        prometheus_router.start()
        registry = prometheus_client.CollectorRegistry()
        prometheus.register(prometheus_router, registry=registry)
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
            OTEL_ON: otel_router.sessionmaker(),
            PROMETHEUS_ON: prometheus_router.sessionmaker(),
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
            # Warm up caches and the pools.
            measure(make, 200, explained=name == EXPLAIN_ON, within=WITHIN.get(name, nullcontext))
        replica_paths = [
            (session_scope, makers["RoutingSession, replica (session scope)"]),
            (router_scope, makers["RoutingSession, replica (router scope)"]),
            (otel_router, makers[OTEL_ON]),
            (prometheus_router, makers[PROMETHEUS_ON]),
            *[(RULE_ROUTERS[name], makers[name]) for name in RULE_ROUTERS],
            (router_scope, makers["RoutingSession over Flask-SQLAlchemy, replica (router scope)"]),
        ]
        for router, _ in replica_paths:  # a check can time out on a loaded machine
            wait_until(partial(all_healthy, router), timeout=60, what="the replica healthy")
        for router, make in replica_paths:  # each measures the replica path
            with StatementLog(router) as log, make() as session:
                pk_selects(session, 1)
            assert [s.node for s in log.statements] == ["replica1"], log.statements
        OFF_REPLICA.clear()
        if args.only:
            makers = {
                name: make
                for name, make in makers.items()
                if name == "Session" or re.search(args.only, name)
            }
        results: dict[str, list[float]] = {name: [] for name in makers}
        order = list(makers)
        for _ in range(args.rounds):
            random.shuffle(order)  # no variant always runs first or last
            for name in order:
                results[name].append(
                    measure(
                        makers[name],
                        args.statements,
                        explained=name == EXPLAIN_ON,
                        within=WITHIN.get(name, nullcontext),
                    )
                )
        within = [
            routing_within_statements(makers["RoutingSession, replica (router scope)"], 1000)
            for _ in range(7)
        ]
        for flask_engine in db.engines.values():
            flask_engine.dispose()
        context.pop()
        # Reads the primary served (a replica left out under load) distort a row.
        on_primary = {
            name: router.stats().decisions_by_target()["primary"]
            for name, router in (
                ("router scope", router_scope),
                (OTEL_ON, otel_router),
                (PROMETHEUS_ON, prometheus_router),
            )
        }
        scrapes = []
        for _ in range(200):
            started = time.perf_counter_ns()
            prometheus_client.generate_latest(registry)
            scrapes.append((time.perf_counter_ns() - started) / 1000)
        scrape = statistics.median(scrapes)
        session_scope.dispose()
        router_scope.dispose()
        otel_router.dispose()
        prometheus_router.dispose()
        for rule_router in RULE_ROUTERS.values():
            rule_router.dispose()
        engine.dispose()
        autocommit.dispose()

    print(f"{version}, {args.rounds} rounds x {args.statements} PK ORM selects, CPU time")
    for name, count in on_primary.items():
        if count:
            print(f"warning: {count} reads of {name!r} ran on the primary")
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
    print(f"one Prometheus scrape of the registered router: median {scrape:.0f} us (wall)")
    print(
        "routing work within real statements, replica (router scope): "
        f"median {statistics.median(within):.1f} us per statement (7 rounds x 1000)"
    )


if __name__ == "__main__":
    main()
