"""Metrics and tracing: the Prometheus collector and the OpenTelemetry span
attributes, with the real libraries against the real topologies."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.exc import ConfigurationError
from sqlalchemy_replicas.integrations import opentelemetry as sr_otel
from sqlalchemy_replicas.integrations import prometheus
from sqlalchemy_replicas.testing import Topology, wait_until

PREFIX = "sqlalchemy_replicas"


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


def await_healthy(router: sr.ReplicaRouter[Any]) -> None:
    """Until every replica serves reads (a check can time out on a loaded machine)."""
    wait_until(
        lambda: all(replica.healthy for replica in router.status()),
        timeout=30,
        what="every replica healthy",
    )


@pytest.fixture
def router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    """A started router over one replica (wait_timeout 0.2 s, quick lag checks),
    the item table replicated, counters reset."""
    engine = sa.create_engine(topology.primary_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    topology.wait_for_catchup()
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls[:1], wait_timeout=0.2, lag_check_interval=0.1
    )
    router.start()
    await_healthy(router)
    router.reset_stats()
    yield router
    router.dispose()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(f"{PREFIX}_{name}", labels)


def routed(
    registry: CollectorRegistry, router: str, target: str, reason: str, level: str
) -> float | None:
    """The routed statements counted under those labels (None: no such series)."""
    labels = {"router": router, "target": target, "reason": reason, "level": level}
    return sample(registry, "routed_statements_total", **labels)


def offline_router(name: str = "default") -> sr.ReplicaRouter:
    """A router without replicas over a primary never connected to (nothing to route)."""
    return sr.ReplicaRouter("postgresql+psycopg://app:s3cret@127.0.0.1:1/app", name=name)


# -- Prometheus ------------------------------------------------------------------------


def test_scrape_exports_routing_counters_by_target_reason_and_level(
    router: sr.ReplicaRouter, topology: Topology, registry: CollectorRegistry
) -> None:
    """After a known sequence of real statements, a scrape shows each decision
    under its target kind, reason code and level, the causal wait (refused at
    once by the paused replica: "failed") in the histogram and by outcome, and
    the fallback it caused; labels carry no SQL, URL or password."""
    prometheus.register(router, registry=registry)
    with router.sessionmaker()() as session:
        with sr.consistency("eventual"):
            session.execute(sa.select(Item)).all()  # replica, read
            session.execute(sa.select(Item)).all()
        with sr.consistency("strong"):
            session.execute(sa.select(Item)).all()  # primary, strong
        session.commit()
        topology.pause_replay(0)
        session.add(Item(id=1))
        session.commit()  # primary, write (the flush)
        session.execute(sa.select(Item)).all()  # the paused replica refuses the wait: primary

    ryw = "read_your_writes"
    assert routed(registry, "default", "replica", "read", "eventual") == 2
    assert routed(registry, "default", "primary", "strong", "strong") == 1
    assert routed(registry, "default", "primary", "write", ryw) == 1
    assert routed(registry, "default", "primary", "not_caught_up", ryw) == 1
    labels = {"router": "default"}
    assert sample(registry, "fallbacks_total", **labels, reason="not_caught_up") == 1
    assert sample(registry, "fallbacks_total", **labels, reason="pool_full") == 0
    assert sample(registry, "reruns_total", **labels, cause="schema_behind") == 0
    assert sample(registry, "causal_waits_total", **labels, outcome="failed") == 1
    assert sample(registry, "causal_waits_total", **labels, outcome="timed_out") == 0
    assert sample(registry, "causal_waits_total", **labels, outcome="reached") == 0
    assert sample(registry, "causal_wait_seconds_count", **labels) == 1
    assert sample(registry, "causal_wait_seconds_bucket", **labels, le="0.1") == 1
    assert sample(registry, "causal_wait_seconds_bucket", **labels, le="+Inf") == 1
    assert (sample(registry, "causal_wait_seconds_sum", **labels) or 0) < 0.1
    assert sample(registry, "replica_up", **labels, replica="replica1") in (0.0, 1.0)

    text = generate_latest(registry).decode()
    assert f"# TYPE {PREFIX}_causal_wait_seconds histogram" in text
    assert f"# TYPE {PREFIX}_routed_statements_total counter" in text
    for leak in ("SELECT", "item", "://", "127.0.0.1", str(topology.replica_urls[0].port)):
        assert leak not in text, leak


def test_replica_gauges_follow_the_monitor_and_scrapes_never_block(
    router: sr.ReplicaRouter, topology: Topology, registry: CollectorRegistry
) -> None:
    """replica_up is 1 and the lag gauge is present while the replica serves;
    frozen (SIGSTOP: its checks hang), it goes to 0 and is counted marked down,
    while every scrape stays quick (it reads the monitor's cached state); once
    thawed it is back to 1 and counted readmitted."""
    prometheus.register(router, registry=registry)
    labels = {"router": "default", "replica": "replica1"}
    wait_until(lambda: sample(registry, "replica_up", **labels) == 1, timeout=20, what="up")
    assert (sample(registry, "replica_lag_seconds", **labels) or 0) >= 0
    assert sample(registry, "replica_pool_full_skips_total", **labels) == 0
    slowest = 0.0

    def scraped_down() -> bool:
        nonlocal slowest
        started = time.perf_counter()
        generate_latest(registry)
        slowest = max(slowest, time.perf_counter() - started)
        return sample(registry, "replica_up", **labels) == 0

    topology.freeze_replica(0)
    try:
        wait_until(scraped_down, timeout=20, what="replica1 down in the scrape")
        assert sample(registry, "replica_marked_down_total", **labels) == 1
        assert slowest < 0.25, f"a scrape took {slowest:.3f} s while the replica hung"
    finally:
        topology.thaw_replica(0)
    wait_until(lambda: sample(registry, "replica_up", **labels) == 1, timeout=40, what="up again")
    assert sample(registry, "replica_readmitted_total", **labels) == 1


def test_several_routers_are_told_apart_by_the_router_label(registry: CollectorRegistry) -> None:
    """Two routers share one collector in a registry, their series labelled with
    their names (or the name given); a second router under a taken name is
    refused; the process-wide rejected tokens appear once, without a router
    label; unregistering removes a router's series, and the last one removes
    the collector from the registry."""
    main, reports = offline_router(), offline_router("reports")
    main.stats_recorder.decision(True, "write", "read_your_writes")
    reports.stats_recorder.decision(True, "strong", "strong")
    reports.stats_recorder.decision(True, "strong", "strong")
    collector = prometheus.register(main, registry=registry)
    assert prometheus.register(reports, registry=registry, name="batch") is collector
    assert prometheus.register(main, registry=registry) is collector  # idempotent
    with pytest.raises(ConfigurationError, match="router='default'"):
        prometheus.register(offline_router(), registry=registry)
    with sr.causal_context(token="not a token"):
        pass  # ignored, counted in the process-wide rejected tokens

    assert routed(registry, "default", "primary", "write", "read_your_writes") == 1
    assert routed(registry, "batch", "primary", "strong", "strong") == 2
    assert routed(registry, "default", "primary", "strong", "strong") is None
    text = generate_latest(registry).decode()
    rejected = main.stats().rejected_tokens
    assert sample(registry, "rejected_tokens_total", reason="malformed") == rejected["malformed"]
    assert text.count(f"{PREFIX}_rejected_tokens_total{{") == len(rejected)
    assert "s3cret" not in text

    assert prometheus.unregister(reports, registry=registry)
    assert routed(registry, "batch", "primary", "strong", "strong") is None
    assert not prometheus.unregister(reports, registry=registry)
    assert prometheus.unregister("default", registry=registry)
    assert f"{PREFIX}_" not in generate_latest(registry).decode()
    assert prometheus.register(main, registry=registry) is not collector  # a new one
    assert routed(registry, "default", "primary", "write", "read_your_writes") == 1
    prometheus.unregister(main, registry=registry)
    for router in (main, reports):
        router.dispose()


def test_replica_transitions_are_exported_per_replica(registry: CollectorRegistry) -> None:
    """Each replica transition the router's stats count (down, readmitted, left
    out for lag, readmitted under max_lag) is its own counter, per replica."""
    router = offline_router("transitions")
    recorder = router.stats_recorder
    for count, record in enumerate(
        (recorder.replica_down, recorder.replica_up, recorder.replica_over_max_lag,
         recorder.replica_under_max_lag),
        start=1,
    ):  # fmt: skip
        for _ in range(count):
            record("replica1")
    prometheus.register(router, registry=registry)
    labels = {"router": "transitions", "replica": "replica1"}
    assert sample(registry, "replica_marked_down_total", **labels) == 1
    assert sample(registry, "replica_readmitted_total", **labels) == 2
    assert sample(registry, "replica_over_max_lag_total", **labels) == 3
    assert sample(registry, "replica_under_max_lag_total", **labels) == 4
    prometheus.unregister(router, registry=registry)
    router.dispose()


def test_the_default_registry_is_the_global_one() -> None:
    """Without registry=, the router is exported from prometheus_client's global
    REGISTRY, and unregister() takes it (and the collector) out again."""
    router = offline_router("global_registry_test")
    router.stats_recorder.decision(True, "write", "eventual")
    labels = {"router": "global_registry_test", "target": "primary", "reason": "write"}
    try:
        prometheus.register(router)
        assert (
            REGISTRY.get_sample_value(
                f"{PREFIX}_routed_statements_total", {**labels, "level": "eventual"}
            )
            == 1
        )
    finally:
        assert prometheus.unregister(router)
        router.dispose()
    assert f"{PREFIX}_" not in generate_latest().decode()


def test_a_disposed_router_is_scraped_without_its_monitor_restarting(
    router: sr.ReplicaRouter, registry: CollectorRegistry
) -> None:
    """After dispose() a scrape still shows the router's final counters, shows no
    replica gauge, and starts no lag monitor again."""
    prometheus.register(router, registry=registry)
    with sr.consistency("eventual"), router.sessionmaker()() as session:
        session.execute(sa.select(Item)).all()
    router.dispose()
    labels = {"router": "default", "target": "replica", "reason": "read", "level": "eventual"}
    assert sample(registry, "routed_statements_total", **labels) == 1
    assert sample(registry, "replica_up", router="default", replica="replica1") is None
    assert router.cluster.monitor is None


# -- OpenTelemetry ----------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def attributes(exporter: InMemorySpanExporter, name: str) -> dict[str, Any]:
    found: list[ReadableSpan] = [s for s in exporter.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in exporter.get_finished_spans()]
    return dict(found[0].attributes or {})


def test_routed_statements_annotate_the_current_span(
    router: sr.ReplicaRouter,
    topology: Topology,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """Instrumented, a read sets the database semantic-convention attributes of
    the replica that ran it and the routing attributes (target, reason, level,
    no fallback) on the current span; a write those of the primary; a read that
    waited for a paused replica and fell back, the wait's outcome and duration
    and the fallback."""
    provider, exporter = spans
    tracer = provider.get_tracer(__name__)
    assert sr_otel.instrument(router) is sr_otel.instrument(router)  # idempotent
    system = "postgresql" if topology.primary_url.get_backend_name() == "postgresql" else "mariadb"
    replica_url, primary_url = topology.replica_urls[0], topology.primary_url
    make = router.sessionmaker()
    with make() as session:
        with tracer.start_as_current_span("read"), sr.consistency("eventual"):
            session.execute(sa.select(Item)).all()
        with tracer.start_as_current_span("write"):
            session.add(Item(id=1))
            session.commit()
        topology.pause_replay(0)
        session.add(Item(id=2))
        session.commit()
        with tracer.start_as_current_span("waited"):
            session.execute(sa.select(Item)).all()
    sr_otel.uninstrument(router)

    assert attributes(exporter, "read") == {
        "db.system.name": system,
        "server.address": replica_url.host,
        "server.port": replica_url.port,
        "db.namespace": replica_url.database,
        "sqlalchemy_replicas.target": "replica1",
        "sqlalchemy_replicas.reason": "read",
        "sqlalchemy_replicas.consistency": "eventual",
        "sqlalchemy_replicas.fallback": False,
    }
    write = attributes(exporter, "write")
    assert write["server.port"] == primary_url.port
    assert write["sqlalchemy_replicas.target"] == "primary"
    assert write["sqlalchemy_replicas.reason"] == "write"
    assert write["sqlalchemy_replicas.consistency"] == "read_your_writes"
    assert "sqlalchemy_replicas.causal_wait.outcome" not in write
    waited = attributes(exporter, "waited")
    assert waited["sqlalchemy_replicas.target"] == "primary"
    assert waited["server.port"] == primary_url.port
    assert waited["sqlalchemy_replicas.reason"] == "not_caught_up"
    assert waited["sqlalchemy_replicas.fallback"] is True
    # The paused replica refuses the wait at once (a "failed" wait).
    assert waited["sqlalchemy_replicas.causal_wait.outcome"] == "failed"
    assert waited["sqlalchemy_replicas.causal_wait.duration"] < 0.1


def test_a_span_over_several_statements_ends_with_the_last_route(
    router: sr.ReplicaRouter,
    topology: Topology,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """In one span, reads on the replica, then on the primary, then on the replica
    again: the span ends with the last statement's server and routing attributes
    (the integration skips only values the span already has)."""
    provider, exporter = spans
    sr_otel.instrument(router)
    tracer = provider.get_tracer(__name__)
    with tracer.start_as_current_span("several"), router.sessionmaker()() as session:
        with sr.consistency("eventual"):
            session.execute(sa.select(Item)).all()
            session.execute(sa.select(Item)).all()
        with sr.consistency("strong"):
            session.execute(sa.select(Item)).all()
        live = cast(ReadableSpan, trace.get_current_span())
        assert (live.attributes or {})["sqlalchemy_replicas.target"] == "primary"
        assert (live.attributes or {})["sqlalchemy_replicas.reason"] == "strong"
        with sr.consistency("eventual"):
            session.execute(sa.select(Item)).all()
    span = attributes(exporter, "several")
    assert span["sqlalchemy_replicas.target"] == "replica1"
    assert span["server.port"] == topology.replica_urls[0].port
    assert span["sqlalchemy_replicas.reason"] == "read"
    assert span["sqlalchemy_replicas.consistency"] == "eventual"


def test_a_rerun_is_on_the_span(
    router: sr.ReplicaRouter,
    topology: Topology,
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    """A read of a table the paused replica lacks runs again on the primary: the
    span names the primary, the schema_behind reason and the rerun's cause."""
    provider, exporter = spans
    sr_otel.instrument(router)
    topology.pause_replay(0)
    with router.primary.begin() as conn:
        conn.execute(sa.text("CREATE TABLE fresh_table (id INTEGER)"))
    tracer = provider.get_tracer(__name__)
    with (
        tracer.start_as_current_span("rerun"),
        sr.consistency("eventual"),
        router.sessionmaker()() as session,
    ):
        session.execute(sa.text("SELECT id FROM fresh_table")).all()
    span = attributes(exporter, "rerun")
    assert span["sqlalchemy_replicas.target"] == "primary"
    assert span["sqlalchemy_replicas.reason"] == "schema_behind"
    assert span["sqlalchemy_replicas.rerun.cause"] == "schema_behind"
    assert span["sqlalchemy_replicas.fallback"] is True


def test_async_sessions_annotate_the_current_span(
    topology: Topology, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """An AsyncSession's statements (run in SQLAlchemy's greenlet) see the
    caller's current span: an eventual read sets the replica's attributes."""
    provider, exporter = spans
    engine = sa.create_engine(topology.primary_url)
    Base.metadata.create_all(engine)
    engine.dispose()
    topology.wait_for_catchup()
    router: sr.ReplicaRouter[AsyncEngine] = sr.ReplicaRouter(
        topology.async_primary_url, topology.async_replica_urls[:1]
    )
    sr_otel.instrument(router)

    async def read() -> None:
        await router.astart()
        await asyncio.to_thread(await_healthy, router)
        try:
            with provider.get_tracer(__name__).start_as_current_span("async read"):
                async with router.async_sessionmaker()() as session:
                    with sr.consistency("eventual"):
                        (await session.execute(sa.select(Item))).all()
        finally:
            await router.adispose()

    asyncio.run(read())
    span = attributes(exporter, "async read")
    assert span["sqlalchemy_replicas.target"] == "replica1"
    assert span["sqlalchemy_replicas.reason"] == "read"
    assert span["server.port"] == topology.async_replica_urls[0].port


def test_uninstrumented_routers_leave_spans_alone(
    router: sr.ReplicaRouter, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    """Before instrument() and after uninstrument(), routed statements set no
    attribute, the router's counters have no observer and its engines no
    listener of ours; statements outside any span are fine either way."""
    provider, exporter = spans
    tracer = provider.get_tracer(__name__)
    make = router.sessionmaker()
    assert not sr_otel.is_instrumented(router)
    with make() as session, tracer.start_as_current_span("before"):
        session.execute(sa.select(Item)).all()
    instrumentation = sr_otel.instrument(router)
    with make() as session:
        session.execute(sa.select(Item)).all()  # no current span: nothing to annotate
    assert sr_otel.uninstrument(router)
    assert not sr_otel.uninstrument(router)
    with make() as session, tracer.start_as_current_span("after"):
        session.execute(sa.select(Item)).all()
    assert attributes(exporter, "before") == {}
    assert attributes(exporter, "after") == {}
    assert router.stats_recorder._observers == ()
    for engine, listener in instrumentation._listeners:
        assert not sa.event.contains(engine, "before_cursor_execute", listener)


def test_server_attributes_of_a_unix_socket_and_a_default_port() -> None:
    """A URL without a port gets the backend's default port; a Unix socket's
    directory is the address (no port); no password either way."""
    tcp = sa.create_engine("postgresql+psycopg://app:s3cret@db.internal/app")
    socket = sa.create_engine("postgresql+psycopg://app:s3cret@/app?host=/run/postgresql")
    assert sr_otel.server_attributes("primary", tcp) == {
        "db.system.name": "postgresql",
        "sqlalchemy_replicas.target": "primary",
        "server.address": "db.internal",
        "server.port": 5432,
        "db.namespace": "app",
    }
    assert sr_otel.server_attributes("replica1", socket) == {
        "db.system.name": "postgresql",
        "sqlalchemy_replicas.target": "replica1",
        "server.address": "/run/postgresql",
        "db.namespace": "app",
    }


# -- neither is imported unless asked for --------------------------------------------------


def test_the_core_imports_neither_prometheus_nor_opentelemetry() -> None:
    """Importing sqlalchemy_replicas, building a router and counting a decision
    imports neither prometheus_client nor opentelemetry (they are optional
    extras), and the router's counters have no observer."""
    code = textwrap.dedent(
        """
        import sys
        import sqlalchemy_replicas as sr
        import sqlalchemy_replicas.integrations
        router = sr.ReplicaRouter("postgresql+psycopg://app@127.0.0.1:1/app")
        router.stats_recorder.decision(True, "write", "read_your_writes")
        router.stats()
        assert router.stats_recorder._observers == ()
        loaded = sorted(
            name for name in sys.modules
            if name.split(".")[0] in ("prometheus_client", "opentelemetry")
        )
        assert not loaded, loaded
        router.dispose()
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.postgresql
def test_the_metrics_example_prints_span_attributes_and_a_scrape() -> None:
    """examples/metrics.py runs: its read's span names the replica and the reason,
    and its scrape shows the routed statements and the replica up."""
    example = Path(__file__).resolve().parent.parent / "examples" / "metrics.py"
    result = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=180, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    assert "sqlalchemy_replicas.target = 'replica1'" in output
    assert "db.system.name = 'postgresql'" in output
    assert (
        'sqlalchemy_replicas_routed_statements_total{level="eventual",reason="read",'
        'router="default",target="replica"} 3.0'
    ) in output
    assert 'sqlalchemy_replicas_replica_up{replica="replica1",router="default"} 1.0' in output


@pytest.mark.parametrize(
    ("integration", "blocked", "extra"),
    [
        ("prometheus", "prometheus_client", "prometheus"),
        ("opentelemetry", "opentelemetry", "opentelemetry"),
    ],
)
def test_a_missing_library_names_its_extra(integration: str, blocked: str, extra: str) -> None:
    """Importing an integration without its library raises MissingDependency
    naming the module and the pip install of the extra that brings it."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules[{blocked!r}] = None  # as if not installed
        from sqlalchemy_replicas.exc import MissingDependency
        try:
            import sqlalchemy_replicas.integrations.{integration}
        except MissingDependency as error:
            print(error.extra, "|", error)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith(f"{extra} |"), result.stdout + result.stderr
    assert f"sqlalchemy-replicas[{extra}]" in result.stdout
