"""The consistency checker: pure checks of hand-built histories (each kind of
violation found, clean histories pass), a property test on simulated
replication, and short real runs under a nemesis on both backends."""

from __future__ import annotations

import itertools
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sqlalchemy_replicas.testing import FAULTS, Fault, FinalState, Op, Topology, check, run_check
from sqlalchemy_replicas.testing.checker import Violation

_ids = itertools.count(1)


def op(kind: str, key: str, invoke: float, complete: float, **kw: Any) -> Op:
    """An operation with a fresh id (ids increase in the order ops are built)."""
    kw.setdefault("client", key.split("-")[0] if kind in ("insert", "update", "read") else "a")
    kw.setdefault("outcome", "ok")
    kw.setdefault("server", "replica1" if kind in ("read", "read_counter") else None)
    return Op(id=next(_ids), kind=kind, key=key, invoke=invoke, complete=complete, **kw)  # type: ignore[arg-type]


SERVERS = {"primary": "1:5432", "replica1": "1:5433"}


def final(primary: dict[str, int], **kw: Any) -> FinalState:
    """A final state whose replica equals the primary unless told otherwise."""
    kw.setdefault("replicas", {"replica1": dict(primary)})
    kw.setdefault("servers", SERVERS)
    return FinalState(primary=primary, **kw)


def kinds(violations: list[Violation]) -> list[str]:
    return [v.kind for v in violations]


def test_clean_history_passes() -> None:
    """Writes acknowledged and read back at or above their version, a counter
    in range, identical end states: no violation."""
    ops = [
        op("insert", "a-1", 0.0, 1.0, version=1),
        op("read", "a-1", 1.5, 1.6, value=1, server_identity="1:5433"),
        op("update", "a-1", 2.0, 3.0, version=2, rowcount=1),
        op("read", "a-1", 3.5, 3.6, value=2, level="monotonic", scope=1),
        op("read", "a-1", 3.7, 3.8, value=2, level="monotonic", scope=1),
        op("read", "a-1", 3.9, 4.0, value=1, level="eventual", client="b", own=False),
        op("increment", "c0", 1.0, 2.0),
        op("increment", "c0", 1.0, 2.0, outcome="unknown"),
        op("read_counter", "c0", 2.5, 2.6, value=1),
    ]
    state = final({"a-1": 2}, primary_counters={"c0": 2}, replica_counters={"replica1": {"c0": 2}})
    assert check(ops, state) == []


def test_read_your_writes_violation() -> None:
    """A read that misses the client's own acknowledged write is reported with
    its op id, level and the fault in force."""
    ops = [
        op("insert", "a-1", 0.0, 1.0, version=1),
        op("update", "a-1", 1.0, 2.0, version=2),
        op("read", "a-1", 3.0, 3.1, value=1),
    ]
    fault = Fault("pause_replay", "replica1", 2.5, 4.0)
    [violation] = check(ops, final({"a-1": 2}), faults=[fault])
    assert violation.kind == "read_your_writes"
    assert violation.op == ops[2].id
    assert violation.level == "read_your_writes"
    assert violation.faults == ("pause_replay(replica1)",)
    assert "expected >= 2" in str(violation)


def test_read_your_writes_covers_the_prefix_of_own_writes() -> None:
    """A state holding the client's write holds everything acknowledged before
    that write began: missing it is a violation; a write concurrent with it
    may be missing."""
    x = op("insert", "b-1", 0.0, 1.0, version=1)
    mine = op("insert", "a-1", 2.0, 3.0, version=1)
    read = op("read", "b-1", 4.0, 4.1, value=None, client="a", own=False)
    assert kinds(check([x, mine, read], final({"b-1": 1, "a-1": 1}))) == ["read_your_writes"]
    concurrent = op("insert", "a-2", 0.5, 3.0, version=1)
    read2 = op("read", "b-1", 4.0, 4.1, value=None, client="a", own=False)
    assert check([x, concurrent, read2], final({"b-1": 1, "a-2": 1})) == []


def test_router_scope_demands_other_clients_writes() -> None:
    """With the router causal scope, a read must see every write acknowledged
    through the same router (domain) before it began; not another router's."""
    w = op("insert", "b-1", 0.0, 1.0, version=1, causal_domain="sync", scope_kind="router")
    r = op(
        "read", "b-1", 2.0, 2.1, value=None, client="a", causal_domain="sync", scope_kind="router"
    )
    assert kinds(check([w, r], final({"b-1": 1}))) == ["read_your_writes"]
    r2 = op(
        "read", "b-1", 2.0, 2.1, value=None, client="a", causal_domain="async", scope_kind="router"
    )
    assert check([w, r2], final({"b-1": 1})) == []


def test_monotonic_violation_within_a_scope_only() -> None:
    """A monotonic read older than an earlier read of the same causal scope is
    a violation; across scopes (visits) the documented guarantee ends."""
    w1 = op("insert", "b-1", 0.0, 1.0, version=1)
    w2 = op("update", "b-1", 2.0, 3.0, version=2)
    common = {"client": "a", "own": False, "level": "monotonic"}
    first = op("read", "b-1", 4.0, 4.1, value=2, scope=7, **common)
    back = op("read", "b-1", 5.0, 5.1, value=1, scope=7, **common)
    [violation] = check([w1, w2, first, back], final({"b-1": 2}))
    assert (violation.kind, violation.op) == ("monotonic", back.id)
    other_scope = op("read", "b-1", 5.0, 5.1, value=1, scope=8, **common)
    assert check([w1, w2, first, other_scope], final({"b-1": 2})) == []


def test_monotonic_counter_reads() -> None:
    """A monotonic counter read lower than an earlier one in its scope is a violation."""
    incs = [op("increment", "c0", 0.0, 1.0, client="b") for _ in range(3)]
    common = {"client": "a", "level": "monotonic", "scope": 1}
    reads = [
        op("read_counter", "c0", 2.0, 2.1, value=3, **common),
        op("read_counter", "c0", 3.0, 3.1, value=2, **common),
    ]
    state = final({}, primary_counters={"c0": 3}, replica_counters={"replica1": {"c0": 3}})
    assert kinds(check([*incs, *reads], state)) == ["monotonic"]


def test_bounded_staleness() -> None:
    """A bounded read may miss writes acknowledged within max_lag + slack before
    it began, not older ones."""
    w = op("insert", "b-1", 0.0, 1.0, version=1)
    kw = {"client": "a", "own": False, "level": "bounded", "max_lag": 1.0, "value": None}
    fresh_enough = op("read", "b-1", 2.2, 2.3, **kw)
    too_old = op("read", "b-1", 2.3, 2.4, **kw)
    assert check([w, fresh_enough], final({"b-1": 1}), slack=0.25) == []
    [violation] = check([w, too_old], final({"b-1": 1}), slack=0.25)
    assert violation.kind == "bounded_staleness"


def test_eventual_uses_the_router_max_lag() -> None:
    """An eventual read is bounded by the router's max_lag."""
    w = op("insert", "b-1", 0.0, 1.0, version=1)
    r = op("read", "b-1", 4.0, 4.1, client="a", own=False, level="eventual", value=None)
    assert check([w, r], final({"b-1": 1}), router_max_lag=5.0) == []
    assert kinds(check([w, r], final({"b-1": 1}), router_max_lag=2.0)) == ["bounded_staleness"]


def test_strong_reads() -> None:
    """A strong read misses no acknowledged write and runs on the primary."""
    w = op("insert", "b-1", 0.0, 1.0, version=1)
    stale = op("read", "b-1", 2.0, 2.1, client="a", level="strong", value=None, server="primary")
    on_replica = op("read", "b-1", 2.0, 2.1, client="a", level="strong", value=1)
    assert kinds(check([w, stale], final({"b-1": 1}))) == ["strong"]
    assert kinds(check([w, on_replica], final({"b-1": 1}))) == ["strong"]


def test_phantom_reads() -> None:
    """Reading a version never written, written only by a failed write, or
    before its write began, or a counter above its attempts, is a violation."""
    w = op("insert", "a-1", 0.0, 1.0, version=1)
    failed = op("update", "a-1", 1.0, 1.5, version=2, outcome="fail")
    reads = [
        op("read", "a-1", 2.0, 2.1, value=7),
        op("read", "a-1", 2.0, 2.1, value=2),
    ]
    early = op("read", "a-1", 2.0, 2.1, value=3)
    late_write = op("update", "a-1", 3.0, 4.0, version=3)
    inc = op("increment", "c0", 0.0, 1.0)
    too_high = op("read_counter", "c0", 2.0, 2.1, value=2)
    state = final({"a-1": 3}, primary_counters={"c0": 1}, replica_counters={"replica1": {"c0": 1}})
    found = check([w, failed, *reads, early, late_write, inc, too_high], state)
    assert kinds(found) == ["phantom_read"] * 4
    assert [v.op for v in found] == [reads[0].id, reads[1].id, early.id, too_high.id]


def test_lost_writes() -> None:
    """An acknowledged write missing at the end, an acknowledged update that
    changed no row, and a counter below its acknowledged increments are lost."""
    w1 = op("insert", "a-1", 0.0, 1.0, version=1)
    w2 = op("update", "a-1", 1.0, 2.0, version=2, rowcount=0)
    incs = [op("increment", "c0", 0.0, 1.0) for _ in range(2)]
    state = final({"a-1": 1}, primary_counters={"c0": 1}, replica_counters={"replica1": {"c0": 1}})
    found = check([w1, w2, *incs], state)
    assert sorted(kinds(found)) == ["lost_write"] * 3
    missing = check([w1], final({}))
    assert kinds(missing) == ["lost_write"]


def test_unknown_outcomes_may_go_either_way_but_not_twice() -> None:
    """A write whose commit answer was lost may or may not be there; a counter
    above acknowledged + unknown increments counts one twice."""
    w1 = op("insert", "a-1", 0.0, 1.0, version=1)
    w2 = op("update", "a-1", 1.0, 2.0, version=2, outcome="unknown")
    incs = [op("increment", "c0", 0.0, 1.0), op("increment", "c0", 0.0, 1.0, outcome="unknown")]
    for value in (1, 2):
        for count in (1, 2):
            state = final(
                {"a-1": value},
                primary_counters={"c0": count},
                replica_counters={"replica1": {"c0": count}},
            )
            assert check([w1, w2, *incs], state) == []
    twice = final({"a-1": 2}, primary_counters={"c0": 3}, replica_counters={"replica1": {"c0": 3}})
    assert kinds(check([w1, w2, *incs], twice)) == ["duplicate_write"]
    # An unknown write older than an acknowledged one cannot be the end state.
    w3 = op("update", "a-1", 3.0, 4.0, version=3)
    assert kinds(check([w1, w2, w3], final({"a-1": 2}))) == ["lost_write"]


def test_phantom_rows_at_the_end() -> None:
    """A row nobody wrote, or a version only a failed write wrote, on the
    primary at the end is reported."""
    w = op("insert", "a-1", 0.0, 1.0, version=1)
    failed = op("update", "a-1", 1.0, 2.0, version=2, outcome="fail")
    assert kinds(check([w, failed], final({"a-1": 2}))) == ["phantom_read"]
    assert kinds(check([w], final({"a-1": 1, "zz-1": 1}))) == ["phantom_read"]


def test_replica_divergence() -> None:
    """A replica whose rows or counters differ from the primary's at the end."""
    w = op("insert", "a-1", 0.0, 1.0, version=1)
    rows = final({"a-1": 1}, replicas={"replica1": {}})
    [violation] = check([w], rows)
    assert violation.kind == "replica_divergence"
    assert "a-1: 1/None" in violation.message
    counters = final(
        {"a-1": 1}, primary_counters={"c0": 0}, replica_counters={"replica1": {"c0": 1}}
    )
    assert kinds(check([w], counters)) == ["replica_divergence"]


def test_foreign_server() -> None:
    """A read served by an unknown node, or by a node whose identity is not
    the configured server's, is reported."""
    w = op("insert", "a-1", 0.0, 1.0, version=1)
    unknown = op("read", "a-1", 2.0, 2.1, value=1, server="replica9")
    impostor = op("read", "a-1", 2.0, 2.1, value=1, server_identity="2:5433")
    unrecorded = op("read", "a-1", 2.0, 2.1, value=1, server=None)
    found = check([w, unknown, impostor, unrecorded], final({"a-1": 1}))
    assert kinds(found) == ["foreign_server"] * 3


def test_failed_reads_are_not_judged() -> None:
    """A read that raised is an outcome, not a violation."""
    w = op("insert", "a-1", 0.0, 1.0, version=1)
    r = op("read", "a-1", 2.0, 2.1, value=None, outcome="fail", error="OperationalError: x")
    assert check([w, r], final({"a-1": 1})) == []


# -- a property: simulated replication that keeps the promises passes ---------------


@st.composite
def simulated(draw: st.DrawFn) -> tuple[list[Op], FinalState, list[int]]:
    """Clients take turns (one operation at a time, in real time) against a
    primary and a replica that applies a prefix of the commit log. Reads at
    read_your_writes are served by the replica only when it holds the
    client's writes, else by the primary. Returns the ops, the end state and
    the ids of reads that were forced stale (one version too old) afterwards."""
    log: list[tuple[str, int]] = []
    applied = 0
    versions: dict[str, int] = {}
    ops: list[Op] = []
    t = 0.0
    last_commit: dict[str, int] = {}
    for _ in range(draw(st.integers(1, 40))):
        client = draw(st.sampled_from(["a", "b", "c"]))
        applied = draw(st.integers(applied, len(log)))
        t += 1.0
        action = draw(st.sampled_from(["write", "read_own", "read_other"]))
        if action == "write":
            key = f"{client}-{draw(st.integers(1, 2))}"
            version = versions.get(key, 0) + 1
            versions[key] = version
            kind = "insert" if version == 1 else "update"
            log.append((key, version))
            last_commit[client] = len(log)
            ops.append(op(kind, key, t, t + 0.5, client=client, version=version))
            continue
        keys = (
            [k for k in versions if k.startswith(client)]
            if action == "read_own"
            else list(versions)
        )
        if not keys:
            continue
        key = draw(st.sampled_from(sorted(keys)))
        on_replica = applied >= last_commit.get(client, 0)
        state = log if not on_replica else log[:applied]
        value = max((v for k, v in state if k == key), default=None)
        ops.append(
            op(
                "read",
                key,
                t,
                t + 0.5,
                client=client,
                own=key.startswith(client),
                value=value,
                server="replica1" if on_replica else "primary",
            )
        )
    primary = dict(versions)
    return ops, final(primary), []


@settings(max_examples=200, deadline=None)
@given(simulated())
def test_simulated_replication_that_keeps_its_promises_passes(
    case: tuple[list[Op], FinalState, list[int]],
) -> None:
    """Histories of a primary and a prefix-applying replica, with reads routed
    as read_your_writes promises, have no violation; making any own read
    with a nonzero floor one version older is found."""
    ops, state, _ = case
    assert check(ops, state) == []
    for index, o in enumerate(ops):
        if o.kind == "read" and o.own and o.value:
            floor = max(
                (w.version or 0 for w in ops[:index] if w.key == o.key and w.is_write),
                default=0,
            )
            if o.value == floor:
                stale = Op(**{**_fields(o), "value": o.value - 1 or None})
                found = check([*ops[:index], stale, *ops[index + 1 :]], state)
                assert [v.op for v in found] == [o.id]
                break


def _fields(o: Op) -> dict[str, Any]:
    return {name: getattr(o, name) for name in Op.__slots__}


# -- real runs under faults ---------------------------------------------------------


def test_real_run_under_faults(topology: Topology) -> None:
    """Sync threads and asyncio tasks at every level, under every kind of fault
    the nemesis has: no violation, no stuck client, faults really injected,
    most non-strong reads served by replicas, and reads rarely fail while
    only replicas are faulty."""
    started = time.monotonic()
    result = run_check(topology, duration=20.0, threads=3, tasks=3, seed=20261201)
    assert result.violations == [], result.report()
    assert result.hung_clients == []
    assert result.nemesis_errors == []
    injected = set(result.faults_by_kind())
    assert len(result.faults) >= 5, result.report()
    assert len(injected) >= 4, result.report()
    assert result.replica_read_share(include_strong=False) >= 0.6, result.report()
    reads = [o for o in result.ops if o.is_read]
    assert len(reads) >= 200
    replica_only = result.read_failures_during(replica_faults_only=True)
    assert replica_only <= 0.05 * len(reads), result.report()
    assert set(FAULTS) >= injected
    assert time.monotonic() - started < 90
