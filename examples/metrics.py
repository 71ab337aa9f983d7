"""Metrics and tracing: a Prometheus scrape and OpenTelemetry span attributes.

Needs the extras: ``pip install sqlalchemy-replicas[prometheus,opentelemetry]``
and ``opentelemetry-sdk`` (the SDK records spans; here into memory, in an
app to your exporter)::

    python examples/metrics.py                      # prints a scrape and a span
    METRICS_PORT=9100 python examples/metrics.py    # also serves /metrics until Ctrl-C

Without PRIMARY_URL it starts a throw-away local primary with one replica
(``PRIMARY_URL`` and ``REPLICA_URLS`` as in examples/quickstart.py).
"""

from __future__ import annotations

import os
from contextlib import ExitStack, suppress

import prometheus_client
import sqlalchemy as sa
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.integrations import opentelemetry as sr_otel
from sqlalchemy_replicas.integrations import prometheus
from sqlalchemy_replicas.testing import PostgresTopology


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "note"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(sa.String(200))


def main() -> None:
    with ExitStack() as stack:
        primary_url = os.environ.get("PRIMARY_URL")
        if primary_url:
            replica_urls = [u for u in os.environ.get("REPLICA_URLS", "").split(",") if u]
        else:
            topology = stack.enter_context(PostgresTopology(replicas=1))
            primary_url = topology.primary_url.render_as_string(hide_password=False)
            replica_urls = [u.render_as_string(hide_password=False) for u in topology.replica_urls]

        router = sr.ReplicaRouter(primary_url, replica_urls)
        stack.callback(router.dispose)
        router.start()  # the replicas checked before the first read

        # Prometheus: the collector reads router.stats()/status() at each scrape.
        prometheus.register(router)  # the global REGISTRY, label router="default"
        stack.callback(prometheus.unregister, router)

        # OpenTelemetry: routing attributes on whatever span is current.
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("example")
        sr_otel.instrument(router)

        Session = router.sessionmaker()
        Base.metadata.create_all(router.primary)
        with sr.causal_context():
            with tracer.start_as_current_span("POST /notes"), Session() as session:
                session.add(Note(id=1, text="hello"))
                session.commit()
            with tracer.start_as_current_span("GET /notes"), Session() as session:
                session.scalars(sa.select(Note)).all()  # read-your-writes: a caught-up replica
            with sr.consistency("eventual"), Session() as session:
                for _ in range(3):
                    session.scalars(sa.select(Note)).all()

        for span in exporter.get_finished_spans():
            print(f"span {span.name!r}:")
            for key, value in sorted((span.attributes or {}).items()):
                print(f"    {key} = {value!r}")
        print("scrape:")
        scrape = prometheus_client.generate_latest().decode()
        for line in scrape.splitlines():
            if line.startswith("sqlalchemy_replicas_") and "_created" not in line:
                print(f"    {line}")

        port = os.environ.get("METRICS_PORT")
        if port:
            prometheus_client.start_http_server(int(port))
            print(f"serving http://localhost:{port}/metrics; Ctrl-C to stop")
            with suppress(KeyboardInterrupt, EOFError):
                input()
        provider.shutdown()


if __name__ == "__main__":
    main()
