"""explain(): each routed statement with its target, reason, level, waits and reruns."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.explain import ExplainEntry, ExplainLog, ExplainRerun, ExplainWait
from sqlalchemy_replicas.testing import Topology, wait_until


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "note"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    text: Mapped[str] = mapped_column(sa.String(50))


# -- pure parts (no database) ------------------------------------------------------


def entry(target: str, reason: sr.ReasonCode = "read", **kw: object) -> ExplainEntry:
    return ExplainEntry(
        str(kw.get("statement", "SELECT 1")),
        target,
        reason,
        "because",
        "read_your_writes",
        waits=kw.get("waits", ()),  # type: ignore[arg-type]
        reruns=kw.get("reruns", ()),  # type: ignore[arg-type]
    )


def test_log_helpers_filter_and_list() -> None:
    """targets(), reasons(), on_replicas(), on_primary(), waited(), rerun() and
    matching() select by what each entry says."""
    wait = ExplainWait("replica1", "0/3000148", 0.012, "reached")
    rerun = ExplainRerun("replica2", "schema_behind", "no such table")
    log = ExplainLog(
        [
            entry("primary", "write", statement="INSERT INTO note"),
            entry("replica1", "caught_up_after_wait", waits=(wait,)),
            entry("primary", "schema_behind", reruns=(rerun,), statement="SELECT x FROM new"),
        ]
    )
    assert log.targets() == ["primary", "replica1", "primary"]
    assert log.reasons() == ["write", "caught_up_after_wait", "schema_behind"]
    assert log.on_replicas().targets() == ["replica1"]
    assert log.on_primary().reasons() == ["write", "schema_behind"]
    assert log.waited()[0].wait == wait
    assert log.rerun()[0].reruns == (rerun,)
    assert log.matching("insert").targets() == ["primary"]
    assert log[1:].targets() == ["replica1", "primary"]
    assert log[1].on_replica
    assert log[1].target_kind == "replica"
    assert not log[0].on_replica
    assert log[0].wait is None


def test_str_of_a_log_names_target_reason_wait_and_rerun() -> None:
    """str(log) shows each statement with its target, level, reason, the wait's
    position, duration and outcome, and reruns."""
    wait = ExplainWait("replica1", "0/3000148", 0.0125, "reached")
    rerun = ExplainRerun("replica2", "replica_failed", "went away")
    text = str(
        ExplainLog([entry("replica1", "caught_up_after_wait", waits=(wait,), reruns=(rerun,))])
    )
    assert "1 statement(s)" in text
    assert "replica1 [read_your_writes] caught_up_after_wait: because" in text
    assert "waited 12.5 ms on replica1 for 0/3000148: reached" in text
    assert "rerun: replica2 replica_failed (went away)" in text
    assert str(ExplainLog()) == "explain: no statement routed"


def test_entries_are_frozen() -> None:
    """An entry cannot be changed after the fact."""
    with pytest.raises(AttributeError):
        entry("primary").target = "replica1"  # type: ignore[misc]


@pytest.fixture
def sqlite_router(tmp_path: Path) -> Iterator[sr.ReplicaRouter]:
    """A router without replicas over a SQLite database file."""
    router = sr.ReplicaRouter(f"sqlite:///{tmp_path / 'explain.db'}")
    Base.metadata.create_all(router.primary)
    yield router
    router.dispose()


def test_nothing_is_recorded_outside_a_block(sqlite_router: sr.ReplicaRouter) -> None:
    """Statements before and after the block are not in its log; nested blocks
    each get the statements run in them, the outer one all of them."""
    with sqlite_router.sessionmaker()() as session:
        session.execute(sa.select(Note)).all()
        with sr.explain() as outer:
            session.execute(sa.select(Note.id)).all()
            with sr.explain() as inner:
                session.execute(sa.select(Note.text)).all()
            session.execute(sa.select(Note)).all()
        session.execute(sa.select(Note)).all()
    assert [e.statement for e in outer] == [
        "SELECT note.id FROM note",
        "SELECT note.text FROM note",
        "SELECT note.id, note.text FROM note",
    ]
    assert [e.statement for e in inner] == ["SELECT note.text FROM note"]
    assert outer.reasons() == ["no_replicas"] * 3


def test_a_flush_is_one_entry(sqlite_router: sr.ReplicaRouter) -> None:
    """A flush is recorded once (SQLAlchemy asks for its connection more than
    once), as a write; a later flush in the same transaction as pinned."""
    with sr.explain() as log, sqlite_router.sessionmaker()() as session:
        session.add(Note(id=1, text="a"))
        session.flush()
        session.add(Note(id=2, text="b"))
        session.commit()
    assert [(e.statement, e.reason) for e in log] == [("flush", "write"), ("flush", "pinned")]


def test_blocks_are_isolated_per_thread(sqlite_router: sr.ReplicaRouter) -> None:
    """A block in one thread does not record another thread's statements."""
    started, release = threading.Event(), threading.Event()

    def other() -> None:
        started.wait(10)
        with sqlite_router.sessionmaker()() as session:
            session.execute(sa.select(Note.text)).all()
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    with sr.explain() as log, sqlite_router.sessionmaker()() as session:
        started.set()
        assert release.wait(10)
        session.execute(sa.select(Note.id)).all()
    thread.join()
    assert [e.statement for e in log] == ["SELECT note.id FROM note"]


def test_decorator_appends_each_call(sqlite_router: sr.ReplicaRouter) -> None:
    """explain() as a decorator of sync and async functions appends every call's
    statements to its log, and nothing outside the calls."""
    explained = sr.explain()

    @explained
    def view() -> None:
        with sqlite_router.sessionmaker()() as session:
            session.execute(sa.select(Note.id)).all()

    @explained
    async def async_view() -> int:
        with sqlite_router.sessionmaker()() as session:
            session.execute(sa.select(Note.text)).all()
        return 7

    view()
    assert asyncio.run(async_view()) == 7
    with sqlite_router.sessionmaker()() as session:
        session.execute(sa.select(Note)).all()
    assert [e.statement for e in explained.log] == [
        "SELECT note.id FROM note",
        "SELECT note.text FROM note",
    ]


# -- real topologies ----------------------------------------------------------------


def one_replica_router(topology: Topology, *, wait_timeout: float = 0.5) -> sr.ReplicaRouter:
    """A started router over the first replica only."""
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls[:1], wait_timeout=wait_timeout
    )
    router.start()
    return router


@pytest.fixture
def tables(topology: Topology) -> Topology:
    """The note table, created and replicated."""
    engine = sa.create_engine(topology.primary_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    topology.wait_for_catchup()
    return topology


def test_write_on_primary_then_read_on_replica_after_a_wait(tables: Topology) -> None:
    """A commit's flush is explained on the primary as a write; the read after it on
    the replica once it applied the commit, with the position waited for, the wait's
    duration (the replica's apply delay, at least) and its outcome.

    1.3 s: MariaDB's MASTER_DELAY counts whole seconds of the events' timestamps
    (seconds too), so it rounds up to 2 and a commit applies 1 to 2 s late (with 1,
    anywhere from 0 to 1 s: a commit made late in its second was applied 12 ms
    after it in a CI run)."""
    tables.set_apply_delay(0, 1.3)
    router = one_replica_router(tables, wait_timeout=5.0)
    try:
        with sr.explain() as log, router.sessionmaker()() as session:
            session.add(Note(id=1, text="hello"))
            session.commit()
            assert session.scalar(sa.select(Note.text).where(Note.id == 1)) == "hello"
        assert log.targets() == ["primary", "replica1"], log
        write, read = log
        assert (write.statement, write.reason, write.level) == (
            "flush",
            "write",
            "read_your_writes",
        )
        assert read.reason == "caught_up_after_wait"
        assert read.statement.startswith("SELECT note.text FROM note WHERE note.id =")
        wait = read.wait
        assert wait is not None
        assert wait.replica == "replica1"
        assert wait.outcome == "reached"
        assert wait.position  # the commit's LSN / GTID, as text
        assert 0.2 <= wait.seconds < 5.0
        assert wait.position in str(log)
        assert "caught_up_after_wait" in str(log)
    finally:
        router.dispose()


def test_fallback_to_the_primary_after_a_timed_out_wait(tables: Topology) -> None:
    """With the replica applying 2 s late, the read waits wait_timeout, times out
    and goes to the primary: explained as not_caught_up with the timed-out wait;
    the next read skips the wait (the replica is suspect until it applies more)."""
    tables.set_apply_delay(0, 2.0)
    router = one_replica_router(tables, wait_timeout=0.2)
    try:
        # Idle and caught up (lag 0): the plan does not yet know a commit
        # would take 2 s, so it waits (a lag measured over the budget would
        # send the read to the primary without one).
        wait_until(
            lambda: (lag := router.status()[0].lag_seconds) is not None and lag < 0.2,
            timeout=20,
            what="replica1 caught up with the table's creation",
        )
        with sr.explain() as log, router.sessionmaker()() as session:
            session.add(Note(id=1, text="hello"))
            session.commit()
            assert session.scalar(sa.select(Note.text)) == "hello"
            assert session.scalar(sa.select(Note.id)) == 1
        assert log.targets() == ["primary", "primary", "primary"], log
        assert log.reasons() == ["write", "not_caught_up", "not_caught_up"]
        wait = log[1].wait
        assert wait is not None
        assert wait.outcome == "timed_out"
        assert wait.replica == "replica1"
        assert wait.seconds >= 0.15
        assert log[2].waits == ()
    finally:
        router.dispose()


def test_fallback_to_the_primary_after_a_refused_wait(tables: Topology) -> None:
    """With replay paused, the replica refuses the wait at once and the read goes
    to the primary: explained as not_caught_up with the refused (failed) wait,
    which took no part of wait_timeout (a connect to the replica, at most)."""
    router = one_replica_router(tables, wait_timeout=2.0)
    try:
        tables.pause_replay(0)
        with sr.explain() as log, router.sessionmaker()() as session:
            session.add(Note(id=1, text="hello"))
            session.commit()
            assert session.scalar(sa.select(Note.text)) == "hello"
        assert log.targets() == ["primary", "primary"], log
        assert log.reasons() == ["write", "not_caught_up"]
        wait = log[1].wait
        assert wait is not None
        assert (wait.replica, wait.outcome) == ("replica1", "failed")
        assert wait.seconds < 1.0
    finally:
        router.dispose()


def test_schema_behind_rerun_is_explained(tables: Topology) -> None:
    """An eventual read of a table the paused replica lacks runs again on the
    primary: the entry says primary, schema_behind, and names the replica left."""
    router = one_replica_router(tables)
    try:
        tables.pause_replay(0)
        with router.primary.begin() as conn:
            conn.execute(sa.text("CREATE TABLE fresh_table (id INTEGER)"))
        with sr.explain() as log, sr.consistency("eventual"), router.sessionmaker()() as session:
            assert session.execute(sa.text("SELECT id FROM fresh_table")).all() == []
        (read,) = log
        assert (read.target, read.reason, read.level) == ("primary", "schema_behind", "eventual")
        assert [(r.replica, r.cause) for r in read.reruns] == [("replica1", "schema_behind")]
        assert read.statement == "SELECT id FROM fresh_table"
    finally:
        router.dispose()


def test_async_session_is_explained(tables: Topology) -> None:
    """In an async session, per task: a write on the primary and a read on the
    replica after a wait (reached); a concurrent task's statements stay out of it."""

    async def main() -> tuple[ExplainLog, ExplainLog]:
        router: sr.ReplicaRouter[AsyncEngine] = sr.ReplicaRouter(
            tables.async_primary_url, tables.async_replica_urls[:1], wait_timeout=5.0
        )
        await router.astart()
        maker = router.async_sessionmaker()

        async def task(note_id: int) -> ExplainLog:
            with sr.explain() as log:
                async with maker() as session:
                    session.add(Note(id=note_id, text=f"n{note_id}"))
                    await session.commit()
                    text = await session.scalar(sa.select(Note.text).where(Note.id == note_id))
                    assert text == f"n{note_id}"
            return log

        try:
            first, second = await asyncio.gather(task(1), task(2))
        finally:
            await router.adispose()
        return first, second

    for log in asyncio.run(main()):
        assert log.targets() == ["primary", "replica1"], log
        assert log[0].reason == "write"
        assert log[1].reason in ("caught_up_after_wait", "known_caught_up")
        assert all(wait.outcome == "reached" for wait in log[1].waits)
