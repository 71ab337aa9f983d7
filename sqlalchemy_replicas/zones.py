"""Locality: reads prefer the replicas in the application's own zone.

An application that runs in several zones (availability zones, data
centres, regions) declares its own (``ReplicaRouter(zone="eu-west-1a")``)
and the replicas' (``replica_zones={"replica1": "eu-west-1a", ...}``). A
read's order of preference is then: the replicas in the app's zone, then the
others, each group in the read's own order (the sticky key's rendezvous
order, with ``weights``, or round robin within the group). The plan
(:mod:`sqlalchemy_replicas.plan`) takes that order as it is: a replica known
to have caught up, in the zone first; then waits, in the zone first; then
the primary. So an in-zone replica serves whenever it may, and the reads go
out of the zone only when every in-zone replica is lagging, down, paused or
behind the read's commits.

Zones are compared exactly, as written. Without an app zone, or when no
replica is in it, every replica is alike (the order is the one without
zones). Pure code, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ._config import kind_of
from .exc import ConfigurationError
from .sticky import rank

__all__ = ["check_replica_zones", "check_zone", "local_replicas", "preference"]


def check_zone(zone: object, *, argument: str = "zone") -> str | None:
    """The app's zone: None (no preference) or a non-empty str.

    :raises ConfigurationError: naming ``argument`` and the fix.
    """
    if zone is None:
        return None
    return _zone_name(
        zone, argument, "the zone this application runs in", " (or None: no zone preference)"
    )


def check_replica_zones(
    replica_zones: object, names: Sequence[str] | None, *, argument: str = "replica_zones"
) -> dict[str, str]:
    """Replica name -> zone, for the replicas given one.

    Replicas left out are in no zone: they are never preferred as local.

    :param replica_zones: None or a mapping of replica name to zone name.
    :param names: the router's replica names (None: not checked here).
    :raises ConfigurationError: for another type, a name that is not one of
        ``names``, or a zone that is not a non-empty str; naming ``argument``
        and the fix.
    """
    if replica_zones is None:
        return {}
    if not isinstance(replica_zones, Mapping):
        raise ConfigurationError(
            f"{argument} must be a mapping of replica name to zone, e.g. "
            f"{argument}={{'replica1': 'eu-west-1a'}}, not {kind_of(replica_zones)}"
        )
    if names is not None and (
        unknown := sorted(str(name) for name in replica_zones if name not in names)
    ):
        raise ConfigurationError(
            f"{argument} names unknown replicas {unknown}; the replicas are {list(names)} "
            "(unnamed replicas are replica1, replica2, ... in order)"
        )
    return {
        str(name): _zone_name(zone, f"{argument}[{name!r}]", "the replica's zone", "")
        for name, zone in replica_zones.items()
    }


def _zone_name(zone: object, argument: str, what: str, otherwise: str) -> str:
    if not isinstance(zone, str) or not zone.strip():
        shown = repr(zone) if isinstance(zone, str) else kind_of(zone)
        raise ConfigurationError(
            f"{argument} must name {what}, e.g. {argument}='eu-west-1a'{otherwise}, not {shown}"
        )
    return zone.strip()


def local_replicas(
    names: Sequence[str], replica_zones: Mapping[str, str], zone: str | None
) -> tuple[bool, ...]:
    """For each of ``names``, whether that replica is in the app's ``zone``
    (all False without one: no replica is preferred)."""
    return tuple(zone is not None and replica_zones.get(name) == zone for name in names)


def preference(
    names: Sequence[str],
    weights: Sequence[float],
    local: Sequence[bool],
    *,
    key: bytes | None,
    turn: int = 0,
) -> list[int]:
    """Indexes of ``names`` in a read's order of preference: the ``local``
    replicas first, then the others.

    Within each group: with a sticky ``key``, the key's rendezvous order
    (:func:`~sqlalchemy_replicas.sticky.rank` with ``weights``). A pair's
    score does not depend on the other replicas, so this is the order the
    key has among that group's replicas alone: a key keeps its in-zone
    replica whatever the other zones hold. Without a key, round robin:
    read number ``turn`` starts at the group's ``turn``-th replica (modulo
    its size), so reads spread evenly within the app's zone rather than
    favouring the in-zone replica that follows an out-of-zone one.
    """
    if key is not None:
        ranked = rank(key, names, weights)
        return [i for i in ranked if local[i]] + [i for i in ranked if not local[i]]
    order: list[int] = []
    for group in (
        [i for i, near in enumerate(local) if near],
        [i for i, near in enumerate(local) if not near],
    ):
        if group:
            start = turn % len(group)
            order += group[start:] + group[:start]
    return order
