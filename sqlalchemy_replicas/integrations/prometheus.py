"""Prometheus metrics for routers: a collector that reads ``router.stats()`` and
``router.status()`` when scraped.

::

    from sqlalchemy_replicas.integrations import prometheus

    prometheus.register(router)          # the global REGISTRY, router="default"
    prometheus.register(reports, name="reports", registry=my_registry)
    ...
    prometheus.unregister(router)

Nothing is counted twice: the router counts anyway (``router.stats()``), and
the collector turns a snapshot of those counters into metric families at
scrape time, so routing costs nothing more with it registered. A scrape does
no I/O: ``stats()`` copies counters, ``status()`` returns what the lag
monitor last saw (it starts the monitor if no read has yet; it does not wait
for it). A disposed router's counters are still exported; its replicas are not.

Metrics (every one but the process-wide rejected tokens labelled ``router``,
the router's name or the one given to :func:`register`):

- ``sqlalchemy_replicas_routed_statements_total{target,reason,level}``:
  routing decisions; ``target`` is ``primary`` or ``replica``, ``reason`` a
  stable code (:data:`~sqlalchemy_replicas.stats.REASON_CODES`), ``level``
  the consistency level.
- ``sqlalchemy_replicas_fallbacks_total{reason}``: reads meant for a
  replica that the primary served.
- ``sqlalchemy_replicas_reruns_total{cause}``: statements that left a
  replica to run again elsewhere.
- ``sqlalchemy_replicas_causal_wait_seconds``: histogram of causal waits
  (``le`` buckets from :data:`~sqlalchemy_replicas.stats.WAIT_BUCKETS`).
- ``sqlalchemy_replicas_causal_waits_total{outcome}``: those waits by
  outcome (``reached``, ``timed_out``, ``failed``).
- ``sqlalchemy_replicas_replica_up{replica}``: 1 when the replica gets
  reads, 0 when it is down, lagging over ``max_lag`` or not checked yet.
- ``sqlalchemy_replicas_replica_lag_seconds{replica}``: its lag at the last
  check (absent while unknown).
- ``sqlalchemy_replicas_replica_marked_down_total{replica}`` and
  ``sqlalchemy_replicas_replica_readmitted_total{replica}``: transitions.
- ``sqlalchemy_replicas_replica_over_max_lag_total{replica}`` and
  ``sqlalchemy_replicas_replica_under_max_lag_total{replica}``: times the lag
  monitor left it out for lag, and readmitted it.
- ``sqlalchemy_replicas_replica_pool_full_skips_total{replica}``: reads sent
  elsewhere because its pool had no free connection.
- ``sqlalchemy_replicas_rejected_tokens_total{reason}``: causal tokens
  ignored in this process (shared by every router, so without ``router``).

Label values are the router's and replicas' names and closed sets of codes:
never SQL, never URLs. Counters carry ``_created`` (when counting began:
``router.reset_stats()`` starts them again, which Prometheus reads as a
counter reset).

Needs ``prometheus_client`` (``pip install sqlalchemy-replicas[prometheus]``).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from .._dependencies import require_module
from ..exc import ConfigurationError
from ..router import ReplicaRouter
from ..stats import FALLBACK_CODES, RERUN_CAUSES, RouterStats

require_module("prometheus_client", "sqlalchemy_replicas.integrations.prometheus")

# After the check that names the extra:
from prometheus_client.core import (  # noqa: E402
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry  # noqa: E402

__all__ = ["PREFIX", "ReplicaRouterCollector", "register", "unregister"]

logger = logging.getLogger(__name__)

#: The prefix of every metric name.
PREFIX = "sqlalchemy_replicas"

_OUTCOMES = ("reached", "timed_out", "failed")
_FALLBACKS = tuple(sorted(FALLBACK_CODES))


class ReplicaRouterCollector(Collector):
    """A Prometheus collector for one or more routers, each told apart by its
    ``router`` label.

    Holds routers weakly: a router that is garbage collected drops out of
    the scrape. Usually made by :func:`register`; to manage one yourself::

        collector = ReplicaRouterCollector()
        collector.add(router)
        registry.register(collector)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._routers: dict[str, weakref.ref[ReplicaRouter[Any]]] = {}

    def add(self, router: ReplicaRouter[Any], *, name: str | None = None) -> str:
        """Export ``router`` under the label ``router=name`` (default: ``router.name``).

        Adding the same router under the same name again does nothing.

        :return: the label value.
        :raises ConfigurationError: another router is exported under that name.
        """
        label = router.name if name is None else name
        if not isinstance(label, str) or not label:
            raise ConfigurationError(f"name must be a non-empty string, not {label!r}")
        with self._lock:
            known = self._routers.get(label)
            current = None if known is None else known()
            if current is not None and current is not router:
                raise ConfigurationError(
                    f"another router is already exported as router={label!r}; "
                    "give this one another name (register(router, name=...))"
                )
            self._routers[label] = weakref.ref(router)
        return label

    def remove(self, router: ReplicaRouter[Any] | str) -> bool:
        """Stop exporting ``router`` (a router, or the label it has).

        :return: whether it was exported.
        """
        found = False
        with self._lock:
            for label, ref in list(self._routers.items()):
                current = ref()
                if current is None or label == router or current is router:
                    del self._routers[label]
                    found = found or current is not None
        return found

    def routers(self) -> dict[str, ReplicaRouter[Any]]:
        """The routers exported, by label (those still alive)."""
        with self._lock:
            pairs = [(label, ref()) for label, ref in self._routers.items()]
        return {label: router for label, router in pairs if router is not None}

    def describe(self) -> Iterable[Metric]:
        """The metric families, empty: the registry checks names with them
        (without a scrape)."""
        return _Families().all()

    def collect(self) -> Iterable[Metric]:
        """Each router's counters and replicas now, as metric families."""
        families = _Families()
        rejected: RouterStats | None = None
        for label, router in sorted(self.routers().items()):
            try:
                stats = router.stats()
                families.add_stats(label, stats)
                if not router.disposed:
                    families.add_status(label, router)
            except Exception:  # one broken router must not fail the scrape
                logger.exception("collecting metrics of router %r failed", label)
            else:
                rejected = stats
        if rejected is not None:  # per process: the same in every router's stats
            for reason, count in sorted(rejected.rejected_tokens.items()):
                families.rejected_tokens.add_metric([reason], count)
        return families.all()


def _counter(name: str, doc: str, *labels: str) -> CounterMetricFamily:
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


def _gauge(name: str, doc: str, *labels: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=list(labels))


def _le(bound: float) -> str:
    """A bucket bound as Prometheus writes it (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if bound == float("inf") else repr(bound)


class _Families:
    """The metric families of one scrape, filled router by router."""

    def __init__(self) -> None:
        self.routed = _counter(
            "routed_statements",
            "Statements (and flushes) routed, by target kind, reason code and level.",
            "router", "target", "reason", "level",
        )  # fmt: skip
        self.fallbacks = _counter(
            "fallbacks",
            "Reads meant for a replica that the primary served, by reason code.",
            "router", "reason",
        )  # fmt: skip
        self.reruns = _counter(
            "reruns",
            "Statements that left a replica to run again elsewhere, by cause.",
            "router", "cause",
        )  # fmt: skip
        self.wait_seconds = HistogramMetricFamily(
            f"{PREFIX}_causal_wait_seconds",
            "Time reads waited for a replica to apply the causal scope's commits.",
            labels=["router"],
        )
        self.waits = _counter(
            "causal_waits", "Causal waits by outcome (reached, timed_out, failed).",
            "router", "outcome",
        )  # fmt: skip
        self.up = _gauge(
            "replica_up",
            "1 when the replica gets reads; 0 when down, over max_lag or not yet checked.",
            "router", "replica",
        )  # fmt: skip
        self.lag = _gauge(
            "replica_lag_seconds", "Replica lag at the lag monitor's last check, in seconds.",
            "router", "replica",
        )  # fmt: skip
        self.down = _counter(
            "replica_marked_down",
            "Times the replica was marked down (lost connection, unreachable check).",
            "router", "replica",
        )  # fmt: skip
        self.readmitted = _counter(
            "replica_readmitted", "Times the replica was readmitted after being down.",
            "router", "replica",
        )  # fmt: skip
        self.over_lag = _counter(
            "replica_over_max_lag", "Times the lag monitor left the replica out for lag.",
            "router", "replica",
        )  # fmt: skip
        self.under_lag = _counter(
            "replica_under_max_lag",
            "Times the lag monitor readmitted the replica after leaving it out for lag.",
            "router", "replica",
        )  # fmt: skip
        self.pool_full = _counter(
            "replica_pool_full_skips",
            "Reads sent elsewhere because the replica's pool had no free connection.",
            "router", "replica",
        )  # fmt: skip
        self.rejected_tokens = _counter(
            "rejected_tokens", "Causal tokens ignored in this process, by reason (all routers).",
            "reason",
        )  # fmt: skip

    def all(self) -> list[Metric]:
        return [
            self.routed, self.fallbacks, self.reruns, self.wait_seconds, self.waits,
            self.up, self.lag, self.down, self.readmitted, self.over_lag, self.under_lag,
            self.pool_full, self.rejected_tokens,
        ]  # fmt: skip

    def add_stats(self, label: str, stats: RouterStats) -> None:
        created = stats.since
        for key, count in sorted(stats.decisions.items()):
            self.routed.add_metric([label, *key], count, created=created)
        for code in _FALLBACKS:
            self.fallbacks.add_metric([label, code], stats.fallbacks.get(code, 0), created=created)
        for cause in RERUN_CAUSES:
            self.reruns.add_metric([label, cause], stats.reruns.get(cause, 0), created=created)
        waits = stats.waits
        for outcome, count in zip(
            _OUTCOMES, (waits.reached, waits.timed_out, waits.failed), strict=True
        ):
            self.waits.add_metric([label, outcome], count, created=created)
        self.wait_seconds.add_metric(
            [label],
            [(_le(bound), count) for bound, count in waits.buckets],
            waits.total_seconds,
        )
        for metric, counts in (
            (self.down, stats.replicas_down),
            (self.readmitted, stats.replicas_up),
            (self.over_lag, stats.replicas_over_max_lag),
            (self.under_lag, stats.replicas_under_max_lag),
        ):
            for name, count in sorted(counts.items()):
                metric.add_metric([label, name], count, created=created)

    def add_status(self, label: str, router: ReplicaRouter[Any]) -> None:
        for replica in router.status():  # the monitor's cached state: no I/O
            self.up.add_metric([label, replica.name], 1.0 if replica.healthy else 0.0)
            if replica.lag_seconds is not None:
                self.lag.add_metric([label, replica.name], replica.lag_seconds)
            self.pool_full.add_metric([label, replica.name], replica.pool_full_skips)


_collectors: weakref.WeakKeyDictionary[CollectorRegistry, ReplicaRouterCollector] = (
    weakref.WeakKeyDictionary()
)
_collectors_lock = threading.Lock()


def register(
    router: ReplicaRouter[Any],
    *,
    name: str | None = None,
    registry: CollectorRegistry | None = None,
) -> ReplicaRouterCollector:
    """Export ``router``'s metrics from ``registry`` (default: the global
    ``prometheus_client.REGISTRY``), labelled ``router=name`` (default:
    ``router.name``).

    Every router registered with one registry shares one collector there.
    Idempotent for the same router and name.

    :return: that registry's collector.
    :raises ConfigurationError: another router is already registered there
        under the same name.
    """
    target = REGISTRY if registry is None else registry
    with _collectors_lock:
        collector = _collectors.get(target)
        if collector is None:
            collector = ReplicaRouterCollector()
            collector.add(router, name=name)
            target.register(collector)
            _collectors[target] = collector
            return collector
        collector.add(router, name=name)
        return collector


def unregister(
    router: ReplicaRouter[Any] | str, *, registry: CollectorRegistry | None = None
) -> bool:
    """Stop exporting ``router`` (the router, or the name it is exported as)
    from ``registry`` (default: the global ``REGISTRY``). The collector leaves
    the registry with its last router.

    :return: whether it was exported there.
    """
    target = REGISTRY if registry is None else registry
    with _collectors_lock:
        collector = _collectors.get(target)
        if collector is None:
            return False
        removed = collector.remove(router)
        if not collector.routers():
            target.unregister(collector)
            del _collectors[target]
        return removed
