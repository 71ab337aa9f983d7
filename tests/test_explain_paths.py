"""explain() on real servers for the paths beyond the plain ones (those are in
test_explain.py): reruns (a full pool, a replica gone mid-read, a PostgreSQL
recovery conflict), a full pool passed over, bounded and monotonic reads, and a
causal wait that failed. Each entry must say where the statement ran, why,
and where it ran first."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import Topology, wait_until

#: Long enough that the lag monitor checks once (at start) and never again
#: during a test: a replica stopped afterwards is still believed healthy.
NO_MONITOR_CHECKS = 600.0
#: Checks that notice a stopped replica quickly.
QUICK_CHECKS = 0.1


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "note"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(sa.String(50))


@pytest.fixture
def tables(topology: Topology) -> Topology:
    """The note table with one row, created and replicated."""
    engine = sa.create_engine(topology.primary_url)
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(Note).values(id=1, text="one"))
    engine.dispose()
    topology.wait_for_catchup()
    return topology


def started_router(topology: Topology, **options: Any) -> sr.ReplicaRouter:
    """A router over the first replica only, started, that replica healthy."""
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls[:1], **options)
    router.start()
    wait_until(lambda: all(s.healthy for s in router.status()), timeout=30, what="replica1 healthy")
    return router


@pytest.fixture
def router_factory() -> Iterator[list[sr.ReplicaRouter]]:
    """Routers made by a test, disposed after it."""
    made: list[sr.ReplicaRouter] = []
    yield made
    for router in made:
        router.dispose()


def test_a_replica_with_a_full_pool_is_passed_over(
    tables: Topology, router_factory: list[sr.ReplicaRouter]
) -> None:
    """Another session holds replica1's only connection: an eventual read
    goes to the primary, explained as pool_full, with no rerun (it never
    tried the replica)."""
    router = started_router(
        tables,
        lag_check_interval=NO_MONITOR_CHECKS,
        engine_options={"pool_size": 1, "max_overflow": 0},
    )
    router_factory.append(router)
    make = router.sessionmaker()
    with sr.consistency("eventual"), make() as holder, make() as session:
        with sr.explain() as held:
            assert holder.scalar(sa.select(Note.text)) == "one"
        assert held.targets() == ["replica1"], held
        with sr.explain() as log:
            assert session.scalar(sa.select(Note.text)) == "one"
    (read,) = log
    assert (read.target, read.reason, read.level) == ("primary", "pool_full", "eventual"), log
    assert read.reruns == ()


class _TakeTheLastConnection(logging.Handler):
    """When the router has just chosen ``replica`` for a read (its DEBUG line),
    check out that replica's last free connection, as another thread may do
    between the choice and the read's own checkout."""

    def __init__(self, engine: sa.Engine, replica: str) -> None:
        super().__init__(logging.DEBUG)
        self._engine = engine
        self._replica = replica
        self.taken: sa.Connection | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # "%s -> %s: %s" % (statement, target, reason)
        args = record.args if isinstance(record.args, tuple) else ()
        chosen = args[1] if record.msg == "%s -> %s: %s" and len(args) == 3 else None
        if self.taken is None and chosen == self._replica:
            self.taken = self._engine.connect()


def test_a_pool_emptied_between_choice_and_checkout_is_a_pool_full_rerun(
    tables: Topology, router_factory: list[sr.ReplicaRouter]
) -> None:
    """replica1 had a free connection when the read chose it, and none left
    when the read checked one out: the read runs on the primary, explained as
    pool_full with a pool_full rerun that names replica1."""
    router = started_router(
        tables,
        lag_check_interval=NO_MONITOR_CHECKS,
        engine_options={"pool_size": 1, "max_overflow": 0},
    )
    router_factory.append(router)
    routing_log = logging.getLogger("sqlalchemy_replicas.routing")
    taker = _TakeTheLastConnection(router.replicas[0], "replica1")
    level = routing_log.level
    routing_log.addHandler(taker)
    routing_log.setLevel(logging.DEBUG)
    try:
        with sr.consistency("eventual"), router.sessionmaker()() as session, sr.explain() as log:
            assert session.scalar(sa.select(Note.text)) == "one"
    finally:
        routing_log.removeHandler(taker)
        routing_log.setLevel(level)
        if taker.taken is not None:
            taker.taken.close()
    assert taker.taken is not None, "the read never chose replica1"
    (read,) = log
    assert (read.target, read.reason) == ("primary", "pool_full"), log
    assert [(r.replica, r.cause) for r in read.reruns] == [("replica1", "pool_full")]


def test_a_replica_gone_mid_read_is_a_replica_failed_rerun(
    tables: Topology, router_factory: list[sr.ReplicaRouter]
) -> None:
    """replica1 is killed while the router still believes it healthy: the read
    on its pooled connection fails, the replica is marked down and the read
    runs on the primary, explained as no_replica_available with a
    replica_failed rerun naming replica1 and the driver's error."""
    router = started_router(tables, lag_check_interval=NO_MONITOR_CHECKS)
    router_factory.append(router)
    make = router.sessionmaker()
    with sr.consistency("eventual"):
        with make() as session, sr.explain() as before:
            assert session.scalar(sa.select(Note.text)) == "one"  # pools a connection
        assert before.targets() == ["replica1"], before
        tables.kill_replica(0)
        with make() as session, sr.explain() as log:
            assert session.scalar(sa.select(Note.text)) == "one"
    (read,) = log
    assert (read.target, read.reason) == ("primary", "no_replica_available"), log
    (rerun,) = read.reruns
    assert (rerun.replica, rerun.cause) == ("replica1", "replica_failed")
    assert rerun.detail.startswith("went away: ")
    assert "rerun: replica1 replica_failed" in str(log)


@pytest.mark.postgresql
def test_a_recovery_conflict_is_a_rerun_on_the_primary(
    fresh_postgres_topology: Topology,
    router_factory: list[sr.ReplicaRouter],
    provoke_recovery_conflict: Callable[[Topology, str, Callable[[], None]], None],
) -> None:
    """The standby cancels a long read whose lock replay needs ("conflict with
    recovery"): the read's entry says primary, recovery_conflict, with a
    recovery_conflict rerun naming replica1."""
    topology = fresh_postgres_topology
    engine = sa.create_engine(topology.primary_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    topology.wait_for_catchup()
    router = started_router(topology, lag_check_interval=NO_MONITOR_CHECKS)
    router_factory.append(router)
    outcome: dict[str, Any] = {}

    def long_read() -> None:
        try:
            with sr.explain() as log, router.sessionmaker()() as session:
                outcome["count"] = session.scalar(sa.text("SELECT count(*) FROM note, pg_sleep(2)"))
            outcome["log"] = log
        except Exception as error:  # reported below
            outcome["error"] = error

    provoke_recovery_conflict(topology, "note", long_read)
    assert "error" not in outcome, outcome
    assert outcome["count"] == 0
    (read,) = outcome["log"]
    assert (read.target, read.reason) == ("primary", "recovery_conflict"), outcome["log"]
    assert [(r.replica, r.cause) for r in read.reruns] == [("replica1", "recovery_conflict")]


def test_bounded_reads_are_explained_within_the_bound_and_over_it(
    tables: Topology, router_factory: list[sr.ReplicaRouter]
) -> None:
    """A bounded read goes to replica1 while its measured lag is within the
    bound (within_lag_bound, level bounded); once replay is paused and the
    lag grows past the bound, it goes to the primary (no_replica_available)."""
    router = started_router(tables, lag_check_interval=QUICK_CHECKS)
    router_factory.append(router)
    make = router.sessionmaker()
    with sr.consistency("bounded", max_lag=0.5), sr.explain() as log:
        with make() as session:
            assert session.scalar(sa.select(Note.text)) == "one"
        tables.pause_replay(0)
        with router.primary.begin() as conn:
            conn.execute(sa.insert(Note).values(id=2, text="two"))
        wait_until(
            lambda: (router.status()[0].lag_seconds or 0.0) > 0.5,
            timeout=20,
            what="replica1's lag over 0.5 s",
        )
        with make() as session:
            assert session.scalar(sa.select(sa.func.count()).select_from(Note)) == 2
    assert [(e.target, e.reason, e.level) for e in log] == [
        ("replica1", "within_lag_bound", "bounded"),
        ("primary", "no_replica_available", "bounded"),
    ], log


def test_monotonic_reads_are_explained_on_their_replica_then_out(
    tables: Topology, router_factory: list[sr.ReplicaRouter]
) -> None:
    """In one causal context, monotonic reads stay on the replica the first read
    chose (the second is monotonic_same_replica); once that replica is down
    the next read goes to the primary as monotonic_replica_out."""
    router = started_router(tables, lag_check_interval=QUICK_CHECKS)
    router_factory.append(router)
    make = router.sessionmaker()
    with sr.consistency("monotonic"), sr.causal_context(), sr.explain() as log:
        with make() as session:
            assert session.scalar(sa.select(Note.text)) == "one"
            assert session.scalar(sa.select(Note.id)) == 1
        tables.stop_replica(0)
        wait_until(
            lambda: router.status()[0].healthy is False, timeout=20, what="replica1 left out"
        )
        with make() as session:
            assert session.scalar(sa.select(Note.text)) == "one"
    assert log.targets() == ["replica1", "replica1", "primary"], log
    assert log.reasons()[1:] == ["monotonic_same_replica", "monotonic_replica_out"]
    assert {e.level for e in log} == {"monotonic"}
    assert log[0].reason_text.startswith("monotonic: ")


def test_a_causal_wait_that_failed_is_explained(
    tables: Topology, router_factory: list[sr.ReplicaRouter]
) -> None:
    """replica1 is stopped while the router still believes it healthy: the read
    after a commit waits on it, the wait fails (it cannot connect), and the read
    goes to the primary; its entry carries the wait with outcome failed, the
    commit's position, and the reason not_caught_up."""
    router = started_router(tables, lag_check_interval=NO_MONITOR_CHECKS, wait_timeout=2.0)
    router_factory.append(router)
    tables.stop_replica(0)
    with sr.explain() as log, router.sessionmaker()() as session:
        session.add(Note(id=2, text="two"))
        session.commit()
        assert session.scalar(sa.select(Note.text).where(Note.id == 2)) == "two"
    assert log.targets() == ["primary", "primary"], log
    read = log[1]
    assert read.reason == "not_caught_up"
    (wait,) = read.waits
    assert (wait.replica, wait.outcome) == ("replica1", "failed")
    assert wait.position
    assert wait.seconds < 2.0
    stats = router.stats()
    assert stats.waits.failed == 1
