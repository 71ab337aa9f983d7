"""Background jobs see what the code that enqueued them committed.

A "web" router (the default, process-wide causal scope) commits a row and
enqueues a job; the job runs on a "worker" router: another router object
over the same servers with ``causal_scope="session"``, which is what a worker
process is (its router knows nothing of the web process's commits). The
replicas apply every change late (0.5 s; MariaDB rounds it up to 1 s), so a
job that reads at once from a replica without the web's token reads a stale
row. Jobs run in a thread pool, as asyncio tasks, and in a real in-process
Celery worker (memory broker, threads and solo pools).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas import causal
from sqlalchemy_replicas import token as tokens
from sqlalchemy_replicas.causal import current_scope
from sqlalchemy_replicas.consistency import CausalScopeKind
from sqlalchemy_replicas.exc import ConfigurationError
from sqlalchemy_replicas.integrations import celery as sr_celery
from sqlalchemy_replicas.jobs import current_token, job_context
from sqlalchemy_replicas.testing import StatementLog, Topology

SECRET = "jobs-test-secret"
DELAY = 0.5
# Longer than any apply delay here: a job's read waits on a replica rather
# than falling back to the primary, so the test sees where reads went.
WORKER_WAIT = 4.0
ROUNDS = 6


class Base(DeclarativeBase):
    pass


class JobItem(Base):
    __tablename__ = "job_item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    note: Mapped[str] = mapped_column(sa.String(50))


# -- fixtures and helpers ------------------------------------------------------


def make_router(
    topology: Topology, *, causal_scope: CausalScopeKind = "router", wait_timeout: float = 0.5
) -> sr.ReplicaRouter:
    return sr.ReplicaRouter(
        topology.primary_url,
        topology.replica_urls,
        secret=SECRET,
        wait_timeout=wait_timeout,
        causal_scope=causal_scope,
        engine_options={"pool_pre_ping": True},
    )


@pytest.fixture
def lagging(topology: Topology) -> Topology:
    """The job_item table, replicated; then every replica applies changes late."""
    engine = sa.create_engine(topology.primary_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    topology.wait_for_catchup()
    for index in range(len(topology.replica_urls)):
        topology.set_apply_delay(index, DELAY)
    return topology


@pytest.fixture
def web(lagging: Topology) -> Iterator[sr.ReplicaRouter]:
    """The web process's router: the default process-wide causal scope."""
    router = make_router(lagging)
    yield router
    router.dispose()


@pytest.fixture
def worker(lagging: Topology) -> Iterator[sr.ReplicaRouter]:
    """The worker's router: another router object, as in another process."""
    router = make_router(lagging, causal_scope="session", wait_timeout=WORKER_WAIT)
    router.start()  # the lag monitor's first checks, before the first job
    yield router
    router.dispose()


def commit_item(web: sr.ReplicaRouter, item_id: int) -> None:
    with web.sessionmaker()() as session:
        session.add(JobItem(id=item_id, note=f"n{item_id}"))
        session.commit()


def read_note(worker: sr.ReplicaRouter, item_id: int) -> str | None:
    """The job: read the row the web process committed."""
    with worker.sessionmaker()() as session:
        return session.scalar(sa.select(JobItem.note).where(JobItem.id == item_id))


def item_reads(log: StatementLog) -> list[str]:
    """Nodes that served the job_item SELECTs."""
    return [s.node for s in log.statements if "job_item" in s.sql]


def waits(log: StatementLog) -> list[str]:
    """Nodes that ran a server-side wait for a position."""
    return [
        s.node for s in log.statements if "MASTER_GTID_WAIT" in s.sql or "RECURSIVE poll" in s.sql
    ]


def stale(notes: list[str | None], first_id: int) -> list[int]:
    """Ids whose job did not read the committed note."""
    return [first_id + i for i, note in enumerate(notes) if note != f"n{first_id + i}"]


def assert_fresh_from_replicas(log: StatementLog, notes: list[str | None], first: int) -> None:
    """No stale read, every read on a replica (none fell back to the primary),
    and the replicas were waited on (they applied the rows after the commits)."""
    assert stale(notes, first) == []
    reads = item_reads(log)
    assert len(reads) == len(notes)
    assert all(node.startswith("replica") for node in reads), reads
    assert waits(log)


# -- the generic helper ----------------------------------------------------------


def test_a_thread_pool_job_with_the_token_reads_what_was_committed_before_enqueue(
    web: sr.ReplicaRouter, worker: sr.ReplicaRouter
) -> None:
    """Commit without any causal_context, take current_token(web), run the job in a
    thread pool under job_context(token): never stale, served by replicas that
    waited to apply the row; the same jobs without the token read stale rows."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        with StatementLog(worker) as log:
            notes = []
            for item_id in range(1, ROUNDS + 1):
                commit_item(web, item_id)
                token = current_token(web)
                notes.append(pool.submit(job_context(token)(read_note), worker, item_id).result())
        assert_fresh_from_replicas(log, notes, 1)

        without = []
        for item_id in range(101, 101 + ROUNDS):
            commit_item(web, item_id)
            without.append(pool.submit(read_note, worker, item_id).result())
        assert stale(without, 101)


def test_an_asyncio_job_with_the_token_reads_what_was_committed_in_the_request(
    lagging: Topology, web: sr.ReplicaRouter
) -> None:
    """The web request commits inside a causal_context and puts (item, token) on an
    asyncio queue; a consumer task started before the request (so it shares no
    context with it) runs a coroutine job under job_context(token) on an async
    router: no stale read; without the token the same jobs read stale rows."""
    worker = sr.ReplicaRouter[AsyncEngine](
        lagging.async_primary_url,
        lagging.async_replica_urls,
        secret=SECRET,
        causal_scope="session",
        wait_timeout=WORKER_WAIT,
    )

    async def job(item_id: int) -> str | None:
        async with worker.async_sessionmaker()() as session:
            note: str | None = await session.scalar(
                sa.select(JobItem.note).where(JobItem.id == item_id)
            )
            return note

    async def main(with_token: bool, first: int) -> list[str | None]:
        queue: asyncio.Queue[tuple[int, str | None] | None] = asyncio.Queue()
        notes: list[str | None] = []

        async def consumer() -> None:
            while (entry := await queue.get()) is not None:
                item_id, token = entry
                run = job_context(token)(job) if with_token else job
                notes.append(await run(item_id))
                queue.task_done()

        consuming = asyncio.create_task(consumer())
        for item_id in range(first, first + ROUNDS):
            with sr.causal_context() as ctx:  # the request
                commit_item(web, item_id)
                await queue.put((item_id, current_token()))
            assert ctx.token is not None
            await queue.join()  # the job runs right after its request, as in the other tests
        await queue.put(None)
        await consuming
        return notes

    async def both() -> tuple[list[str | None], list[str | None]]:
        try:
            await worker.astart()
            return await main(True, 1), await main(False, 101)
        finally:
            await worker.adispose()

    with StatementLog(worker) as log:
        fresh, without = asyncio.run(both())
    assert stale(fresh, 1) == []
    assert all(node.startswith("replica") for node in item_reads(log)[:ROUNDS])
    assert waits(log)
    assert stale(without, 101)


def test_current_token_inside_a_context_leaves_the_requests_own_token_alone(
    web: sr.ReplicaRouter,
) -> None:
    """current_token(router) adds the router's process-wide commits to a copy: the
    request's ctx.token keeps carrying its own scope only, and a request that
    committed nothing with no router given has no token to hand over."""
    commit_item(web, 1)  # outside any context: in the process scope only
    with sr.causal_context() as ctx:
        assert current_token() is None
        assert current_token(web) is not None
        assert ctx.token is None
        commit_item(web, 2)
        assert ctx.token is not None
        assert current_token() is not None


def test_a_router_without_a_secret_fails_at_enqueue_time_naming_the_fix() -> None:
    """current_token(router) and installing the Celery integration with a router
    that has no secret raise ConfigurationError there, naming secret=."""
    router = sr.ReplicaRouter("postgresql+psycopg://u@127.0.0.1:1/db")
    try:
        with pytest.raises(ConfigurationError, match=r"secret=.*same secret and name"):
            current_token(router)
        with pytest.raises(ConfigurationError, match=r"secret="):
            sr_celery.install(router)
        assert sr_celery.installed() is None
    finally:
        router.dispose()


def test_a_bad_token_in_a_job_is_ignored_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """job_context with a malformed token runs the job in an empty causal context:
    no exception, a WARNING on sqlalchemy_replicas.causal, one more rejected token."""
    before = causal.rejected_tokens["malformed"]

    @job_context("not-a-token")
    def job() -> bool:
        scope = current_scope()
        return scope is not None and scope.entries() == {}

    with caplog.at_level(logging.WARNING, logger="sqlalchemy_replicas.causal"):
        assert job()
    assert causal.rejected_tokens["malformed"] == before + 1
    assert "ignored a causal token" in caplog.text
    assert current_scope() is None


# -- Celery --------------------------------------------------------------------


def fake_token(position: str = "0/16B3748") -> str:
    """A well-signed token for a router named 'default' (no server needed)."""
    entry = tokens.sign(SECRET, "default", "pg", "lineage", position, time.time())
    return tokens.encode({"default": entry})


@pytest.fixture
def celery_app() -> Iterator[Celery]:
    """A Celery app on the in-memory broker and result backend, nothing installed
    afterwards."""
    app = Celery(
        "sr-jobs-test", broker="memory://", backend="cache+memory://", set_as_current=False
    )
    # The worker would otherwise replace the root logger's handlers (and caplog's).
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        # The memory transport polls; the default (1 s) would outlast the lag.
        broker_transport_options={"polling_interval": 0.01},
    )
    yield app
    sr_celery.uninstall()
    app.close()


def register(app: Celery, name: str, *, bind: bool = False) -> Callable[[Callable[..., Any]], Any]:
    """``app.task`` with a type (Celery has none), for this app only (not shared)."""
    decorator: Callable[[Callable[..., Any]], Any] = app.task(name=name, shared=False, bind=bind)
    return decorator


def run_in_worker(
    app: Celery, pool: str, send: Callable[[], list[Any]], *, concurrency: int = 1
) -> list[Any]:
    """Start an in-process worker, send tasks with ``send``, and return their results."""
    with start_worker(
        app, pool=pool, concurrency=concurrency, perform_ping_check=False, shutdown_timeout=30
    ):
        return [result.get(timeout=30, interval=0.01) for result in send()]


@pytest.mark.parametrize("enqueue_in", ["causal_context", "router_scope"])
def test_celery_tasks_read_what_the_web_process_committed(
    web: sr.ReplicaRouter, worker: sr.ReplicaRouter, celery_app: Celery, enqueue_in: str
) -> None:
    """With the integration installed, a task enqueued right after a commit (inside
    the request's causal_context with no router given, or with no context and the
    web router given to install()) reads the row in a real threads-pool worker:
    0 stale, from replicas that waited for it."""

    @register(celery_app, "read_note")
    def read_note_task(item_id: int) -> str | None:
        return read_note(worker, item_id)

    sr_celery.install() if enqueue_in == "causal_context" else sr_celery.install(web)

    def send() -> list[Any]:
        results = []
        for item_id in range(1, ROUNDS + 1):
            if enqueue_in == "causal_context":
                with sr.causal_context():
                    commit_item(web, item_id)
                    results.append(read_note_task.delay(item_id))
            else:
                commit_item(web, item_id)
                results.append(read_note_task.delay(item_id))
        return results

    with StatementLog(worker) as log:
        notes = run_in_worker(celery_app, "threads", send, concurrency=3)
    assert_fresh_from_replicas(log, notes, 1)


def test_celery_tasks_without_the_integration_read_stale_rows(
    web: sr.ReplicaRouter, worker: sr.ReplicaRouter, celery_app: Celery
) -> None:
    """The same flow with nothing installed: the worker's router knows nothing of the
    web's commits, so its tasks read rows its lagging replicas have not applied yet."""

    @register(celery_app, "read_note")
    def read_note_task(item_id: int) -> str | None:
        return read_note(worker, item_id)

    def send() -> list[Any]:
        results = []
        for item_id in range(1, ROUNDS + 1):
            with sr.causal_context():
                commit_item(web, item_id)
                results.append(read_note_task.delay(item_id))
        return results

    notes = run_in_worker(celery_app, "threads", send, concurrency=3)
    assert stale(notes, 1)


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_each_celery_task_gets_its_own_context_even_after_a_failure(
    celery_app: Celery, pool: str
) -> None:
    """In one worker thread: a task with a token sees it and then fails; the next
    task, sent without a token, runs in a fresh empty context (not the failed
    task's) and has no sqlalchemy_replicas_token header."""
    token = fake_token()

    @register(celery_app, "seen_then_fail")
    def seen_then_fail() -> None:
        raise RuntimeError(f"seen {current_token()!r}")

    @register(celery_app, "seen", bind=True)
    def seen(self: Any) -> list[Any]:
        return [current_token(), getattr(self.request, sr_celery.HEADER, None)]

    integration = sr_celery.install()

    def send() -> list[Any]:
        with sr.causal_context(token):
            failing = seen_then_fail.delay()
        # Wait for the failure before sending the next one: same thread, in order.
        with pytest.raises(RuntimeError, match="seen") as raised:
            failing.get(timeout=30)
        assert repr(token) in str(raised.value)
        integration.uninstall()
        return [seen.delay()]

    [(token_in_task, header)] = run_in_worker(celery_app, pool, send)
    assert token_in_task is None
    assert header is None


def test_celery_task_sent_with_a_bad_token_runs_and_the_token_is_logged(
    celery_app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    """A forged header reaches the worker: the task runs without it, and the
    rejection is logged at WARNING and counted."""

    @register(celery_app, "has_scope")
    def has_scope() -> bool:
        scope = current_scope()
        return scope is not None and scope.entries() == {}

    sr_celery.install()
    before = causal.rejected_tokens["malformed"]
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_replicas.causal"):
        [fresh] = run_in_worker(
            celery_app,
            "solo",
            lambda: [has_scope.apply_async(headers={sr_celery.HEADER: "forged!"})],
        )
    assert fresh is True
    assert causal.rejected_tokens["malformed"] == before + 1
    assert "ignored a causal token" in caplog.text


def test_celery_publish_with_a_secretless_router_in_the_context_logs_the_fix(
    lagging: Topology, celery_app: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    """Celery swallows what a publish handler raises: a commit in the enclosing
    context through a router without a secret (not given to install()) makes the
    handler log an ERROR naming secret=, and the task is still sent."""
    router = sr.ReplicaRouter(lagging.primary_url, lagging.replica_urls)

    @register(celery_app, "noop")
    def noop() -> None:
        return None

    sr_celery.install()
    try:
        with (
            caplog.at_level(logging.ERROR, logger="sqlalchemy_replicas.integrations.celery"),
            sr.causal_context(),
        ):
            commit_item(router, 1)
            assert noop.delay().id
    finally:
        router.dispose()
    assert "sent without a causal token" in caplog.text
    assert "secret=" in caplog.text


def test_celery_install_is_idempotent_and_uninstall_removes_the_handlers(
    celery_app: Celery,
) -> None:
    """Installing twice connects one set of handlers, and uninstall() leaves none:
    a task sent afterwards carries no header."""
    from celery import signals

    before = len(signals.before_task_publish.receivers)
    integration = sr_celery.CeleryIntegration()
    integration.install()
    integration.install()
    assert len(signals.before_task_publish.receivers) == before + 1
    assert len(signals.task_prerun.receivers) >= 1
    integration.uninstall()
    assert len(signals.before_task_publish.receivers) == before

    first = sr_celery.install()
    second = sr_celery.install()
    assert sr_celery.installed() is second
    assert not first.installed
    assert len(signals.before_task_publish.receivers) == before + 1
    sr_celery.uninstall()
    assert len(signals.before_task_publish.receivers) == before

    @register(celery_app, "header", bind=True)
    def header(self: Any) -> Any:
        return getattr(self.request, sr_celery.HEADER, None)

    with sr.causal_context(fake_token()):
        [carried] = run_in_worker(celery_app, "solo", lambda: [header.delay()])
    assert carried is None
