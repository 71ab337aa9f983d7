"""router.stats(): routing counters by target, reason and level; waits; fallbacks."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.stats import (
    FALLBACK_CODES,
    REASON_CODES,
    RERUN_CAUSES,
    WAIT_BUCKETS,
    DecisionKey,
    StatsRecorder,
)
from sqlalchemy_replicas.testing import Topology, wait_until


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


# -- pure parts ----------------------------------------------------------------------


def test_reason_codes_are_a_small_closed_set_of_label_safe_words() -> None:
    """Every reason code is a lower-case identifier (a safe Prometheus label value);
    fallback codes and rerun causes are codes too, and the set stays small."""
    assert len(REASON_CODES) == len(set(REASON_CODES)) <= 25
    assert all(code.isidentifier() and code == code.lower() for code in REASON_CODES)
    assert set(FALLBACK_CODES) <= set(REASON_CODES)
    assert {"schema_behind", "recovery_conflict", "refused_write"} <= set(RERUN_CAUSES)


def test_wait_histogram_is_cumulative_with_fixed_buckets() -> None:
    """Waits land in the first bucket whose bound they do not exceed; buckets are
    cumulative, end at +inf with the count; outcomes and total time add up."""
    recorder = StatsRecorder()
    recorder.wait("reached", 0.003)
    recorder.wait("reached", 0.01)  # on a bound: that bucket
    recorder.wait("timed_out", 0.3)
    recorder.wait("failed", 9.0)
    waits = recorder.snapshot({}).waits
    assert (waits.count, waits.reached, waits.timed_out, waits.failed) == (4, 2, 1, 1)
    assert waits.total_seconds == pytest.approx(9.313)
    buckets = dict(waits.buckets)
    assert [bound for bound, _ in waits.buckets] == [*WAIT_BUCKETS, float("inf")]
    assert (buckets[0.005], buckets[0.01], buckets[0.25], buckets[0.5]) == (1, 2, 2, 3)
    assert (buckets[2.5], buckets[float("inf")]) == (3, 4)


def test_fallback_reasons_count_as_fallbacks_and_reset_clears() -> None:
    """A decision to the primary with a fallback reason also counts a fallback; a
    write does not; reset_stats() starts from zero; snapshots do not change later."""
    recorder = StatsRecorder()
    recorder.decision(True, "not_caught_up", "read_your_writes")
    recorder.decision(True, "write", "read_your_writes")
    recorder.decision(False, "read", "eventual")
    recorder.rerun("replica_failed")
    before = recorder.snapshot({"malformed": 2})
    assert dict(before.fallbacks) == {"not_caught_up": 1}
    assert dict(before.reruns) == {"replica_failed": 1}
    assert before.decisions_by_target() == {"primary": 2, "replica": 1}
    assert before.decisions_by_reason()["write"] == 1
    assert dict(before.rejected_tokens) == {"malformed": 2}
    recorder.reset()
    after = recorder.snapshot({})
    assert after.total_decisions == 0
    assert not after.fallbacks
    assert not after.reruns
    assert before.total_decisions == 3  # the earlier snapshot is unchanged
    with pytest.raises(TypeError):
        before.decisions[DecisionKey("primary", "write", "strong")] = 1  # type: ignore[index]


def test_concurrent_threads_lose_no_count() -> None:
    """Eight threads counting at once: every increment is in the total."""
    recorder = StatsRecorder()
    per_thread = 20_000

    def count() -> None:
        for _ in range(per_thread):
            recorder.decision(False, "read", "eventual")

    threads = [threading.Thread(target=count) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert recorder.snapshot({}).decisions == {
        DecisionKey("replica", "read", "eventual"): 8 * per_thread
    }


def test_lag_exclusions_are_counted_per_replica_and_reset_clears() -> None:
    """Left out for lag and readmitted are counted per replica, apart from down
    and up; reset_stats() clears them."""
    recorder = StatsRecorder()
    recorder.replica_over_max_lag("replica1")
    recorder.replica_over_max_lag("replica1")
    recorder.replica_under_max_lag("replica1")
    recorder.replica_over_max_lag("replica2")
    stats = recorder.snapshot({})
    assert dict(stats.replicas_over_max_lag) == {"replica1": 2, "replica2": 1}
    assert dict(stats.replicas_under_max_lag) == {"replica1": 1}
    assert not stats.replicas_down
    assert not stats.replicas_up
    recorder.reset()
    stats = recorder.snapshot({})
    assert not stats.replicas_over_max_lag
    assert not stats.replicas_under_max_lag


def test_rejected_tokens_are_counted_per_process() -> None:
    """A bad causal token shows in every router's stats under its reason."""
    router = sr.ReplicaRouter("sqlite://")
    try:
        before = router.stats().rejected_tokens.get("malformed", 0)
        with sr.causal_context("not a token"):
            pass
        assert router.stats().rejected_tokens.get("malformed", 0) == before + 1
    finally:
        router.dispose()


# -- real topologies ------------------------------------------------------------------


@pytest.fixture
def router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    """A started router over one replica (wait_timeout 0.2 s), the item table
    replicated, counters reset."""
    engine = sa.create_engine(topology.primary_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    topology.wait_for_catchup()
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls[:1], wait_timeout=0.2, lag_check_interval=0.1
    )
    router.start()
    router.reset_stats()
    yield router
    router.dispose()


def test_counters_match_a_known_sequence(router: sr.ReplicaRouter, topology: Topology) -> None:
    """Each statement of a known sequence is one decision under its target, reason
    and level; a wait the paused replica refuses at once (counted as failed) and
    the fallback it causes are counted once."""
    with router.sessionmaker()() as session:
        with sr.consistency("eventual"):
            session.execute(sa.select(Item)).all()  # replica, read
            session.execute(sa.select(Item)).all()
        with sr.consistency("strong"):
            session.execute(sa.select(Item)).all()  # primary, strong
        session.execute(sa.select(Item), execution_options={"read_only": False}).all()
        session.commit()
        topology.pause_replay(0)
        session.add(Item(id=1))
        session.commit()  # primary, write (the flush)
        session.execute(sa.select(Item)).all()  # the wait is refused: primary
    stats = router.stats()
    assert dict(stats.decisions) == {
        DecisionKey("replica", "read", "eventual"): 2,
        DecisionKey("primary", "strong", "strong"): 1,
        DecisionKey("primary", "declared_write", "read_your_writes"): 1,
        DecisionKey("primary", "write", "read_your_writes"): 1,
        DecisionKey("primary", "not_caught_up", "read_your_writes"): 1,
    }
    assert dict(stats.fallbacks) == {"not_caught_up": 1}
    waits = stats.waits
    assert (waits.count, waits.reached, waits.timed_out, waits.failed) == (1, 0, 0, 1)
    assert waits.total_seconds < 0.1
    assert dict(waits.buckets)[0.1] == 1
    assert not stats.reruns
    assert not stats.replicas_down


def test_schema_behind_rerun_is_a_rerun_and_a_fallback(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """An eventual read of a table the paused replica lacks: a replica decision,
    then a rerun on the primary, counted as a schema_behind rerun and fallback."""
    topology.pause_replay(0)
    with router.primary.begin() as conn:
        conn.execute(sa.text("CREATE TABLE fresh_table (id INTEGER)"))
    with sr.consistency("eventual"), router.sessionmaker()() as session:
        session.execute(sa.text("SELECT id FROM fresh_table")).all()
    stats = router.stats()
    assert dict(stats.decisions) == {
        DecisionKey("replica", "read", "eventual"): 1,
        DecisionKey("primary", "schema_behind", "eventual"): 1,
    }
    assert dict(stats.reruns) == {"schema_behind": 1}
    assert dict(stats.fallbacks) == {"schema_behind": 1}


def test_replica_down_and_up_are_counted(router: sr.ReplicaRouter, topology: Topology) -> None:
    """A stopped replica is counted down once by the lag monitor, and up once it
    answers again."""
    topology.stop_replica(0)
    wait_until(
        lambda: router.stats().replicas_down.get("replica1") == 1,
        timeout=20,
        what="replica1 counted down",
    )
    topology.start_replica(0)
    wait_until(
        lambda: router.stats().replicas_up.get("replica1") == 1,
        timeout=40,
        what="replica1 counted up",
    )
    stats = router.stats()
    assert dict(stats.replicas_down) == {"replica1": 1}
    assert dict(stats.replicas_up) == {"replica1": 1}


def test_replica_left_out_for_lag_and_back_is_counted(topology: Topology) -> None:
    """A replica whose replay is paused while the primary commits goes over
    max_lag (1 s): counted once as left out for lag, and not as down; once
    replay resumes and it catches up, counted once as back under max_lag. The
    other replica, never behind, is counted in neither."""
    engine = sa.create_engine(topology.primary_url)
    Base.metadata.create_all(engine)
    topology.wait_for_catchup()
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls, max_lag=1.0, lag_check_interval=0.1
    )
    try:
        router.start()
        wait_until(
            lambda: all(s.healthy for s in router.status()), timeout=20, what="replicas healthy"
        )
        router.reset_stats()
        topology.pause_replay(0)
        with engine.begin() as conn:
            conn.execute(sa.insert(Item).values(id=1))
        wait_until(
            lambda: router.stats().replicas_over_max_lag.get("replica1") == 1,
            timeout=30,
            what="replica1 counted over max_lag",
        )
        stats = router.stats()
        assert dict(stats.replicas_under_max_lag) == {}
        assert dict(stats.replicas_down) == {}
        topology.resume_replay(0)
        wait_until(
            lambda: router.stats().replicas_under_max_lag.get("replica1") == 1,
            timeout=30,
            what="replica1 counted back under max_lag",
        )
        stats = router.stats()
        assert dict(stats.replicas_over_max_lag) == {"replica1": 1}
        assert dict(stats.replicas_under_max_lag) == {"replica1": 1}
        assert dict(stats.replicas_down) == {}
        assert dict(stats.replicas_up) == {}
    finally:
        router.dispose()
        engine.dispose()


def test_concurrent_threads_on_real_sessions_lose_no_count(router: sr.ReplicaRouter) -> None:
    """Six threads, each running 50 eventual reads in its own session: 300 replica
    decisions, no more, no less."""
    errors: list[BaseException] = []

    def reads() -> None:
        try:
            with sr.consistency("eventual"), router.sessionmaker()() as session:
                for _ in range(50):
                    session.execute(sa.select(Item)).all()
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=reads) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert dict(router.stats().decisions) == {DecisionKey("replica", "read", "eventual"): 300}


def test_concurrent_async_tasks_lose_no_count(topology: Topology) -> None:
    """Ten asyncio tasks (within the pool size), each running ten eventual reads: 100
    replica decisions."""
    engine = sa.create_engine(topology.primary_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    topology.wait_for_catchup()

    async def main() -> sr.RouterStats:
        router: sr.ReplicaRouter[AsyncEngine] = sr.ReplicaRouter(
            topology.async_primary_url, topology.async_replica_urls[:1]
        )
        await router.astart()
        router.reset_stats()
        maker = router.async_sessionmaker()

        @sr.consistency("eventual")
        async def reads() -> None:
            async with maker() as session:
                for _ in range(10):
                    (await session.execute(sa.select(Item))).all()

        try:
            await asyncio.gather(*(reads() for _ in range(10)))
            return router.stats()
        finally:
            await router.adispose()

    stats = asyncio.run(main())
    assert dict(stats.decisions) == {DecisionKey("replica", "read", "eventual"): 100}
