"""A router's life: what dispose() takes back, what a dropped router leaves
behind, and how the lag monitor connects (as the sessions do)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import threading
import weakref
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import StatementLog, Topology, wait_until

INTERVAL = 0.1
_names = itertools.count()

metadata = sa.MetaData()
item = sa.Table("item", metadata, sa.Column("id", sa.Integer, primary_key=True))


# -- helpers ------------------------------------------------------------------


def listeners_of(engine: Engine) -> dict[tuple[str, str], list[Any]]:
    """Every event listener on ``engine``, its pool and its dialect, by
    (owner, event name)."""
    found: dict[tuple[str, str], list[Any]] = {}
    owners: list[tuple[str, Any]] = [
        ("engine", engine),
        ("pool", engine.pool),
        ("dialect", engine.dialect),
    ]
    for label, owner in owners:
        dispatch = owner.dispatch
        for name in dispatch._event_names:
            fns = list(getattr(dispatch, name))
            if fns:
                found[label, name] = fns
    return found


def added_listeners(
    before: dict[tuple[str, str], list[Any]], now: dict[tuple[str, str], list[Any]]
) -> list[tuple[str, str, Any]]:
    """The listeners in ``now`` that were not in ``before``."""
    return [
        (label, name, fn)
        for (label, name), fns in now.items()
        for fn in fns
        if fn not in before.get((label, name), [])
    ]


def assert_left_as_before(
    engine: Engine,
    before: dict[tuple[str, str], list[Any]],
    added: list[tuple[str, str, Any]],
    skip_rollback: bool,
) -> None:
    """``engine`` has exactly its own listeners again, and its dialect setting."""
    owners = {"engine": engine, "pool": engine.pool, "dialect": engine}
    for label, name, fn in added:
        assert not event.contains(owners[label], name, fn), (label, name, fn)
    assert listeners_of(engine) == before
    assert engine.dialect.skip_autocommit_rollback is skip_rollback


def server_connections(admin: sa.Connection) -> int:
    """Client connections the server has now (admin's own included)."""
    if admin.dialect.name == "postgresql":
        sql = "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
        return int(admin.execute(sa.text(sql)).scalar_one())
    row = admin.execute(sa.text("SHOW STATUS LIKE 'Threads_connected'")).one()
    return int(row[1])


def monitor_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"sqlalchemy-replicas-monitor-{name}"]


def use_and_drop(topology: Topology, name: str) -> list[weakref.ReferenceType[Any]]:
    """Build a router from URLs, reflect on its primary, commit and read
    (the monitor starts), and drop it without dispose(). Returns weak
    references to the router and its engines."""
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls, lag_check_interval=INTERVAL, name=name
    )
    metadata.create_all(router.primary)
    assert sa.inspect(router.primary).has_table("item")
    with router.sessionmaker()() as session:
        session.execute(item.insert(), [{"id": next(_names)}])
        session.commit()
        session.execute(sa.select(item)).all()
    assert monitor_threads(name), "the read started the monitor"
    return [weakref.ref(router), *(weakref.ref(e) for e in (router.primary, *router.replicas))]


def collected(refs: list[weakref.ReferenceType[Any]], names: list[str]) -> bool:
    gc.collect()
    return all(ref() is None for ref in refs) and not any(monitor_threads(n) for n in names)


# -- dispose() takes back everything ------------------------------------------


def test_routers_sharing_engines_keep_them_routed_until_the_last_is_disposed(
    topology: Topology,
) -> None:
    """Two routers over the same application engines: disposing one leaves the
    engines as the other needs them (its replica settings kept: no ROLLBACK on
    check-in, streamed reads in a transaction on PostgreSQL; its commits
    still carry their position), and disposing the last one leaves them as
    they were."""
    primary = sa.create_engine(topology.primary_url)
    replicas = [sa.create_engine(url) for url in topology.replica_urls]
    engines = [primary, *replicas]
    before = [listeners_of(e) for e in engines]
    skip = [e.dialect.skip_autocommit_rollback for e in engines]
    contexts = [e.dialect.execution_ctx_cls for e in engines]
    metadata.create_all(primary)
    first = sr.ReplicaRouter(primary, replicas, lag_check_interval=INTERVAL)
    # A budget a loaded machine cannot exhaust: the read after the commit must
    # not go to the primary for a slow first check or a slow apply.
    second = sr.ReplicaRouter(primary, replicas, lag_check_interval=INTERVAL, wait_timeout=10)
    added = [added_listeners(b, listeners_of(e)) for b, e in zip(before, engines, strict=True)]
    first.dispose()
    try:
        assert all(r.dialect.skip_autocommit_rollback for r in replicas)
        with StatementLog(second) as log, second.sessionmaker()() as session:
            session.execute(item.insert(), [{"id": 1}, {"id": 2}])
            session.commit()
            streamed = session.execute(
                sa.select(item.c.id).order_by(item.c.id).execution_options(stream_results=True)
            )
            assert streamed.scalars().all() == [1, 2]  # the commit's position was known
        reads = [s.node for s in log.statements if "FROM item" in s.sql]
        assert len(reads) == 1
        assert reads[0].startswith("replica")
    finally:
        second.dispose()
    for engine, was, new, skipped, context in zip(
        engines, before, added, skip, contexts, strict=True
    ):
        assert_left_as_before(engine, was, new, skipped)
        assert engine.dialect.execution_ctx_cls is context
    for engine in engines:
        engine.dispose()


def test_dispose_leaves_user_engines_as_they_were(topology: Topology) -> None:
    """Engines the application gave the router carry the router's listeners
    (and setting) while it lives; after dispose() every one of them is gone
    (``event.contains`` is false), and the engines still work."""
    primary = sa.create_engine(topology.primary_url)
    replicas = [sa.create_engine(url) for url in topology.replica_urls]
    engines = [primary, *replicas]
    before = [listeners_of(e) for e in engines]
    skip = [e.dialect.skip_autocommit_rollback for e in engines]
    router = sr.ReplicaRouter(primary, replicas, lag_check_interval=INTERVAL)
    metadata.create_all(primary)
    with router.sessionmaker()() as session:
        session.execute(item.insert(), [{"id": 1}])
        session.commit()
        session.execute(sa.select(item)).all()
    assert router.status()
    added = [added_listeners(b, listeners_of(e)) for b, e in zip(before, engines, strict=True)]
    assert all(added), "the router listens on every engine"

    router.dispose()

    for engine, was, new, skipped in zip(engines, before, added, skip, strict=True):
        assert_left_as_before(engine, was, new, skipped)
        with engine.connect() as conn:
            assert conn.scalar(sa.select(sa.func.count()).select_from(item)) in (0, 1)
    for engine in engines:
        engine.dispose()


def test_dispose_leaves_user_async_engines_as_they_were(topology: Topology) -> None:
    """The same for AsyncEngines: dispose() (sync, then the engines' own
    dispose in their loop) removes every listener from their sync engines."""

    async def scenario() -> None:
        primary = create_async_engine(topology.async_primary_url)
        replicas = [create_async_engine(url) for url in topology.async_replica_urls]
        engines = [primary, *replicas]
        before = [listeners_of(e.sync_engine) for e in engines]
        skip = [e.sync_engine.dialect.skip_autocommit_rollback for e in engines]
        router = sr.ReplicaRouter[AsyncEngine](primary, replicas, lag_check_interval=INTERVAL)
        async with primary.begin() as conn:
            await conn.run_sync(metadata.create_all)
        async with router.async_sessionmaker()() as session:
            await session.execute(item.insert(), [{"id": 1}])
            await session.commit()
            (await session.execute(sa.select(item))).all()
        added = [
            added_listeners(b, listeners_of(e.sync_engine))
            for b, e in zip(before, engines, strict=True)
        ]
        assert all(added), "the router listens on every engine"

        router.dispose()

        for engine, was, new, skipped in zip(engines, before, added, skip, strict=True):
            assert_left_as_before(engine.sync_engine, was, new, skipped)
            async with engine.connect() as conn:
                assert await conn.scalar(sa.text("SELECT 1")) == 1
            await engine.dispose()

    asyncio.run(asyncio.wait_for(scenario(), timeout=60))


# -- a dropped router is collected --------------------------------------------


def test_router_dropped_without_dispose_is_collected(topology: Topology) -> None:
    """A router whose primary reflected (create_all, has_table), that
    committed and read (so its monitor runs), dropped without dispose():
    the router and its engines are garbage collected, and the monitor
    thread ends."""
    name = f"dropped{next(_names)}"
    refs = use_and_drop(topology, name)
    wait_until(
        lambda: collected(refs, [name]),
        timeout=10,
        what="the dropped router, its engines and its monitor to go",
    )


def test_routers_built_per_test_do_not_pile_up_connections(topology: Topology) -> None:
    """The app-per-test shape: 60 routers from URLs, each reflecting,
    committing and reading, dropped without dispose(). The servers'
    connection counts (seen from admin connections of their own) come back
    to where they started instead of growing with the number of routers."""
    admins = [
        sa.create_engine(url, poolclass=sa.pool.NullPool).connect()
        for url in (topology.primary_url, *topology.replica_urls)
    ]
    try:
        for admin in admins:
            admin.execution_options(isolation_level="AUTOCOMMIT")
        baseline = [server_connections(a) for a in admins]
        names = []
        for _ in range(60):
            name = f"app{next(_names)}"
            names.append(name)
            use_and_drop(topology, name)

        def back_to_baseline() -> bool:
            gc.collect()
            counts = [server_connections(a) for a in admins]
            return all(n <= b for n, b in zip(counts, baseline, strict=True)) and not any(
                monitor_threads(n) for n in names
            )

        wait_until(back_to_baseline, timeout=30, what="the servers' connections to be closed")
    finally:
        for admin in admins:
            admin.close()


# -- the lag monitor connects as the sessions do ------------------------------


def without_credentials(url: sa.URL) -> tuple[sa.URL, dict[str, Any]]:
    """``url`` made useless on its own, and the connect argument it then
    needs. The topologies' servers take the URLs' users without a password
    (PostgreSQL: trust; MariaDB: its anonymous user matches any name on
    localhost), so the argument is the real database name (the driver's
    own name for it), the URL naming one that does not exist."""
    assert url.database
    probe = create_async_engine(url) if url.get_dialect().is_async else sa.create_engine(url)
    dialect = probe.sync_engine.dialect if isinstance(probe, AsyncEngine) else probe.dialect
    _, params = dialect.create_connect_args(url)
    key = next(k for k, v in params.items() if v == url.database)
    return url.set(database="sr_no_such_database"), {key: url.database}


def with_connect_listener(engine: Engine, cparams: dict[str, Any]) -> None:
    """Give ``engine`` the missing connect parameters only in a
    ``do_connect`` listener (as one setting an IAM token would)."""

    def connect(dialect: Any, record: Any, cargs: Any, given: dict[str, Any]) -> None:
        given.update(cparams)

    event.listen(engine, "do_connect", connect)


@pytest.fixture(params=["connect_args", "do_connect"])
def credentials(request: pytest.FixtureRequest) -> str:
    """Where the credentials are: engine_options' connect_args, or a
    do_connect listener on engines the application built."""
    return str(request.param)


def sources(
    topology: Topology, credentials: str, *, is_async: bool
) -> tuple[Any, list[Any], dict[str, Any]]:
    """The primary and replicas (URLs or engines) and engine_options, such
    that only the ``credentials`` way connects."""
    urls = (
        [topology.async_primary_url, *topology.async_replica_urls]
        if is_async
        else [topology.primary_url, *topology.replica_urls]
    )
    broken = [without_credentials(url) for url in urls]
    if credentials == "connect_args":
        return broken[0][0], [u for u, _ in broken[1:]], {"connect_args": broken[0][1]}
    engines: list[Any] = []
    for url, cparams in broken:
        engine = create_async_engine(url) if is_async else sa.create_engine(url)
        with_connect_listener(engine if isinstance(engine, Engine) else engine.sync_engine, cparams)
        engines.append(engine)
    return engines[0], engines[1:], {}


def await_replicas_healthy(router: sr.ReplicaRouter[Any]) -> None:
    wait_until(
        lambda: all(s.healthy for s in router.status()),
        timeout=15,
        what="the monitor to see every replica healthy",
    )


def test_monitor_connects_with_the_sessions_credentials(
    topology: Topology, credentials: str
) -> None:
    """Credentials only in connect_args (or only in a do_connect listener):
    the monitor connects with them too, reports the replicas healthy, and
    reads go to the replicas."""
    primary, replicas, options = sources(topology, credentials, is_async=False)
    router = sr.ReplicaRouter(
        primary, replicas, engine_options=options, lag_check_interval=INTERVAL
    )
    try:
        router.start()
        await_replicas_healthy(router)
        with (
            StatementLog(router) as log,
            router.sessionmaker()() as session,
            sr.consistency("eventual"),
        ):
            for _ in range(4):
                assert session.scalar(sa.text("SELECT 1 AS probe")) == 1
        nodes = {s.node for s in log.statements if "probe" in s.sql}
        assert nodes == set(router.replica_names)
    finally:
        router.dispose()
        for engine in (primary, *replicas):
            if isinstance(engine, Engine):
                engine.dispose()


def test_async_monitor_connects_with_the_sessions_credentials(
    topology: Topology, credentials: str
) -> None:
    """The same for async routers (psycopg_async, aiomysql): the monitor's
    sync connections get the async engines' connect_args or do_connect
    listeners' parameters."""
    primary, replicas, options = sources(topology, credentials, is_async=True)
    router = sr.ReplicaRouter[AsyncEngine](
        primary, replicas, engine_options=options, lag_check_interval=INTERVAL
    )

    async def scenario() -> set[str]:
        try:
            await router.astart()
            # The monitor thread needs nothing from this loop.
            await_replicas_healthy(router)
            with StatementLog(router) as log, sr.consistency("eventual"):
                async with router.async_sessionmaker()() as session:
                    for _ in range(4):
                        assert await session.scalar(sa.text("SELECT 1 AS probe")) == 1
            return {s.node for s in log.statements if "probe" in s.sql}
        finally:
            await router.adispose()
            for engine in (primary, *replicas):
                if isinstance(engine, AsyncEngine):
                    await engine.dispose()

    nodes = asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    assert nodes == set(router.replica_names)
