"""Causal consistency against real replication lag: read-your-writes by position,
waits, fallbacks, tokens across app servers, and the other consistency levels."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas import causal
from sqlalchemy_replicas import token as tokens
from sqlalchemy_replicas.exc import ConfigurationError
from sqlalchemy_replicas.testing import PostgresTopology, StatementLog, Topology
from sqlalchemy_replicas.testing._process import wait_until

SECRET = "test-secret"
WAIT = 0.5


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(sa.String(50))


def make_router(
    urls: tuple[sa.URL, ...], primary: sa.URL, *, wait_timeout: float = WAIT
) -> sr.ReplicaRouter:
    return sr.ReplicaRouter(primary, urls, secret=SECRET, wait_timeout=wait_timeout)


@pytest.fixture
def router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    """A router over both replicas, with the item table created and replicated."""
    router = make_router(topology.replica_urls, topology.primary_url)
    Base.metadata.create_all(router.primary)
    topology.wait_for_catchup()
    yield router
    router.dispose()


def item_reads(log: StatementLog) -> list[str]:
    """Nodes of the SELECTs on the item table, in order."""
    return [
        s.node
        for s in log.statements
        if s.sql.lstrip().upper().startswith("SELECT") and "item" in s.sql
    ]


def write_then_read(router: sr.ReplicaRouter, item_id: int) -> str | None:
    """Commit a row in one session and read it back in another, in one causal context."""
    with sr.causal_context():
        with router.sessionmaker()() as writer:
            writer.add(Item(id=item_id, note=f"n{item_id}"))
            writer.commit()
        with router.sessionmaker()() as reader:
            return reader.scalar(sa.select(Item.note).where(Item.id == item_id))


def test_read_your_writes_is_never_stale_while_replicas_pause_and_resume(
    topology: Topology,
) -> None:
    """Commit-then-read rounds through phases of paused replay (none, either one, both,
    none): no read ever misses its own write, no paused replica serves one, and once a
    phase has settled (the lag monitor has seen a replica that resumed apply again, so
    the router no longer suspects it), reads go to a replica whenever one applies: a
    paused replica refuses a wait at once and the read goes on to the other one within
    the same budget. Only with both paused does the primary serve."""
    wait = 0.2
    router = make_router(topology.replica_urls, topology.primary_url, wait_timeout=wait)
    Base.metadata.create_all(router.primary)
    topology.wait_for_catchup()
    settle, observe = router.lag_check_interval + wait, 0.5
    item_id = 0
    try:
        for paused in [(), (0,), (1,), (0, 1), ()]:
            for replica in (0, 1):
                if replica in paused:
                    topology.pause_replay(replica)
                else:
                    topology.resume_replay(replica)
            started = time.monotonic()
            settled: list[str] = []
            while (elapsed := time.monotonic() - started) < settle + observe:
                item_id += 1
                with StatementLog(router) as log:
                    assert write_then_read(router, item_id) == f"n{item_id}"
                served = item_reads(log)
                assert not {f"replica{r + 1}" for r in paused} & set(served)
                if elapsed > settle:
                    settled += served
            assert settled
            if len(paused) == 2:
                assert set(settled) == {"primary"}
            else:
                assert "primary" not in settled
                assert len(settled) > 2
    finally:
        router.dispose()


def test_same_session_reads_its_commit_through_expire_on_commit(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """The refresh after commit (expire_on_commit) is the classic hazard: it must see
    the commit, from a replica that has applied it, while the other one is paused."""
    topology.pause_replay(1)
    with StatementLog(router) as log, router.sessionmaker()() as session:
        item = Item(id=1, note="fresh")
        session.add(item)
        session.commit()
        assert item.note == "fresh"
    assert item_reads(log) == ["replica1"]


def test_all_replicas_paused_reads_fall_back_to_the_primary_within_wait_timeout(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """No replica applies the commit: the read waits at most wait_timeout, then the
    primary serves it; once replay resumes, reads return to the replicas."""
    topology.pause_replay(0)
    topology.pause_replay(1)
    with StatementLog(router) as log:
        started = time.monotonic()
        assert write_then_read(router, 1) == "n1"
        elapsed = time.monotonic() - started
        assert item_reads(log) == ["primary"]
        assert elapsed < WAIT + 1.5
        topology.resume_replay(0)
        topology.resume_replay(1)
        log.clear()
        assert write_then_read(router, 2) == "n2"
        assert item_reads(log)[0].startswith("replica")


def test_token_carries_a_commit_to_another_app_server(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """A commit's token, given to another router (new engines, as another app server has,
    already serving before the commit) with the same name and secret, makes its read see
    the row although its only replica lags; without the token that replica serves a stale
    read: the other server's own scope holds only what it committed and what the primary
    had when it started."""
    other_server = make_router(topology.replica_urls[:1], topology.primary_url)
    try:
        with other_server.sessionmaker()() as session:  # serving: its start position is read
            assert session.scalar(sa.select(Item.note)) is None
        topology.pause_replay(0)
        with sr.causal_context() as ctx:
            with router.sessionmaker()() as session:
                session.add(Item(id=1, note="carried"))
                session.commit()
            token = ctx.token
        assert token is not None

        with StatementLog(other_server) as log:
            with sr.causal_context(token), other_server.sessionmaker()() as session:
                assert session.scalar(sa.select(Item.note)) == "carried"
            with sr.causal_context(None), other_server.sessionmaker()() as session:
                assert session.scalar(sa.select(Item.note)) is None  # stale, as allowed
        assert item_reads(log) == ["primary", "replica1"]
    finally:
        other_server.dispose()


def test_token_passes_on_through_a_request_that_did_not_write(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """A request that only reads returns a token that still carries the earlier commit."""
    topology.pause_replay(0)
    topology.pause_replay(1)
    with sr.causal_context() as first, router.sessionmaker()() as session:
        session.add(Item(id=1, note="kept"))
        session.commit()
    with sr.causal_context(first.token) as second, router.sessionmaker()() as session:
        assert session.scalar(sa.select(Item.note)) == "kept"
    with sr.causal_context(second.token), router.sessionmaker()() as session:
        assert session.scalar(sa.select(Item.note)) == "kept"


def test_core_commits_in_a_causal_context_belong_to_its_scope(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """A row written with Core through router.primary is read by the ORM in the same
    causal context, with one replica paused."""
    topology.pause_replay(0)
    primary = router.primary
    with StatementLog(router) as log, sr.causal_context():
        for i in range(4):
            with primary.begin() as conn:
                conn.execute(sa.insert(Item).values(id=i, note=f"core{i}"))
            with router.sessionmaker()() as session:
                assert session.scalar(sa.select(Item.note).where(Item.id == i)) == f"core{i}"
    assert "replica1" not in item_reads(log)


def test_eventual_may_read_stale_from_a_lagging_replica(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """eventual reads go to any replica, even one that has not applied the session's
    commit; the default level in the same session does not."""
    topology.pause_replay(0)
    only_paused = make_router(topology.replica_urls[:1], topology.primary_url)
    try:
        with StatementLog(only_paused) as log, only_paused.sessionmaker()() as session:
            session.add(Item(id=1, note="new"))
            session.commit()
            with sr.consistency("eventual"):
                assert session.scalar(sa.select(Item.note)) is None
            assert session.scalar(sa.select(Item.note)) == "new"
        assert item_reads(log) == ["replica1", "primary"]
    finally:
        only_paused.dispose()


def test_strong_reads_use_the_primary_and_bounded_ones_a_measured_replica(
    router: sr.ReplicaRouter,
) -> None:
    """strong always uses the primary; bounded, a replica measured within
    max_lag, even on a new router's first read (it waits for the monitor's
    first check)."""
    with StatementLog(router) as log, router.sessionmaker()() as session:
        for level in ("strong", "bounded"):
            with sr.consistency(level):
                session.scalar(sa.select(Item.note))
        session.scalar(sa.select(Item.note).execution_options(consistency="strong"))
        session.scalar(sa.select(Item.note))
    reads = item_reads(log)
    assert [reads[0], reads[2]] == ["primary"] * 2
    assert reads[1].startswith("replica")
    assert reads[3].startswith("replica")


def test_monotonic_reads_never_go_back_in_time(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """With replicas at different positions, eventual reads go back and forth in time;
    monotonic reads never go back, also when they move to another replica (after a
    commit the first cannot apply) or to the primary and back to a replica."""
    primary = router.primary

    def set_note(version: int) -> None:  # outside any causal scope
        with primary.begin() as conn:
            conn.execute(sa.update(Item).where(Item.id == 1).values(note=f"v{version}"))

    with primary.begin() as conn:
        conn.execute(sa.insert(Item).values(id=1, note="v0"))
    topology.wait_for_catchup()
    topology.pause_replay(0)
    set_note(1)
    topology.wait_for_catchup()  # replica2 has v1, replica1 still v0

    def read(session: sr.RoutingSession) -> int:
        note = session.scalar(sa.select(Item.note).where(Item.id == 1))
        assert note is not None
        return int(note[1:])

    make = router.sessionmaker()
    with make() as session, sr.consistency("eventual"):
        eventual = [read(session) for _ in range(4)]
    assert any(later < earlier for earlier, later in itertools.pairwise(eventual))

    seen: list[int] = []
    with StatementLog(router) as log, sr.causal_context(), sr.consistency("monotonic"):
        with make() as session:
            seen += [read(session) for _ in range(3)]
        with make() as session:  # a commit replica1 (paused) cannot apply
            session.execute(sa.update(Item).where(Item.id == 1).values(note="v2"))
            session.commit()
            seen.append(read(session))
        topology.pause_replay(1)
        topology.resume_replay(0)
        with make() as session:
            seen += [read(session) for _ in range(3)]
        topology.pause_replay(0)  # both paused: a commit only the primary has
        with make() as session:
            session.execute(sa.update(Item).where(Item.id == 1).values(note="v3"))
            session.commit()
            seen.append(read(session))
        topology.resume_replay(0)
        wait_until(  # seen applying again, and its lag measured since its pause
            lambda: (
                router.cluster.wait_failure("replica1") is None
                and (lag := router.status()[0].lag_seconds) is not None
                and lag <= WAIT
            ),
            timeout=10,
            what="the router to see replica1 applying and caught up",
        )
        with make() as session:
            seen += [read(session) for _ in range(3)]
    topology.resume_replay(1)
    assert seen == sorted(seen)
    assert seen[-1] == 3
    assert "replica1" in item_reads(log)[-3:] or "replica2" in item_reads(log)[-3:]


def test_session_default_consistency(router: sr.ReplicaRouter) -> None:
    """A sessionmaker's consistency= is the session default; consistency() wins over it."""
    with StatementLog(router) as log, router.sessionmaker(consistency="strong")() as session:
        session.scalar(sa.select(Item.note))
        with sr.consistency("eventual"):
            session.scalar(sa.select(Item.note))
    assert item_reads(log)[0] == "primary"
    assert item_reads(log)[1].startswith("replica")


def test_default_consistency_block_is_weaker_than_every_explicit_level(
    router: sr.ReplicaRouter,
) -> None:
    """default_consistency() (a request's default) decides when nothing else
    does; consistency(), a statement's option and a session's own
    consistency= each win over it."""
    router.start()
    make = router.sessionmaker()
    with StatementLog(router) as log, sr.default_consistency("strong"):
        with make() as session:
            session.scalar(sa.select(Item.note))  # the block's default: strong
            with sr.consistency("eventual"):
                session.scalar(sa.select(Item.note))
            session.scalar(sa.select(Item.note).execution_options(consistency="eventual"))
        with router.sessionmaker(consistency="eventual")() as session:
            session.scalar(sa.select(Item.note))
    with StatementLog(router) as after, make() as session:
        session.scalar(sa.select(Item.note))  # outside: the router's read_your_writes
    reads = item_reads(log)
    assert reads[0] == "primary"
    assert all(node.startswith("replica") for node in reads[1:]), reads
    assert item_reads(after)[0].startswith("replica")


def test_forged_and_broken_tokens_are_ignored_and_counted(
    router: sr.ReplicaRouter, caplog: pytest.LogCaptureFixture
) -> None:
    """Garbage, and a token signed with another secret, never raise into the request:
    they are ignored, counted by reason, and logged."""
    with sr.causal_context() as ctx, router.sessionmaker()() as session:
        session.add(Item(id=1, note="x"))
        session.commit()
        genuine = ctx.token
    assert genuine is not None
    entries = sr.token.decode(genuine)
    forged = sr.token.encode(
        {
            name: sr.token.sign(
                "guess", name, entry.kind, entry.lineage, entry.position, entry.issued_at
            )
            for name, entry in entries.items()
        }
    )
    before = dict(causal.rejected_tokens)
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_replicas.causal"):
        for token in ("garbage!", "A" * 10_000, forged):
            with sr.causal_context(token), router.sessionmaker()() as session:
                assert session.scalar(sa.select(Item.note)) in ("x", None)
    after = causal.rejected_tokens
    assert after["malformed"] == before.get("malformed", 0) + 1
    assert after["oversized"] == before.get("oversized", 0) + 1
    assert after["bad_signature"] == before.get("bad_signature", 0) + 1
    assert "ignored a causal token" in caplog.text


def test_a_token_with_an_overflowing_issued_at_is_ignored_not_raised(
    router: sr.ReplicaRouter, topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """The reported break: a genuine token whose issued-at field is rewritten to
    10**400 (float() overflows) made causal_context() raise OverflowError into the
    request. Now it is counted as malformed and logged, and the block's read is served."""
    with sr.causal_context() as ctx, router.sessionmaker()() as session:
        session.add(Item(id=1, note="x"))
        session.commit()
        genuine = ctx.token
    assert genuine is not None
    topology.wait_for_catchup()
    body = json.loads(base64.urlsafe_b64decode(genuine + "=" * (-len(genuine) % 4)))
    for entry in body["e"].values():
        entry[3] = 10**400
    crafted = base64.urlsafe_b64encode(json.dumps(body).encode()).rstrip(b"=").decode()
    before = causal.rejected_tokens["malformed"]
    with (
        caplog.at_level(logging.WARNING, logger="sqlalchemy_replicas.causal"),
        sr.causal_context(crafted) as crafted_ctx,
        router.sessionmaker()() as session,
    ):
        assert session.scalar(sa.select(Item.note)) == "x"
        assert crafted_ctx.token is None  # nothing of the crafted token is carried on
    assert causal.rejected_tokens["malformed"] == before + 1
    assert "issued-at" in caplog.text


def test_token_without_a_secret_is_a_configuration_error(topology: Topology) -> None:
    """Producing a token needs the router's secret: a clear error names the fix."""
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    try:
        Base.metadata.create_all(router.primary)
        with sr.causal_context() as ctx, router.sessionmaker()() as session:
            session.add(Item(id=1, note="x"))
            session.commit()
            with pytest.raises(ConfigurationError, match="has no secret"):
                _ = ctx.token
    finally:
        router.dispose()


def test_async_read_your_writes_in_concurrent_tasks(
    topology: Topology,
) -> None:
    """Async drivers, concurrent tasks, each its own causal context: no stale read,
    and the paused replica serves none of them."""
    topology.pause_replay(0)
    router = sr.ReplicaRouter[AsyncEngine](
        topology.async_primary_url, topology.async_replica_urls, secret=SECRET, wait_timeout=WAIT
    )

    async def one(item_id: int) -> str | None:
        maker = router.async_sessionmaker()
        with sr.causal_context():
            async with maker() as session:
                session.add(Item(id=item_id, note=f"a{item_id}"))
                await session.commit()
            async with maker() as session:
                note: str | None = await session.scalar(
                    sa.select(Item.note).where(Item.id == item_id)
                )
                return note

    async def main() -> list[str | None]:
        async with router.primary.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        try:
            return list(await asyncio.gather(*(one(i) for i in range(12))))
        finally:
            await router.adispose()

    with StatementLog(router) as log:
        notes = asyncio.run(main())
    assert notes == [f"a{i}" for i in range(12)]
    assert "replica1" not in item_reads(log)
    assert "replica2" in item_reads(log)


@pytest.mark.postgresql
def test_read_your_writes_with_synchronous_commit_off() -> None:
    """With synchronous_commit=off the commit's position is still covered (the insert
    LSN, not the flush LSN): no stale read."""
    with PostgresTopology(replicas=1, settings={"synchronous_commit": "off"}) as topology:
        router = make_router(topology.replica_urls, topology.primary_url)
        try:
            Base.metadata.create_all(router.primary)
            notes = [write_then_read(router, i) for i in range(30)]
            assert notes == [f"n{i}" for i in range(30)]
        finally:
            router.dispose()


def test_token_from_another_primary_history_sends_reads_to_the_primary(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """A genuine token (same name and secret) whose position comes from another
    cluster cannot be compared with this one's positions: reads must see all the
    primary has (here only the primary does), and the token is counted as
    other_lineage."""
    other_cluster = type(topology)(replicas=1).start()
    try:
        elsewhere = make_router(other_cluster.replica_urls, other_cluster.primary_url)
        Base.metadata.create_all(elsewhere.primary)
        with sr.causal_context() as ctx, elsewhere.sessionmaker()() as session:
            session.add(Item(id=1, note="elsewhere"))
            session.commit()
            token = ctx.token
        elsewhere.dispose()
    finally:
        other_cluster.stop()
    topology.pause_replay(0)
    topology.pause_replay(1)
    with router.primary.begin() as conn:
        conn.execute(sa.insert(Item).values(id=1, note="here"))
    before = causal.rejected_tokens["other_lineage"]
    with StatementLog(router) as log, sr.causal_context(token), router.sessionmaker()() as session:
        assert session.scalar(sa.select(Item.note)) == "here"
    # Everything the primary has must be read: the paused replicas do not.
    assert item_reads(log) == ["primary"]
    assert causal.rejected_tokens["other_lineage"] == before + 1


def test_a_lost_commit_position_is_replaced_by_the_primary_s_current_one(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """A commit whose position could not be read (the scope is marked unknown):
    reads see it (from the primary while the replicas lag), and once the replicas
    have the primary's position of then, reads go back to them."""
    topology.pause_replay(0)
    topology.pause_replay(1)
    with router.primary.begin() as conn:
        conn.execute(sa.insert(Item).values(id=1, note="lost position"))
    make = router.sessionmaker()
    with sr.causal_context() as ctx:
        ctx.scope.mark_unknown(router.cluster)
        with StatementLog(router) as log, make() as session:
            assert session.get(Item, 1) is not None
        assert item_reads(log) == ["primary"]
        topology.resume_replay(0)
        topology.resume_replay(1)
        topology.wait_for_catchup()
        with StatementLog(router) as log, make() as session:
            assert session.get(Item, 1) is not None
        assert item_reads(log) in (["replica1"], ["replica2"])


def test_a_token_carries_a_position_that_could_not_be_read(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """The scope lost a commit's position and the primary is down when the token
    is made: the token says so, and the next request (primary back) reads all
    the primary has, not a lagging replica's state."""
    router.cluster.lineage()  # read while the primary was up, as any earlier commit does
    with sr.causal_context() as ctx:
        ctx.scope.mark_unknown(router.cluster)
        topology.stop_primary()
        token = ctx.token
    assert token is not None
    assert [e.position for e in tokens.decode(token).values()] == [tokens.UNKNOWN_POSITION]

    topology.start_primary()
    topology.pause_replay(0)
    topology.pause_replay(1)
    with router.primary.begin() as conn:
        conn.execute(sa.insert(Item).values(id=2, note="after"))
    with sr.causal_context(token), router.sessionmaker()() as session:
        assert session.get(Item, 2) is not None


def test_async_token_with_an_unknown_position_needs_no_io_outside_the_loop(
    topology: Topology, recwarn: pytest.WarningsRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    """ctx.token read in a coroutine, after a commit whose position was lost:
    an async router cannot ask the primary there, so the entry travels as
    "unknown" (the next request resolves it or reads from the primary),
    without touching its pool from outside a greenlet."""
    router = sr.ReplicaRouter[AsyncEngine](
        topology.async_primary_url, topology.async_replica_urls, secret=SECRET
    )

    async def main() -> str | None:
        try:
            async with router.async_sessionmaker()() as session:
                await session.execute(sa.text("SELECT 1"))  # the lineage is known now
            with sr.causal_context() as ctx:
                ctx.scope.mark_unknown(router.cluster)
                return ctx.token
        finally:
            await router.adispose()

    with caplog.at_level(logging.ERROR):
        token = asyncio.run(main())
    assert token is not None
    assert tokens.decode(token)["default"].position == tokens.UNKNOWN_POSITION
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
