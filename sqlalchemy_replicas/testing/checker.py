"""The consistency checker: a pure function from a history to its violations.

:func:`check` takes a :class:`~.history.History` (operations with real
invoke/complete times, faults) and the final contents of the primary and of
each replica, and returns every :class:`Violation` it finds. It does no I/O,
so it is tested on histories built by hand.

The model. Each client owns its keys (registers) and is their only writer;
version ``n`` of a key is written by that client's ``n``-th write of it, so
versions of a key are totally ordered and each names one write. Counters are
shared and only ever incremented by 1. Replication (PostgreSQL streaming,
MariaDB GTID in strict mode) applies the primary's commits in commit order,
so every replica state is a *prefix* of the primary's history: a state that
contains a write ``w`` contains every write acknowledged before ``w`` was
invoked. From that, each read gets a *floor*: writes it must see.

- ``strong``: every write acknowledged before the read began.
- ``read_your_writes``: the client's own acknowledged writes (with the
  ``"router"`` causal scope, every write acknowledged through the same router)
  before the read began, and, by the prefix property, every write
  acknowledged before one of those was invoked.
- ``monotonic``: as read_your_writes, and every write an earlier read in the
  same causal scope (one ``causal_context()``, as documented) observed, with
  its prefix.
- ``bounded(max_lag)``: every write acknowledged before ``invoke - max_lag -
  slack``. ``eventual``: the same with the router's ``max_lag``. The slack
  covers how the lag monitor measures: a replica's lag is known as of its
  last check (one ``lag_check_interval`` ago at most), and a read routed just
  before a check that would have excluded the replica runs on it.
- every read: the value was really written (by a write invoked before the
  read completed and not known to have failed); a counter is never above the
  increments invoked so far.
- at the end: every acknowledged write is on the primary with its value
  (a later write whose outcome is unknown may have replaced it); a counter
  equals its acknowledged increments plus some of the unknown ones, never
  more (nothing applied twice); each replica's contents equal the primary's;
  every read was served by the primary or a configured replica whose
  identity matches, and ``strong`` reads by the primary.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from .history import Fault, Op

__all__ = ["DEFAULT_SLACK", "FinalState", "Violation", "ViolationKind", "check"]

#: Seconds of measurement slack for ``bounded`` and ``eventual`` reads, on
#: top of the lag monitor's ``lag_check_interval`` (which the harness adds).
DEFAULT_SLACK = 0.25

ViolationKind: TypeAlias = Literal[
    "read_your_writes",
    "monotonic",
    "bounded_staleness",
    "strong",
    "phantom_read",
    "lost_write",
    "duplicate_write",
    "replica_divergence",
    "foreign_server",
]
"""What went wrong:

``read_your_writes`` a read missed a write in its causal scope;
``monotonic`` a read went back behind what its scope had read;
``bounded_staleness`` a bounded/eventual read was older than its bound;
``strong`` a strong read missed an acknowledged write or ran on a replica;
``phantom_read`` a read saw a value never written (or only by a failed write);
``lost_write`` an acknowledged write is missing at the end;
``duplicate_write`` a counter has more increments than were attempted;
``replica_divergence`` a replica's contents differ from the primary's at the end;
``foreign_server`` a read was served by a server that is not the primary or
one of its configured replicas.
"""


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken guarantee.

    :ivar kind: see :data:`ViolationKind`.
    :ivar message: what was expected and what was seen.
    :ivar op: the offending operation's id (None for end-state checks).
    :ivar client: the offending operation's client.
    :ivar level: its consistency level.
    :ivar faults: labels of the faults in force during the operation.
    """

    kind: ViolationKind
    message: str
    op: int | None = None
    client: str | None = None
    level: str | None = None
    faults: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = f"op {self.op} ({self.client}, {self.level}): " if self.op is not None else ""
        during = f" [during {', '.join(self.faults)}]" if self.faults else ""
        return f"{self.kind}: {where}{self.message}{during}"


@dataclass(frozen=True)
class FinalState:
    """The contents of each server after the run, faults healed and caught up.

    :ivar primary: key -> version on the primary.
    :ivar primary_counters: counter -> value on the primary.
    :ivar replicas: replica name -> its key -> version.
    :ivar replica_counters: replica name -> its counter -> value.
    :ivar servers: node name -> the identity it reports (None: unknown);
        the servers reads may come from.
    :ivar initial_counters: counter -> value before the run (usually 0).
    """

    primary: Mapping[str, int]
    primary_counters: Mapping[str, int] = field(default_factory=dict)
    replicas: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    replica_counters: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    servers: Mapping[str, str | None] = field(default_factory=dict)
    initial_counters: Mapping[str, int] = field(default_factory=dict)


class _Acks:
    """Acknowledged writes of one key or counter, by acknowledgement time."""

    def __init__(self, ops: Iterable[Op]) -> None:
        acked = sorted((op for op in ops if op.outcome == "ok"), key=lambda op: op.complete)
        self.times = [op.complete for op in acked]
        self.ops = acked
        # Running maximum of the versions written (register keys).
        self.max_version: list[int] = []
        best = 0
        for op in acked:
            best = max(best, op.version or 0)
            self.max_version.append(best)

    def count_before(self, t: float) -> int:
        """How many were acknowledged strictly before ``t``."""
        return bisect.bisect_left(self.times, t)

    def version_before(self, t: float) -> int:
        """The highest version acknowledged strictly before ``t`` (0: none)."""
        n = self.count_before(t)
        return self.max_version[n - 1] if n else 0


@dataclass
class _Floor:
    """What a read must see: everything acknowledged before ``time``, and
    some writes themselves: per key the highest version among them (and its
    op id), per counter the completion times of its increments."""

    time: float = -math.inf
    versions: dict[str, tuple[int, int]] = field(default_factory=dict)
    increments: dict[str, list[float]] = field(default_factory=dict)
    counter_values: dict[str, int] = field(default_factory=dict)

    def add(self, write: Op) -> None:
        """Include ``write`` and, by the prefix property, everything
        acknowledged before it was invoked."""
        self.time = max(self.time, write.invoke)
        if write.kind == "increment":
            bisect.insort(self.increments.setdefault(write.key, []), write.complete)
        elif (write.version or 0) > self.versions.get(write.key, (0, 0))[0]:
            self.versions[write.key] = (write.version or 0, write.id)


class _CausalFloors:
    """The read-your-writes floor of each client (or causal domain), built
    incrementally: reads are judged in invoke order, so each floor only ever
    takes in more writes (those acknowledged before the current read began)."""

    def __init__(self, writes: Iterable[Op], group: Callable[[Op], str]) -> None:
        self._pending: dict[str, list[Op]] = defaultdict(list)
        for write in sorted(writes, key=lambda w: w.complete):
            self._pending[group(write)].append(write)
        self._next: dict[str, int] = defaultdict(int)
        self._floors: dict[str, _Floor] = defaultdict(_Floor)

    def at(self, name: str, invoke: float) -> _Floor:
        """``name``'s floor for a read invoked at ``invoke``."""
        pending, floor = self._pending[name], self._floors[name]
        i = self._next[name]
        while i < len(pending) and pending[i].complete < invoke:
            floor.add(pending[i])
            i += 1
        self._next[name] = i
        return floor


def check(
    ops: Sequence[Op],
    final: FinalState,
    *,
    faults: Sequence[Fault] = (),
    router_max_lag: float = 5.0,
    slack: float = DEFAULT_SLACK,
) -> list[Violation]:
    """Every violation in a run's history and final state.

    :param ops: the completed operations (any order).
    :param final: the servers' contents at the end (see :class:`FinalState`).
    :param faults: injected faults; each violation lists those in force.
    :param router_max_lag: the router's ``max_lag``, the bound of ``eventual`` reads.
    :param slack: seconds added to every staleness bound (see the module doc).
    """
    ops = sorted(ops, key=lambda op: op.id)
    writes_of: dict[str, list[Op]] = defaultdict(list)
    incs_of: dict[str, list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind in ("insert", "update"):
            writes_of[op.key].append(op)
        elif op.kind == "increment":
            incs_of[op.key].append(op)
    acks = {key: _Acks(w) for key, w in writes_of.items()}
    inc_acks = {key: _Acks(w) for key, w in incs_of.items()}
    # The write that produced each version of each key.
    writer: dict[tuple[str, int], Op] = {}
    for key, key_writes in writes_of.items():
        for op in key_writes:
            if op.version is not None:
                writer.setdefault((key, op.version), op)
    # Every acknowledged write, by acknowledgement time: floors by time.
    all_acked = sorted(
        (op for op in ops if op.is_write and op.outcome == "ok"), key=lambda op: op.complete
    )
    inc_invokes = {
        key: sorted(op.invoke for op in w if op.outcome != "fail") for key, w in incs_of.items()
    }

    out: list[Violation] = []

    def violation(kind: ViolationKind, message: str, op: Op | None = None) -> None:
        if op is None:
            out.append(Violation(kind, message))
            return
        active = tuple(f.label for f in faults if f.overlaps(op.invoke, op.complete))
        out.append(Violation(kind, message, op.id, op.client, op.level, active))

    def must_see(floor: _Floor, op: Op) -> tuple[int, str]:
        """The lowest value ``op`` may read under ``floor``, and why."""
        if op.kind == "read":
            table = acks.get(op.key)
            best = table.version_before(floor.time) if table else 0
            why = "acknowledged before the floor"
            version, writer_id = floor.versions.get(op.key, (0, 0))
            if version > best:
                best, why = version, f"written by op {writer_id}"
            return best, why
        count = inc_acks[op.key].count_before(floor.time) if op.key in inc_acks else 0
        why = "increments acknowledged before the floor"
        completes = floor.increments.get(op.key, [])
        own = len(completes) - bisect.bisect_left(completes, floor.time)
        if own:
            count += own
            why += " plus the scope's own"
        seen = floor.counter_values.get(op.key, 0)
        if seen > count:
            count, why = seen, "already read in this scope"
        return final.initial_counters.get(op.key, 0) + count, why

    # Per client (or causal domain): own acknowledged writes; per scope: what
    # monotonic reads have observed.
    by_client = _CausalFloors(all_acked, lambda w: w.client)
    by_domain = _CausalFloors(all_acked, lambda w: w.causal_domain)
    scope_floor: dict[tuple[str, int], _Floor] = defaultdict(_Floor)
    allowed = final.servers

    for op in sorted(ops, key=lambda op: op.invoke):
        if not op.is_read or op.outcome != "ok":
            continue
        # -- every read: served by a known server, and the value was written ------
        if allowed:
            if op.server is None or op.server not in allowed:
                violation("foreign_server", f"served by {op.server!r}, not a known server", op)
            elif (
                allowed[op.server] is not None
                and op.server_identity is not None
                and op.server_identity != allowed[op.server]
            ):
                violation(
                    "foreign_server",
                    f"{op.server} reported identity {op.server_identity!r}, "
                    f"expected {allowed[op.server]!r}",
                    op,
                )
        if op.level == "strong" and op.server not in (None, "primary"):
            violation("strong", f"a strong read was served by {op.server}", op)
        observed: Op | None = None
        if op.kind == "read" and op.value is not None:
            observed = writer.get((op.key, op.value))
            if observed is None:
                violation("phantom_read", f"read {op.key}={op.value}, never written", op)
            elif observed.outcome == "fail":
                violation(
                    "phantom_read",
                    f"read {op.key}={op.value}, written only by failed op {observed.id}",
                    op,
                )
            elif observed.invoke > op.complete:
                violation(
                    "phantom_read",
                    f"read {op.key}={op.value} before op {observed.id} wrote it",
                    op,
                )
        if op.kind == "read_counter" and op.value is not None:
            invokes = inc_invokes.get(op.key, [])
            attempted = final.initial_counters.get(op.key, 0) + bisect.bisect_right(
                invokes, op.complete
            )
            if op.value > attempted:
                violation(
                    "phantom_read",
                    f"read counter {op.key}={op.value}, but only {attempted} increments "
                    "were attempted by then",
                    op,
                )

        # -- the floor of this read's level --------------------------------------
        checks: list[tuple[ViolationKind, _Floor]] = []
        if op.level == "strong":
            checks.append(("strong", _Floor(time=op.invoke)))
        elif op.level in ("bounded", "eventual"):
            bound = op.max_lag if op.level == "bounded" and op.max_lag is not None else None
            bound = router_max_lag if bound is None else bound
            checks.append(("bounded_staleness", _Floor(time=op.invoke - bound - slack)))
        scope = scope_floor[(op.client, op.scope)]
        if op.level in ("read_your_writes", "monotonic"):
            causal = (
                by_domain.at(op.causal_domain, op.invoke)
                if op.scope_kind == "router"
                else by_client.at(op.client, op.invoke)
            )
            checks.append(("read_your_writes", causal))
        if op.level == "monotonic":
            checks.append(("monotonic", scope))
        for kind, floor in checks:
            lowest, why = must_see(floor, op)
            got = 0 if op.value is None else op.value
            if got < lowest:
                what = "counter " if op.kind == "read_counter" else ""
                violation(
                    kind,
                    f"read {what}{op.key}={op.value}, expected >= {lowest} ({why})",
                    op,
                )
        if op.level == "monotonic":
            # Later reads of the scope must see what this one saw.
            if observed is not None:
                scope.add(observed)
            if op.kind == "read_counter" and op.value is not None:
                base = final.initial_counters.get(op.key, 0)
                scope.counter_values[op.key] = max(
                    scope.counter_values.get(op.key, 0), op.value - base
                )

    # -- the end state -------------------------------------------------------------
    for key, key_writes in writes_of.items():
        acked = [w for w in key_writes if w.outcome == "ok"]
        last = max(acked, key=lambda w: w.version or 0) if acked else None
        floor_version = last.version or 0 if last else 0
        possible = {floor_version} if last else {0}
        possible |= {
            w.version or 0
            for w in key_writes
            if w.outcome == "unknown" and (w.version or 0) > floor_version
        }
        got = final.primary.get(key, 0)
        if got not in possible and last is not None and got < floor_version:
            violation(
                "lost_write",
                f"{key}={final.primary.get(key)} on the primary at the end; acknowledged "
                f"op {last.id} wrote {floor_version}",
            )
        elif got not in possible:
            violation(
                "phantom_read",
                f"{key}={got} on the primary at the end; possible: {sorted(possible)}",
            )
        for w in acked:
            if w.kind == "update" and w.rowcount == 0:
                violation("lost_write", f"acknowledged update of {key} changed no row", w)
    for key in final.primary:
        if key not in writes_of:
            violation("phantom_read", f"{key} is on the primary at the end but was never written")
    for key, key_incs in incs_of.items():
        base = final.initial_counters.get(key, 0)
        acked_n = sum(1 for w in key_incs if w.outcome == "ok")
        unknown_n = sum(1 for w in key_incs if w.outcome == "unknown")
        got = final.primary_counters.get(key, base) - base
        if got < acked_n:
            violation(
                "lost_write",
                f"counter {key} is {got} above its start at the end; "
                f"{acked_n} increments were acknowledged",
            )
        elif got > acked_n + unknown_n:
            violation(
                "duplicate_write",
                f"counter {key} is {got} above its start at the end; only {acked_n} "
                f"acknowledged and {unknown_n} unknown increments were attempted",
            )
    for name, contents in final.replicas.items():
        if dict(contents) != dict(final.primary):
            diff = _describe_diff(final.primary, contents)
            violation("replica_divergence", f"{name}'s rows differ from the primary's: {diff}")
    for name, counters in final.replica_counters.items():
        if dict(counters) != dict(final.primary_counters):
            diff = _describe_diff(final.primary_counters, counters)
            violation("replica_divergence", f"{name}'s counters differ from the primary's: {diff}")
    return out


def _describe_diff(primary: Mapping[str, int], replica: Mapping[str, int], limit: int = 5) -> str:
    """The first few keys whose values differ, as ``key: primary/replica``."""
    keys = sorted(set(primary) | set(replica))
    diffs = [
        f"{k}: {primary.get(k)}/{replica.get(k)}" for k in keys if primary.get(k) != replica.get(k)
    ]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more
