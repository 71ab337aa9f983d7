"""OpenTelemetry tracing: where each routed statement went, on the current span.

::

    from sqlalchemy_replicas.integrations import opentelemetry as sr_otel

    sr_otel.instrument(router)
    with tracer.start_as_current_span("GET /orders"):
        session.scalars(select(Order)).all()   # attributes land on that span
    sr_otel.uninstrument(router)

This module creates no span: it annotates the span current when a session
routes (the request's span from your web framework's instrumentation, or one
you start). Once :func:`instrument` ran, each statement a
:class:`~sqlalchemy_replicas.RoutingSession` of ``router`` routes sets, when
the current span is recording:

- following the database semantic conventions, for the server that ran it:
  ``db.system.name`` (``postgresql``, ``mariadb`` or ``mysql``),
  ``server.address`` (host name, or the Unix socket directory),
  ``server.port``, ``db.namespace`` (the database name);
- ``sqlalchemy_replicas.target``: ``primary`` or the replica's name;
- ``sqlalchemy_replicas.reason``: the stable reason code
  (:data:`~sqlalchemy_replicas.stats.REASON_CODES`);
- ``sqlalchemy_replicas.consistency``: the consistency level in force;
- ``sqlalchemy_replicas.fallback``: whether a read meant for a replica went
  to the primary;
- after a causal wait: ``sqlalchemy_replicas.causal_wait.duration`` (seconds)
  and ``sqlalchemy_replicas.causal_wait.outcome`` (``reached``,
  ``timed_out``, ``failed``);
- after a rerun: ``sqlalchemy_replicas.rerun.cause``.

A span that covers several statements keeps the last value of each
attribute (a wait's attributes stay once a statement of the span waited).
The server attributes also follow the router's own queries made for the
statement (a causal wait on a replica, the commit position read after a
commit on the primary), which ran on that same server.

Cost: with no instrumentation, nothing (the router's counters have no
observer; this module is not imported). Instrumented, each statement looks
up the current span once per routing event and once per cursor execution
on the router's engines; see the overhead figures in docs/metrics.md.

Needs ``opentelemetry-api`` (``pip install sqlalchemy-replicas[opentelemetry]``);
an SDK (or another API implementation) records and exports the spans.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Final

from sqlalchemy import event
from sqlalchemy.engine import Engine

from .._dependencies import require_module
from ..consistency import ConsistencyLevel
from ..router import ReplicaRouter, RoutedEngine
from ..stats import FALLBACK_CODES, ReasonCode, RerunCause, WaitOutcome

require_module("opentelemetry.trace", "sqlalchemy_replicas.integrations.opentelemetry")

from opentelemetry import trace  # noqa: E402  (after the check that names the extra)

__all__ = [
    "CAUSAL_WAIT_DURATION",
    "CAUSAL_WAIT_OUTCOME",
    "CONSISTENCY",
    "DB_NAMESPACE",
    "DB_SYSTEM_NAME",
    "FALLBACK",
    "REASON",
    "RERUN_CAUSE",
    "SERVER_ADDRESS",
    "SERVER_PORT",
    "TARGET",
    "RouterInstrumentation",
    "instrument",
    "is_instrumented",
    "uninstrument",
]

# Database semantic conventions (stable names).
DB_SYSTEM_NAME: Final = "db.system.name"
DB_NAMESPACE: Final = "db.namespace"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
# This library's own attributes.
TARGET: Final = "sqlalchemy_replicas.target"
REASON: Final = "sqlalchemy_replicas.reason"
CONSISTENCY: Final = "sqlalchemy_replicas.consistency"
FALLBACK: Final = "sqlalchemy_replicas.fallback"
CAUSAL_WAIT_DURATION: Final = "sqlalchemy_replicas.causal_wait.duration"
CAUSAL_WAIT_OUTCOME: Final = "sqlalchemy_replicas.causal_wait.outcome"
RERUN_CAUSE: Final = "sqlalchemy_replicas.rerun.cause"

_DEFAULT_PORTS: Final = {"postgresql": 5432, "mysql": 3306, "mariadb": 3306}

_get_current_span = trace.get_current_span

# What was last set on which span, here (thread or task): a statement that
# routes as the one before it in the same span sets nothing again (setting
# attributes is most of the cost). Only identical values are skipped, and
# only these functions set those attributes, so the span's values are the
# same as if every statement had set them.
_last_route: ContextVar[tuple[Any, ...] | None] = ContextVar(
    "sqlalchemy_replicas.otel.route", default=None
)
_last_server: ContextVar[tuple[Any, dict[str, str | int]] | None] = ContextVar(
    "sqlalchemy_replicas.otel.server", default=None
)


class RouterInstrumentation:
    """What :func:`instrument` attached to one router: an observer of its
    routing decisions and a cursor listener on each of its engines.

    Implements :class:`~sqlalchemy_replicas.stats.RoutingObserver`.
    """

    def __init__(self, router: ReplicaRouter[Any]) -> None:
        self._router = weakref.ref(router)
        self._listeners: list[tuple[Engine, Callable[..., None]]] = []
        for routed in (router.primary_target, *router.replica_targets):
            listener = _server_listener(routed)
            self._listeners.append((routed.sync_engine, listener))

    def _attach(self, router: ReplicaRouter[Any]) -> None:
        for engine, listener in self._listeners:
            # Through the router's own record: dispose() removes them too.
            router._listeners.listen(engine, "before_cursor_execute", listener)
        router.stats_recorder.add_observer(self)

    def uninstrument(self) -> None:
        """Remove the observer and the listeners (safe to call again)."""
        router = self._router()
        if router is not None:
            router.stats_recorder.remove_observer(self)
        for engine, listener in self._listeners:
            if event.contains(engine, "before_cursor_execute", listener):
                event.remove(engine, "before_cursor_execute", listener)

    # -- RoutingObserver ----------------------------------------------------------

    def decision(self, to_primary: bool, reason: ReasonCode, level: ConsistencyLevel) -> None:
        """Set the reason, level and fallback flag on the current span."""
        span = _get_current_span()
        if span.is_recording():
            key = (span, to_primary, reason, level)
            if _last_route.get() != key:  # else the span says so already
                span.set_attributes(
                    {
                        REASON: reason,
                        CONSISTENCY: level,
                        FALLBACK: to_primary and reason in FALLBACK_CODES,
                    }
                )
                _last_route.set(key)

    def wait(self, outcome: WaitOutcome, seconds: float) -> None:
        """Set the causal wait's duration and outcome on the current span."""
        span = _get_current_span()
        if span.is_recording():
            span.set_attributes({CAUSAL_WAIT_DURATION: seconds, CAUSAL_WAIT_OUTCOME: outcome})

    def rerun(self, cause: RerunCause) -> None:
        """Set the rerun's cause on the current span."""
        span = _get_current_span()
        if span.is_recording():
            span.set_attribute(RERUN_CAUSE, cause)


def _server_listener(routed: RoutedEngine) -> Callable[..., None]:
    """A ``before_cursor_execute`` listener that sets ``routed``'s server
    attributes on the current span (worked out at the first statement, when
    the dialect knows a MariaDB server from a MySQL one)."""
    attributes: dict[str, str | int] = {}

    def before_cursor_execute(connection: Any, *args: Any) -> None:
        span = _get_current_span()
        if span.is_recording():
            last = _last_server.get()
            if last is None or last[0] is not span or last[1] is not attributes:
                if not attributes:
                    attributes.update(server_attributes(routed.name, connection.engine))
                span.set_attributes(attributes)
                _last_server.set((span, attributes))

    return before_cursor_execute


def server_attributes(name: str, engine: Engine) -> dict[str, str | int]:
    """The span attributes that name the server behind ``engine`` (called
    ``name`` by the router): never the password, nor the query string but
    for a Unix socket directory."""
    dialect = engine.dialect
    system = dialect.name
    if system == "mysql" and getattr(dialect, "is_mariadb", False):
        system = "mariadb"
    url = engine.url
    attributes: dict[str, str | int] = {DB_SYSTEM_NAME: system, TARGET: name}
    if url.host:
        attributes[SERVER_ADDRESS] = url.host
        port = url.port or _DEFAULT_PORTS.get(system)
        if port is not None:
            attributes[SERVER_PORT] = port
    else:  # a Unix socket: psycopg's ?host=/dir, PyMySQL's ?unix_socket=/path
        socket = url.query.get("unix_socket") or url.query.get("host")
        if isinstance(socket, str):
            attributes[SERVER_ADDRESS] = socket
    if url.database:
        attributes[DB_NAMESPACE] = url.database
    return attributes


_instrumented: weakref.WeakKeyDictionary[ReplicaRouter[Any], RouterInstrumentation] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def instrument(router: ReplicaRouter[Any]) -> RouterInstrumentation:
    """Annotate the current span with each routing decision of ``router``'s
    sessions (see the module's documentation). Idempotent.

    :return: the instrumentation, whose ``uninstrument()`` takes it back.
    """
    with _lock:
        existing = _instrumented.get(router)
        if existing is not None:
            return existing
        instrumentation = RouterInstrumentation(router)
        instrumentation._attach(router)
        _instrumented[router] = instrumentation
        return instrumentation


def uninstrument(router: ReplicaRouter[Any]) -> bool:
    """Stop annotating spans for ``router``.

    :return: whether it was instrumented.
    """
    with _lock:
        instrumentation = _instrumented.pop(router, None)
    if instrumentation is None:
        return False
    instrumentation.uninstrument()
    return True


def is_instrumented(router: ReplicaRouter[Any]) -> bool:
    """Whether :func:`instrument` is in force for ``router``."""
    return router in _instrumented
