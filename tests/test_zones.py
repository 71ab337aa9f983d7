"""Zones: reads prefer the replicas in the app's own zone, then the others, then
the primary; sticky hashing within the preferred zone.

The order of preference is pure (``sqlalchemy_replicas.zones.preference``) and
tested with properties; the plan takes it as it is (a replica known caught up
anywhere before any wait, in-zone first within each). On real servers, with
replica2 in the app's zone: reads go there; when its replay is paused, or it
is over ``max_lag``, they go to replica1, and come back once it recovers.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas import settings
from sqlalchemy_replicas.exc import ConfigurationError
from sqlalchemy_replicas.plan import (
    CAUGHT_UP_AFTER_WAIT,
    KNOWN_CAUGHT_UP,
    NOT_CAUGHT_UP,
    ReplicaState,
    Step,
    plan_read,
)
from sqlalchemy_replicas.sticky import key_bytes, rank
from sqlalchemy_replicas.testing import StatementLog, Topology, wait_until
from sqlalchemy_replicas.zones import check_replica_zones, local_replicas, preference

# -- the order of preference, pure ----------------------------------------------------

NAMES = ("r1", "r2", "r3", "r4", "r5", "r6")

layouts = st.integers(1, 6).flatmap(
    lambda n: st.tuples(
        st.just(NAMES[:n]),
        st.lists(st.floats(0.1, 10, allow_nan=False), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
    )
)
keys = st.none() | st.binary(max_size=8)
turns = st.integers(0, 1000)


@given(layouts, keys, turns)
def test_in_zone_replicas_always_come_first(
    layout: tuple[tuple[str, ...], list[float], list[bool]], key: bytes | None, turn: int
) -> None:
    """Every replica appears once, and every replica in the app's zone comes
    before every replica outside it, with or without a sticky key."""
    names, weights, local = layout
    order = preference(names, weights, local, key=key, turn=turn)
    assert sorted(order) == list(range(len(names)))
    flags = [local[i] for i in order]
    assert flags == sorted(flags, reverse=True)


@given(layouts, st.binary(max_size=8))
def test_within_a_zone_a_key_keeps_its_sticky_order(
    layout: tuple[tuple[str, ...], list[float], list[bool]], key: bytes
) -> None:
    """Within each group (in the zone, outside it) the order is the key's
    rendezvous order over that group's replicas alone, weights included: a
    key's in-zone replica does not depend on what the other zones hold."""
    names, weights, local = layout
    order = preference(names, weights, local, key=key)
    for near in (True, False):
        group = [i for i in range(len(names)) if local[i] == near]
        alone = rank(key, [names[i] for i in group], [weights[i] for i in group])
        assert [i for i in order if local[i] == near] == [group[j] for j in alone]


@given(layouts, keys, turns)
def test_the_order_is_a_function_of_its_inputs(
    layout: tuple[tuple[str, ...], list[float], list[bool]], key: bytes | None, turn: int
) -> None:
    """Same replicas, zones, key and turn: the same order (no hidden state, no
    process-specific hash); with no replica in the app's zone, the order is the
    one without zones (the key's rendezvous order, or round robin)."""
    names, weights, local = layout
    order = preference(names, weights, local, key=key, turn=turn)
    assert preference(list(names), list(weights), list(local), key=key, turn=turn) == order
    nowhere = preference(names, weights, [False] * len(names), key=key, turn=turn)
    if key is not None:
        assert nowhere == rank(key, names, weights)
    else:
        start = turn % len(names)
        assert nowhere == [*range(start, len(names)), *range(start)]


def test_round_robin_spreads_reads_evenly_within_the_zone() -> None:
    """Without a key, reads take turns among the in-zone replicas only (each
    first equally often), the out-of-zone ones taking turns behind them."""
    local = [True, False, True, False]
    firsts = [preference(NAMES[:4], [1.0] * 4, local, key=None, turn=t)[0] for t in range(6)]
    assert firsts == [0, 2, 0, 2, 0, 2]
    assert preference(NAMES[:4], [1.0] * 4, local, key=None, turn=1) == [2, 0, 3, 1]


def test_local_replicas_need_the_apps_zone() -> None:
    """A replica is local only when its zone is the app's, compared exactly;
    without an app zone no replica is (no preference)."""
    zones = {"r1": "eu-west-1a", "r2": "eu-west-1b"}
    names = ("r1", "r2", "r3")
    assert local_replicas(names, zones, "eu-west-1b") == (False, True, False)
    assert local_replicas(names, zones, "EU-WEST-1B") == (False, False, False)
    assert local_replicas(names, zones, None) == (False, False, False)
    assert local_replicas(names, {}, "eu-west-1b") == (False, False, False)


def test_the_plan_prefers_the_zone_within_each_kind_of_step() -> None:
    """With the zoned order, the plan tries: replicas known caught up, in the
    zone first (an out-of-zone one known caught up beats a wait on an in-zone
    one: no wait, no budget spent); then waits, in the zone first; then the
    primary. An in-zone replica that may not serve (down, over max_lag) is not
    tried at all."""
    names = ("far-1", "near-1", "far-2", "near-2")
    local = local_replicas(names, {"near-1": "b", "near-2": "b", "far-1": "a"}, "b")
    order = [names[i] for i in preference(names, [1.0] * 4, local, key=None)]
    assert order == ["near-1", "near-2", "far-1", "far-2"]
    applied = {"far-1": 10, "far-2": 3, "near-1": 3, "near-2": 10}
    may_serve = {"near-1": True, "near-2": False, "far-1": True, "far-2": True}
    snapshot = [ReplicaState(n, may_serve[n], applied=applied[n]) for n in order]
    plan = plan_read("read_your_writes", snapshot, reached=operator.ge, position=10, budget=0.5)
    assert plan.steps == (
        Step("far-1", None, KNOWN_CAUGHT_UP),
        Step("near-1", 10, CAUGHT_UP_AFTER_WAIT),
        Step("far-2", 10, CAUGHT_UP_AFTER_WAIT),
    )
    assert plan.fallback == NOT_CAUGHT_UP
    eventual = plan_read("eventual", snapshot)
    assert [step.replica for step in eventual.steps] == ["near-1", "far-1", "far-2"]


# -- configuration ----------------------------------------------------------------------

PG = "postgresql+psycopg://app:pw@127.0.0.1:5001/app"
PG2 = "postgresql+psycopg://app:pw@127.0.0.1:5002/app"
PG3 = "postgresql+psycopg://app:pw@127.0.0.1:5003/app"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"zone": 3}, "zone must name the zone this application runs in, e.g. zone='eu-west-1a'"),
        ({"zone": " "}, r"zone must name .* \(or None: no zone preference\), not ' '"),
        (
            {"replica_zones": "eu-west-1a"},
            "replica_zones must be a mapping of replica name to zone, "
            "e.g. replica_zones={'replica1': 'eu-west-1a'}, not a str",
        ),
        (
            {"replica_zones": {"replica3": "eu-west-1a"}},
            r"replica_zones names unknown replicas \['replica3'\]; the replicas are "
            r"\['replica1', 'replica2'\] \(unnamed replicas are replica1, replica2",
        ),
        (
            {"replica_zones": {"replica1": ""}},
            r"replica_zones\['replica1'\] must name the replica's zone, e.g.",
        ),
        ({"replica_zones": {"replica1": None}}, r"replica_zones\['replica1'\] .*not a NoneType"),
    ],
)
def test_bad_zones_raise_naming_the_argument_and_the_fix(
    kwargs: dict[str, Any], message: str
) -> None:
    """A zone that is not a non-empty str, replica_zones that is not a mapping,
    or that names an unknown replica, fails at construction, naming the argument
    and the fix."""
    with pytest.raises(ConfigurationError, match=message):
        sr.ReplicaRouter(PG, [PG2, PG3], **kwargs)


def test_a_zone_on_one_side_only_is_no_preference(tmp_path: Path) -> None:
    """Replica zones without an app zone, or an app zone no replica is in, are
    accepted and change nothing: the order is the one without zones. Replicas
    left out of replica_zones are in no zone."""
    names = {n: f"sqlite:///{tmp_path / n}.db" for n in ("a", "b", "c")}
    plain = sr.ReplicaRouter(f"sqlite:///{tmp_path / 'p.db'}", names)
    zoned_only = sr.ReplicaRouter(
        f"sqlite:///{tmp_path / 'p.db'}", names, replica_zones={"a": "z1", "b": "z2"}
    )
    elsewhere = sr.ReplicaRouter(
        f"sqlite:///{tmp_path / 'p.db'}", names, zone="z3", replica_zones={"a": "z1"}
    )
    try:
        assert zoned_only.zone is None
        assert zoned_only.replica_zones == {"a": "z1", "b": "z2"}
        for n in range(20):
            key = key_bytes(n)
            expected = [r.name for r in plain.cluster.replica_order(key)]
            assert [r.name for r in zoned_only.cluster.replica_order(key)] == expected
            assert [r.name for r in elsewhere.cluster.replica_order(key)] == expected
    finally:
        for router in (plain, zoned_only, elsewhere):
            router.dispose()


def test_the_router_orders_reads_by_zone(tmp_path: Path) -> None:
    """The router's order of preference (replica_order, replica_snapshot) puts the
    in-zone replicas first: sticky keys stay within the zone, and reads without a
    key take turns there."""
    names = {n: f"sqlite:///{tmp_path / n}.db" for n in ("a", "b", "c")}
    router = sr.ReplicaRouter(
        f"sqlite:///{tmp_path / 'p.db'}",
        names,
        zone="z1",
        replica_zones={"a": "z2", "b": "z1", "c": "z1"},
    )
    try:
        for n in range(20):
            order = [r.name for r in router.cluster.replica_order(key_bytes(n))]
            assert set(order[:2]) == {"b", "c"}
            assert order[2] == "a"
            snapshot = [s.name for s in router.cluster.replica_snapshot(key_bytes(n))]
            assert snapshot == order
        firsts = [router.cluster.replica_order(None)[0].name for _ in range(4)]
        assert sorted(firsts) == ["b", "b", "c", "c"]
        assert [(s.name, s.zone) for s in router.status()] == [
            ("a", "z2"),
            ("b", "z1"),
            ("c", "z1"),
        ]
    finally:
        router.dispose()


def test_zones_from_settings_mappings() -> None:
    """In a settings mapping (Flask's app.config) replica zones may be a dict,
    and its values are checked naming the key."""
    parsed = settings.from_settings(
        {
            "DATABASE_URL": PG,
            "DATABASE_REPLICA_URLS": {"eu": PG2, "us": PG3},
            "SQLALCHEMY_REPLICAS_ZONE": "eu-west-1a",
            "SQLALCHEMY_REPLICAS_REPLICA_ZONES": {"eu": "eu-west-1a", "us": "us-east-1a"},
        }
    )
    assert parsed.options["zone"] == "eu-west-1a"
    assert parsed.options["replica_zones"] == {"eu": "eu-west-1a", "us": "us-east-1a"}
    with pytest.raises(ConfigurationError, match=r"SQLALCHEMY_REPLICAS_REPLICA_ZONES\['eu'\]"):
        settings.from_settings(
            {
                "DATABASE_URL": PG,
                "DATABASE_REPLICA_URLS": {"eu": PG2},
                "SQLALCHEMY_REPLICAS_REPLICA_ZONES": {"eu": 1},
            }
        )
    assert check_replica_zones({"x": " z "}, None) == {"x": "z"}


# -- real servers -----------------------------------------------------------------------

MAX_LAG = 1.0


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = "zone_row"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    value: Mapped[int]


@pytest.fixture
def zoned_router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    """A started router in zone "b", where replica2 is (replica1 is in "a"),
    both replicas seen serving."""
    router = sr.ReplicaRouter(
        topology.primary_url,
        topology.replica_urls,
        zone="b",
        replica_zones={"replica1": "a", "replica2": "b"},
        max_lag=MAX_LAG,
        lag_check_interval=0.1,
        engine_options={"pool_pre_ping": True},
    )
    Base.metadata.create_all(router.primary)
    topology.wait_for_catchup()
    router.start()
    wait_until(
        lambda: all(s.healthy for s in router.status()),
        timeout=10,
        what="the lag monitor to see both replicas serving",
    )
    yield router
    router.dispose()


def reads_by_server(router: sr.ReplicaRouter, count: int = 10) -> dict[str, int]:
    """Where ``count`` reads without a key and ``count`` reads with keys whose
    first choice without zones is replica1 went, by server."""
    far_keys = [
        key
        for n in range(100)
        if rank(key := key_bytes(n), ("replica1", "replica2"), (1.0, 1.0))[0] == 0
    ][:count]
    with StatementLog(router) as log, router.sessionmaker()() as session:
        for _ in range(count):
            session.scalar(sa.select(Row.value).where(Row.id == -1))
            session.rollback()
        for key in far_keys:
            with sr.sticky(key):
                session.scalar(sa.select(Row.value).where(Row.id == -1))
                session.rollback()
    return dict(log.counts())


def write_then_read(router: sr.ReplicaRouter, value: int) -> tuple[int | None, sr.ExplainEntry]:
    """Commit ``value`` in one session, read it back in another: what it read,
    and where the read went."""
    make = router.sessionmaker()
    with make() as writer:
        writer.merge(Row(id=1, value=value))
        writer.commit()
    with make() as reader, sr.explain() as log:
        seen = reader.scalar(sa.select(Row.value).where(Row.id == 1))
    (entry,) = log
    return seen, entry


def test_reads_go_to_the_replica_in_the_apps_zone(
    zoned_router: sr.ReplicaRouter, topology: Topology
) -> None:
    """Real servers: every read goes to replica2, the replica in the app's zone:
    round-robin reads, and sticky keys whose first choice without zones is
    replica1. Status shows each replica's zone."""
    assert [(s.name, s.zone) for s in zoned_router.status()] == [
        ("replica1", "a"),
        ("replica2", "b"),
    ]
    assert reads_by_server(zoned_router) == {"replica2": 20}


def test_reads_leave_the_zone_while_its_replica_may_not_serve(
    zoned_router: sr.ReplicaRouter, topology: Topology
) -> None:
    """Real servers: replica2 (in the zone) paused: a read right after a commit
    goes to replica1, fresh (asking replica2 first, refused at once, unless the
    monitor saw replica1 apply the commit in between: then without a wait). Once
    replica2 is over max_lag, every read goes to replica1; once it has caught up,
    reads come back to replica2."""
    topology.pause_replay(1)
    seen, read = write_then_read(zoned_router, 2)
    assert (seen, read.target) == (2, "replica1")
    assert [(w.replica, w.outcome) for w in read.waits] in (
        [("replica2", "failed"), ("replica1", "reached")],
        [],
    )
    counter = iter(range(2, 10_000))

    def replica2_left_out() -> bool:
        with zoned_router.primary.begin() as conn:  # keeps its lag growing
            conn.execute(sa.insert(Row).values(id=next(counter), value=0))
        return any(s.name == "replica2" and s.healthy is False for s in zoned_router.status())

    wait_until(replica2_left_out, timeout=20, what="replica2 over max_lag")
    with sr.consistency("eventual"):
        assert reads_by_server(zoned_router) == {"replica1": 20}
    topology.resume_replay(1)
    wait_until(
        lambda: all(s.healthy for s in zoned_router.status()),
        timeout=20,
        what="replica2 back under max_lag",
    )
    with sr.consistency("eventual"):
        assert reads_by_server(zoned_router) == {"replica2": 20}


def test_the_router_follows_zones_preference_turn_after_turn(tmp_path: Path) -> None:
    """The router keeps its orders of preference (computed once per sticky key,
    and once per turn of the round robin's cycle): they stay exactly what
    zones.preference says, read after read, for keys seen again and for
    zone groups of different sizes (2 in the zone, 3 outside: a 6-turn cycle)."""
    names = {n: f"sqlite:///{tmp_path / n}.db" for n in ("a", "b", "c", "d", "e")}
    zoning = {"a": "z2", "b": "z1", "c": "z2", "d": "z1", "e": "z2"}
    router = sr.ReplicaRouter(
        f"sqlite:///{tmp_path / 'p.db'}", names, zone="z1", replica_zones=zoning
    )
    local = tuple(zoning[n] == "z1" for n in names)
    weights = (1.0,) * len(names)
    try:
        cluster = router.cluster
        listed = list(names)
        for turn in range(13):  # a fresh router's reads take turns from 0
            expected = preference(listed, weights, local, key=None, turn=turn)
            assert [r.name for r in cluster.replica_order(None)] == [listed[i] for i in expected]
        for n in [*range(30), *range(30)]:  # each key twice: computed, then kept
            expected = preference(listed, weights, local, key=key_bytes(n))
            assert [r.name for r in cluster.replica_order(key_bytes(n))] == [
                listed[i] for i in expected
            ]
    finally:
        router.dispose()
