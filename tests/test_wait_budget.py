"""One wait budget per read, across replicas, and no futile waits, on real servers.

A replica whose replay is paused refuses a wait at once, and the read goes on
to the next replica within the same ``wait_timeout``; a replica stays out of
the waits only until it is seen to apply again (by position, not for a fixed
time; after a timed-out wait, to apply a commit within the budget); when
every replica's measured lag exceeds the budget, reads go to the primary
without waiting. The flapping benchmark's pattern (one of two replicas
paused every third request) keeps most reads on replicas, never stale.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.explain import ExplainEntry
from sqlalchemy_replicas.testing import Topology, wait_until

WAIT = 0.5
_COMMIT_IDS = itertools.count(-1, -1)  # rows committed only to be applied


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "budget_row"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    value: Mapped[int]


@pytest.fixture
def router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    """A started router over both replicas (wait_timeout 0.5 s), the table replicated."""
    router = sr.ReplicaRouter(
        topology.primary_url,
        topology.replica_urls,
        wait_timeout=WAIT,
        engine_options={"pool_pre_ping": True},
    )
    Base.metadata.create_all(router.primary)
    topology.wait_for_catchup()
    router.start()
    yield router
    router.dispose()


def key_preferring(router: sr.ReplicaRouter, name: str) -> bytes:
    """A sticky key whose first choice is replica ``name``."""
    return next(
        key
        for n in range(1000)
        if router.cluster.replica_order(key := str(n).encode())[0].name == name
    )


def write_then_read(
    router: sr.ReplicaRouter, row_id: int, value: int
) -> tuple[int | None, float, ExplainEntry]:
    """Commit ``value`` in one session; read it back in another: what it read, how
    long the read took, and where it went and why."""
    make = router.sessionmaker()
    with make() as writer:
        writer.execute(sa.delete(Row).where(Row.id == row_id))
        writer.add(Row(id=row_id, value=value))
        writer.commit()
    with make() as reader, sr.explain() as log:
        started = time.perf_counter()
        seen = reader.scalar(sa.select(Row.value).where(Row.id == row_id))
        took = time.perf_counter() - started
    (entry,) = log
    return seen, took, entry


def measured_caught_up(router: sr.ReplicaRouter) -> bool:
    """Whether the monitor measures every replica of ``router`` caught up."""
    return all(s.lag_seconds is not None and s.lag_seconds < 0.2 for s in router.status())


def applied_commits_promptly(router: sr.ReplicaRouter, name: str) -> bool:
    """Commit (a commit the monitor sees applied within the budget is what ends a
    timed-out replica's suspicion), then say whether replica ``name`` is trusted
    again."""
    with router.primary.begin() as conn:
        conn.execute(sa.insert(Row).values(id=next(_COMMIT_IDS), value=0))
    return router.cluster.wait_failure(name) is None


def test_a_paused_replica_refuses_the_wait_and_the_next_one_serves(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """The key's replica is paused: its wait is refused at once (no budget spent),
    and the other replica, waited on within the same budget, serves the read. The
    paused replica is then asked last, and after it resumes it serves again."""
    key = key_preferring(router, "replica1")
    topology.pause_replay(0)
    with sr.sticky(key):
        seen, took, read = write_then_read(router, 1, 1)
    assert seen == 1
    assert (read.target, read.reason) == ("replica2", "caught_up_after_wait")
    assert [(w.replica, w.outcome) for w in read.waits] == [
        ("replica1", "failed"),
        ("replica2", "reached"),
    ]
    assert read.waits[0].seconds < WAIT / 2  # a connect at most, not the budget
    assert took < WAIT
    assert router.cluster.wait_failure("replica1") == "stopped"
    with sr.sticky(key):
        seen, _, read = write_then_read(router, 1, 2)
    assert seen == 2
    assert read.waits[0].replica == "replica2"
    topology.resume_replay(0)
    wait_until(
        lambda: router.cluster.wait_failure("replica1") is None,
        timeout=10,
        what="the monitor to see replica1 apply again",
    )
    with sr.sticky(key):
        seen, _, read = write_then_read(router, 1, 3)
    assert (seen, read.target) == (3, "replica1")


def test_a_timed_out_replica_is_suspect_until_it_applies_again(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """A wait that timed out makes the replica suspect: no read waits on it while it
    applies nothing, however long (not for a fixed second); as soon as the monitor
    sees it apply commits within the budget again, reads wait on it again."""
    key = key_preferring(router, "replica1")
    topology.set_apply_delay(0, 2.0)  # behind, but applying: waits time out
    topology.set_apply_delay(1, 2.0)
    wait_until(  # idle, so measured caught up: the plan does not know of the delay
        lambda: measured_caught_up(router),
        timeout=20,
        what="both replicas measured caught up",
    )
    with sr.sticky(key):
        seen, _, read = write_then_read(router, 1, 1)
    assert seen == 1
    assert [(w.replica, w.outcome) for w in read.waits] == [("replica1", "timed_out")]
    assert read.target == "primary"
    assert router.cluster.wait_failure("replica1") == "timed_out"
    # Now it applies nothing at all. (PostgreSQL replays the records before a
    # delayed commit at once: that progress may end the suspicion above, so
    # the failure is noted again, as a timed-out wait does, once the monitor
    # has seen it paused.)
    topology.pause_replay(0)
    paused_at = time.monotonic()

    def checked_since(moment: float) -> bool:
        return all(
            (s.lag_measured_at or 0) > moment for s in router.status() if s.name == "replica1"
        )

    wait_until(lambda: checked_since(paused_at), timeout=10, what="a check since the pause")
    router.cluster.note_wait_failed("replica1")
    wait_until(lambda: checked_since(paused_at + 1.5), timeout=10, what="checks over 1.5 s")
    assert router.cluster.wait_failure("replica1") == "timed_out"  # no progress: still suspect
    topology.set_apply_delay(0, 0)
    topology.resume_replay(0)
    wait_until(
        lambda: applied_commits_promptly(router, "replica1"),
        timeout=15,
        what="the monitor to see replica1 apply commits within the budget",
    )


def test_the_routing_log_tells_a_wait_sent_with_its_read_once_it_ended(
    router: sr.ReplicaRouter, topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """The wait travels with the read (psycopg, PyMySQL): when the read is sent
    the log cannot know whether the replica caught up, so it says so; the
    wait's outcome follows: the paused replica's read discarded, the next
    replica's read standing. (A premature "caught up" had read as if the
    paused replica served.)"""
    key = key_preferring(router, "replica1")
    topology.pause_replay(0)
    try:
        with caplog.at_level(logging.DEBUG, logger="sqlalchemy_replicas.routing"), sr.sticky(key):
            seen, _, read = write_then_read(router, 1, 1)
    finally:
        topology.resume_replay(0)
    assert (seen, read.target) == (1, "replica2")
    messages = [r.getMessage() for r in caplog.records if r.name == "sqlalchemy_replicas.routing"]
    reads = [m for m in messages if m.startswith("SELECT -> ")]
    pending = "if it applies this scope's commits in time (the wait goes with the read)"
    assert reads == [f"SELECT -> {name}: {pending}" for name in ("replica1", "replica2")]
    outcomes = [
        m for m in messages if m.startswith(("replica replica1 did", "replica replica2 ap"))
    ]
    assert len(outcomes) == 2, messages
    assert outcomes[0].startswith("replica replica1 did not apply this scope's commits (stopped")
    assert outcomes[0].endswith("the read sent with the wait is discarded")
    assert outcomes[1].endswith("the read sent with the wait stands")
    assert messages.index(outcomes[0]) < messages.index(reads[1])


def test_a_replica_applying_each_commit_late_stays_suspect_after_applying_the_missed_one(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """A replica applies every commit over 1 s late (more than the 0.5 s budget),
    and the monitor has not measured it (idle, caught up). A read's wait times
    out on it once; then it applies that commit, late: still suspect (it applied
    no commit within the budget), so the reads after the next commits go to the
    primary at once, never stale, instead of each waiting the budget out. Once
    it is seen applying commits within the budget, reads wait on it again.

    A router over that replica alone: with a second one, whether the second
    read waits on it or skips it (the monitor measuring its lag over the budget
    while the first read waited) is a race."""
    del router  # its table and catch-up only
    alone = sr.ReplicaRouter(
        topology.primary_url,
        topology.replica_urls[:1],
        wait_timeout=WAIT,
        engine_options={"pool_pre_ping": True},  # setting the delay may restart the replica
    )
    alone.start()
    try:
        # PostgreSQL applies each commit 2 s late; MariaDB's MASTER_DELAY counts
        # whole seconds of event timestamps: 1-2 s.
        topology.set_apply_delay(0, 2.0)
        wait_until(
            lambda: measured_caught_up(alone), timeout=20, what="replica1 measured caught up"
        )
        seen, _, read = write_then_read(alone, 1, 1)
        assert (seen, read.target) == (1, "primary")
        assert [(w.replica, w.outcome) for w in read.waits] == [("replica1", "timed_out")]
        missed_position, _ = alone.cluster.process_scope.target(alone.cluster)

        def applied_the_missed_commit() -> bool:
            known = alone.cluster.known_applied("replica1")
            positions = alone.cluster.positions
            assert positions is not None
            return known is not None and positions.reached(known, missed_position)

        wait_until(
            applied_the_missed_commit,
            timeout=10,
            what="the monitor to see replica1 apply the missed commit",
        )
        assert alone.cluster.wait_failure("replica1") == "timed_out"
        before = alone.stats().waits.count
        for value in range(2, 5):
            seen, _, read = write_then_read(alone, 1, value)
            assert (seen, read.target, read.reason) == (value, "primary", "not_caught_up")
            assert read.waits == ()  # (a time bound would add nothing but flakiness)
        assert alone.stats().waits.count == before
        topology.set_apply_delay(0, 0)
        wait_until(
            lambda: applied_commits_promptly(alone, "replica1"),
            timeout=15,
            what="the monitor to see replica1 apply commits within the budget",
        )
        seen, _, read = write_then_read(alone, 1, 5)
        assert (seen, read.target) == (5, "replica1")
    finally:
        alone.dispose()


def test_lag_over_the_budget_sends_reads_to_the_primary_at_once(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """Both replicas apply each commit 2 s late (more than the 0.5 s budget), and
    the monitor has measured it: a read right after a commit goes to the primary
    without waiting (no wait sent, none counted), never stale."""
    topology.set_apply_delay(0, 2.0)
    topology.set_apply_delay(1, 2.0)
    counter = iter(range(1, 10_000))

    def lag_known() -> bool:
        with router.primary.begin() as conn:  # keeps the lag measurable
            conn.execute(sa.insert(Row).values(id=100_000 + next(counter), value=0))
        return all(s.lag_seconds is not None and s.lag_seconds > WAIT for s in router.status())

    wait_until(lag_known, timeout=30, what="both replicas measured over the budget")
    before = router.stats().waits.count
    for value in range(1, 11):
        seen, _, read = write_then_read(router, 1, value)
        assert seen == value
        assert (read.target, read.reason) == ("primary", "not_caught_up")
        assert read.waits == ()
    assert router.stats().waits.count == before


def test_flapping_replicas_keep_most_reads_on_replicas(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """One of two replicas paused every third request (the other resumed): every
    read sees its own write, none takes longer than wait_timeout, and most are
    served by a replica."""
    served: list[str] = []
    took: list[float] = []
    for request in range(60):
        if request % 3 == 0:
            paused = (request // 3) % 2
            topology.resume_replay(1 - paused)
            topology.pause_replay(paused)
        seen, seconds, read = write_then_read(router, request % 5, request)
        assert seen == request
        took.append(seconds)
        served.append(read.target)
    replica_share = sum(node != "primary" for node in served) / len(served)
    assert replica_share > 0.5, served
    assert max(took) < WAIT
