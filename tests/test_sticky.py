"""Sticky routing by rendezvous hashing: stable, balanced, minimal movement."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import Counter

import pytest
import sqlalchemy as sa

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.exc import ConfigurationError
from sqlalchemy_replicas.sticky import current_sticky_key, key_bytes, rank
from sqlalchemy_replicas.testing import StatementLog, Topology, wait_until

NAMES = ("replica1", "replica2", "replica3")
KEYS = [key_bytes(f"user-{i}") for i in range(10_000)]


def first_choices(names: tuple[str, ...], weights: tuple[float, ...]) -> list[str]:
    return [names[rank(key, names, weights)[0]] for key in KEYS]


def test_keys_spread_evenly_over_equal_replicas() -> None:
    """10,000 keys over three equal replicas: each gets a third, within a few percent."""
    shares = Counter(first_choices(NAMES, (1.0, 1.0, 1.0)))
    for name in NAMES:
        assert abs(shares[name] / len(KEYS) - 1 / 3) < 0.03, shares


def test_removing_a_replica_moves_only_its_keys() -> None:
    """Without replica2, exactly the keys that preferred it move; the others stay."""
    before = first_choices(NAMES, (1.0, 1.0, 1.0))
    after = first_choices(("replica1", "replica3"), (1.0, 1.0))
    moved = [b for b, a in zip(before, after, strict=True) if b != a]
    assert moved
    assert set(moved) == {"replica2"}
    assert len(moved) == before.count("replica2")
    assert abs(Counter(after)["replica1"] / len(KEYS) - 0.5) < 0.03


def test_weights_give_proportional_shares() -> None:
    """A replica of weight 2 among two of weight 1 gets about half the keys."""
    shares = Counter(first_choices(NAMES, (2.0, 1.0, 1.0)))
    assert abs(shares["replica1"] / len(KEYS) - 0.5) < 0.03
    assert abs(shares["replica2"] / len(KEYS) - 0.25) < 0.03


def test_choices_are_the_same_in_every_process() -> None:
    """The hash is not Python's hash(): other processes (app servers) agree."""
    code = (
        "from sqlalchemy_replicas.sticky import key_bytes, rank; "
        "print([rank(key_bytes(f'user-{i}'), ('a', 'b', 'c'), (1.0, 1.0, 1.0)) "
        "for i in range(50)])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(outputs) == 1
    assert outputs.pop().strip() == str(
        [rank(key_bytes(f"user-{i}"), ("a", "b", "c"), (1.0, 1.0, 1.0)) for i in range(50)]
    )


def test_keys_are_canonical_and_validated() -> None:
    """5 and "5" are the same user; UUIDs and bytes work; other types are refused."""
    assert key_bytes(5) == key_bytes("5")
    user = uuid.uuid4()
    assert key_bytes(user) == str(user).encode()
    with sr.sticky(b"raw"), sr.sticky(7):
        assert current_sticky_key() == b"7"
        with sr.sticky(None):
            assert current_sticky_key() is None
        assert current_sticky_key() == b"7"
    assert current_sticky_key() is None
    for bad in (1.5, True, ["x"]):
        with pytest.raises(ConfigurationError, match="a sticky key is a str, int, bytes or UUID"):
            sr.sticky(bad)  # type: ignore[arg-type]


def test_router_weights_are_validated() -> None:
    """Weights must name known replicas and be positive numbers."""
    url = "postgresql+psycopg://u@127.0.0.1:1/db"
    replica = "postgresql+psycopg://u@127.0.0.1:2/db"
    with pytest.raises(ConfigurationError, match="unknown replicas"):
        sr.ReplicaRouter(url, [replica], weights={"nope": 1.0})
    with pytest.raises(ConfigurationError, match="is invalid; give a number > 0"):
        sr.ReplicaRouter(url, [replica], weights={"replica1": 0})


def test_sticky_reads_stay_on_the_keys_replica(topology: Topology) -> None:
    """Real servers: every read of a sticky key goes to the same replica, and
    different keys use both replicas."""
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    router.start()
    # Once the lag monitor has seen both replicas serving, both are known to have
    # applied the router's start position: no read prefers a replica merely known
    # to be caught up.
    wait_until(
        lambda: all(s.healthy and s.position is not None for s in router.status()),
        timeout=10,
        what="the lag monitor to see both replicas serving",
    )
    try:
        used: dict[str, set[str]] = {}
        with StatementLog(router) as log, router.sessionmaker()() as session:
            for user in range(12):
                log.clear()
                with sr.sticky(user):
                    for _ in range(3):
                        session.execute(sa.text("SELECT 1 AS sticky_probe"))
                used[str(user)] = {s.node for s in log.statements if "sticky_probe" in s.sql}
        assert all(len(nodes) == 1 for nodes in used.values()), used
        assert set().union(*used.values()) == {"replica1", "replica2"}
    finally:
        router.dispose()
