"""The plan for one read: which replica, whether to wait, and the fallbacks.

Pure code, no I/O and no sessions: a function of the consistency level, the
causal scope's position, and a snapshot of the replicas (:class:`ReplicaState`,
taken by the router from the lag monitor and the positions it has seen). The
session carries a :class:`Plan` out step by step: a step it cannot take (the
replica's pool is full, its wait is refused, times out or fails) moves it to
the next step; when none is left the primary serves the read, for the plan's
``fallback`` reason. As with urllib3's ``Retry``, the decision is a value;
the loop that runs it holds no policy.

The rules, for ``read_your_writes`` (and ``monotonic`` once the scope leaves
its replica):

1. a replica **known** to have applied the scope's position serves it (no
   round trip), the key's sticky order first;
2. else a **wait** on each replica that may catch up, in order, all of them
   within one budget (``wait_timeout``) for the whole read: a wait refused
   at once (the replica is not applying, or went away) leaves the rest of
   the budget to the next replica;
3. else the **primary**.

A replica is not waited on while it is *suspect* (a wait on it timed out and
it has not been seen since to apply a commit within ``wait_timeout`` of the
primary making it: judged by what it applied, not by a fixed time). When
every other candidate is known to have lacked a commit for longer than the
budget (evidence, from the lag monitor's samples, that it applies commits
later than that; the measured lag, an upper bound, is no such evidence), no
wait is planned: the read goes to the primary at once
instead of waiting the budget out. Otherwise the other replicas are waited
on first, then those that refused a wait as paused (one round trip each
while still paused), then those known to be over the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, NamedTuple, TypeAlias

from .consistency import ConsistencyLevel
from .stats import Reason

__all__ = [
    "CAUGHT_UP_AFTER_WAIT",
    "KNOWN_CAUGHT_UP",
    "MIN_WAIT",
    "MONOTONIC_OUT",
    "MONOTONIC_STAY",
    "NOTHING_TO_WAIT_FOR",
    "NOT_CAUGHT_UP",
    "NO_FREE_CONNECTION",
    "NO_REPLICA",
    "POSITION_UNKNOWN",
    "Plan",
    "ReplicaState",
    "Step",
    "WaitFailure",
    "carry_out",
    "over_budget",
    "plan_read",
]

NO_FREE_CONNECTION: Final = Reason("pool_full", "the replicas that qualify have no free connection")
NO_REPLICA: Final = Reason("no_replica_available", "no replica qualifies (lagging or unreachable)")
POSITION_UNKNOWN: Final = Reason(
    "position_unknown", "a commit in this scope has an unknown position"
)
NOTHING_TO_WAIT_FOR: Final = Reason("nothing_to_wait_for", "no commit to wait for")
KNOWN_CAUGHT_UP: Final = Reason("known_caught_up", "known to have applied this scope's commits")
CAUGHT_UP_AFTER_WAIT: Final = Reason(
    "caught_up_after_wait", "caught up with this scope's commits within wait_timeout"
)
NOT_CAUGHT_UP: Final = Reason("not_caught_up", "no replica has applied this scope's commits")
MONOTONIC_OUT: Final = Reason(
    "monotonic_replica_out", "monotonic: the replica this scope read from is out"
)
MONOTONIC_STAY: Final = Reason(
    "monotonic_same_replica", "monotonic: the replica this scope reads from"
)
_READ: Final = Reason("read", "a replica that may serve")

#: The shortest wait worth a round trip (seconds): what is left of a read's
#: budget after one wait timed out is not spent on the next replica.
MIN_WAIT: Final = 0.001


WaitFailure: TypeAlias = Literal["timed_out", "stopped"]
"""How the last wait on a replica failed, while it has not been seen to
apply commits again since: it timed out, or it was refused at once because
the replica was not applying at all (replay paused, replication stopped)."""


class ReplicaState(NamedTuple):
    """One replica as a plan sees it: a snapshot, taken without I/O.

    :ivar name: the replica's name.
    :ivar may_serve: the lag monitor lets it serve reads (replicates from
        this primary, reachable, within the router's ``max_lag``).
    :ivar reachable: it replicates from this primary and is not marked down,
        whatever its lag (``bounded`` reads judge the lag themselves).
    :ivar applied: a position it is known to have applied (a lower bound),
        or None when none is known.
    :ivar lag: its measured lag in seconds (None: not measured).
    :ivar lag_exact: False while ``lag`` is only a lower bound.
    :ivar wait_failed: how the last wait on it failed, when it has not been
        seen to apply commits again since (None: it has, or no wait failed;
        see ``Cluster.wait_failure``).
        ``"timed_out"``: it is suspect, and a wait on it now would likely
        spend the read's whole budget in vain: none is planned.
        ``"stopped"``: it was paused; asking again costs one round trip (it
        refuses at once while still paused), so it is waited on last.
    :ivar lacking_for: for how long, at least, it had lacked a commit when
        the lag monitor last checked it (a lower bound on its staleness; 0
        when it had everything the monitor had seen; None: not checked).
    """

    name: str
    may_serve: bool = True
    reachable: bool = True
    applied: Any | None = None
    lag: float | None = None
    lag_exact: bool = False
    wait_failed: WaitFailure | None = None
    lacking_for: float | None = None


class Step(NamedTuple):
    """One way to serve the read on a replica.

    :ivar replica: the replica's name.
    :ivar wait_for: the position it must apply first (a wait on the server,
        within what is left of the plan's budget), or None: it serves the
        read at once.
    :ivar reason: why it serves the read when this step is taken.
    """

    replica: str
    wait_for: Any | None
    reason: Reason


class Plan(NamedTuple):
    """Where one read goes: the steps to try in order, then the primary.

    :ivar steps: replica steps, in order of preference; empty when the read
        goes straight to the primary.
    :ivar fallback: why the primary serves the read once no step is left
        (when every step was passed over for a full pool, the session says
        so instead: ``pool_full``).
    :ivar budget: seconds that all of the plan's waits may take together.
    :ivar stay: ``monotonic`` only: the steps are the scope's own replica;
        when none is taken, the scope leaves it, and the session learns what
        it had applied (the floor for the next replica) before planning again.
    :ivar forget_stay: ``monotonic`` only: the scope's replica may not serve
        any more; the scope forgets it.
    """

    steps: tuple[Step, ...]
    fallback: Reason
    budget: float = 0.0
    stay: bool = False
    forget_stay: bool = False

    @property
    def waits(self) -> bool:
        """Whether a step waits (else the plan needs no clock)."""
        return any(step.wait_for is not None for step in self.steps)

    @staticmethod
    def time_left(deadline: float, now: float) -> float:
        """Seconds a wait begun at ``now`` may take; 0 (skip the wait) when
        less than :data:`MIN_WAIT` is left: a wait that short costs its round
        trip and can hardly succeed."""
        left = deadline - now
        return left if left >= MIN_WAIT else 0.0


def plan_read(
    level: ConsistencyLevel,
    replicas: Sequence[ReplicaState],
    *,
    reached: Callable[[Any, Any], bool] | None = None,
    position: Any | None = None,
    budget: float = 0.0,
    bound: float | None = None,
    stay: str | None = None,
    default_reason: Reason = _READ,
) -> Plan:
    """The plan for one read that may go to a replica.

    :param level: the consistency level in force (not ``strong``: those
        reads never get here).
    :param replicas: every replica, in the read's order of preference (the
        sticky key's rendezvous order, or round robin).
    :param reached: the backend's ``reached(applied, target)`` comparison
        (needed when ``position`` is given).
    :param position: the position the read must see (``read_your_writes``,
        ``monotonic``); None when the scope has no commit. (A scope with a
        commit of unknown position needs no plan: only the primary will do,
        :data:`POSITION_UNKNOWN`.)
    :param budget: the read's wait budget in seconds (``wait_timeout``; 0
        when the caller may not wait).
    :param bound: ``bounded``: the lag bound in force.
    :param stay: ``monotonic``: the replica the scope reads from, if any.
    :param default_reason: the reason of an ``eventual`` read on a replica
        (the classifier's, e.g. ``declared_read``).
    """
    if level in ("eventual", "bounded"):
        if bound is not None:
            eligible = [r for r in replicas if _within(r, bound)]
            reason = Reason("within_lag_bound", f"measured lag within {bound}s")
        else:
            eligible = [r for r in replicas if r.may_serve]
            reason = default_reason
        if not eligible:
            return Plan((), NO_REPLICA)
        return Plan(tuple(Step(r.name, None, reason) for r in eligible), NO_FREE_CONNECTION)
    if level == "monotonic" and stay is not None:
        return _stay_plan(replicas, stay, position, reached, budget)
    return _causal_plan(replicas, position, reached, budget)


def _causal_plan(
    replicas: Sequence[ReplicaState],
    position: Any | None,
    reached: Callable[[Any, Any], bool] | None,
    budget: float,
) -> Plan:
    eligible = [r for r in replicas if r.may_serve]
    if not eligible:
        return Plan((), NO_REPLICA)
    if position is None:
        return Plan(
            tuple(Step(r.name, None, NOTHING_TO_WAIT_FOR) for r in eligible), NO_FREE_CONNECTION
        )
    assert reached is not None, "a position needs the backend's comparison"
    steps = []
    others = []
    for replica in eligible:
        if replica.applied is not None and reached(replica.applied, position):
            steps.append(Step(replica.name, None, KNOWN_CAUGHT_UP))
        else:
            others.append(replica)
    if others:
        steps += [Step(r.name, position, CAUGHT_UP_AFTER_WAIT) for r in _wait_order(others, budget)]
    return Plan(tuple(steps), NOT_CAUGHT_UP, budget)


def _stay_plan(
    replicas: Sequence[ReplicaState],
    stay: str,
    position: Any | None,
    reached: Callable[[Any, Any], bool] | None,
    budget: float,
) -> Plan:
    """monotonic, the scope reading from ``stay``: that replica, at once when
    it has (known) applied the scope's position, else after a wait; else the
    scope leaves it (:attr:`Plan.stay`)."""
    replica = next((r for r in replicas if r.name == stay), None)
    if replica is None:  # not a replica of this router (any more): no stay
        return _causal_plan(replicas, position, reached, budget)
    if not replica.may_serve:
        # Left out (down or lagging): another replica may be behind what the
        # scope read there. The primary is not.
        return Plan((), MONOTONIC_OUT, forget_stay=True)
    if position is None or (
        replica.applied is not None and reached is not None and reached(replica.applied, position)
    ):
        return Plan((Step(stay, None, MONOTONIC_STAY),), MONOTONIC_OUT, budget, stay=True)
    if _wait_order([replica], budget):
        return Plan((Step(stay, position, MONOTONIC_STAY),), MONOTONIC_OUT, budget, stay=True)
    return Plan((), MONOTONIC_OUT, budget, stay=True)


def _wait_order(replicas: list[ReplicaState], budget: float) -> list[ReplicaState]:
    """The replicas worth a wait, in the order to wait on them.

    Not one that is suspect (a wait on it timed out and it has not been seen
    to apply a commit in time since: another would spend the budget in
    vain). When every other one is known to be over the budget
    (:func:`over_budget`), none: replicas that apply each commit that late
    cannot apply a fresh one in time, and the read goes to the primary at
    once. Otherwise all of them, in
    order of preference within three groups: not known to be over the
    budget; then those that refused a wait as paused (asking again costs one
    round trip: they refuse at once while still paused); then those known to
    be over it (seen up to a check interval ago, perhaps during a pause since
    ended: not proof enough to skip them when others are tried).
    """
    if budget <= 0:
        return []
    candidates = [r for r in replicas if r.wait_failed != "timed_out"]
    if all(over_budget(r, budget) for r in candidates):
        return []

    def group(replica: ReplicaState) -> int:
        if replica.wait_failed == "stopped":
            return 1
        return 2 if over_budget(replica, budget) else 0

    return sorted(candidates, key=group)  # stable: preference order within a group


def over_budget(replica: ReplicaState, budget: float) -> bool:
    """Whether ``replica`` is known to apply commits later than ``budget``:
    at its last check it had lacked a commit for longer than that
    (:attr:`ReplicaState.lacking_for`, a lower bound). Its measured lag, an
    upper bound, proves nothing of the kind: after a quiet spell a replica a
    millisecond behind is measured as stale as the last sample it reached is
    old, and must not send every read to the primary."""
    return replica.lacking_for is not None and replica.lacking_for > budget


def _within(replica: ReplicaState, bound: float) -> bool:
    return (
        replica.reachable and replica.lag is not None and replica.lag_exact and replica.lag <= bound
    )


def carry_out(
    plan: Plan,
    deadline: float | None,
    clock: Callable[[], float],
    take: Callable[[Step, float], bool],
) -> Step | None:
    """Walk ``plan``: the step that served the read, or None (the primary).

    The loop holds no policy and does no I/O itself: ``take(step, timeout)``
    tries one step (``timeout`` 0 for a step without a wait, else the
    seconds left until ``deadline`` for its wait) and says whether the read
    runs there. A wait step is skipped once less than :data:`MIN_WAIT` is
    left, or when ``deadline`` is None (the caller may not wait): so the
    waits of one read never outlast its deadline, whatever each takes, as
    long as each keeps to the timeout it is given.

    :param clock: ``time.monotonic`` (a fake one in tests).
    """
    for step in plan.steps:
        if step.wait_for is None:
            if take(step, 0.0):
                return step
            continue
        if deadline is None:
            continue
        timeout = Plan.time_left(deadline, clock())
        if timeout > 0 and take(step, timeout):
            return step
    return None
