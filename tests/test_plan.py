"""The routing plan, pure: which replica, whether to wait, the fallbacks, one deadline.

Positions here are integers compared as PostgreSQL LSNs are (``applied >=
target``); MariaDB's GTID sets go through the same code with their own
``reached``, checked once at the end.
"""

from __future__ import annotations

import operator
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sqlalchemy_replicas.plan import (
    CAUGHT_UP_AFTER_WAIT,
    KNOWN_CAUGHT_UP,
    MIN_WAIT,
    MONOTONIC_OUT,
    MONOTONIC_STAY,
    NO_FREE_CONNECTION,
    NO_REPLICA,
    NOT_CAUGHT_UP,
    NOTHING_TO_WAIT_FOR,
    Plan,
    ReplicaState,
    Step,
    carry_out,
    over_budget,
    plan_read,
)
from sqlalchemy_replicas.positions.mariadb import MariaDBPositions
from sqlalchemy_replicas.stats import Reason

REACHED = operator.ge
BUDGET = 0.5


def state(name: str, **kw: Any) -> ReplicaState:
    return ReplicaState(name, **kw)


replica_states = st.lists(
    st.builds(
        ReplicaState,
        name=st.sampled_from(["r1", "r2", "r3", "r4"]),
        may_serve=st.booleans(),
        reachable=st.booleans(),
        applied=st.none() | st.integers(0, 20),
        lag=st.none() | st.floats(0, 3, allow_nan=False),
        lag_exact=st.booleans(),
        wait_failed=st.sampled_from([None, "timed_out", "stopped"]),
        lacking_for=st.none() | st.floats(0, 3, allow_nan=False),
    ),
    max_size=4,
    unique_by=lambda r: r.name,
)
levels = st.sampled_from(["read_your_writes", "monotonic"])
positions = st.none() | st.integers(0, 20)
budgets = st.sampled_from([0.0, 0.0005, 0.1, 0.5, 2.0])


def causal_plan(
    replicas: list[ReplicaState],
    position: int | None,
    budget: float,
    level: str = "read_your_writes",
    stay: str | None = None,
) -> Plan:
    return plan_read(
        level,  # type: ignore[arg-type]
        replicas,
        reached=REACHED,
        position=position,
        budget=budget,
        stay=stay,
    )


# -- properties ---------------------------------------------------------------


@given(replica_states, positions, budgets, levels, st.none() | st.sampled_from(["r1", "r2"]))
def test_never_a_replica_without_proof(
    replicas: list[ReplicaState], position: int | None, budget: float, level: str, stay: str | None
) -> None:
    """At read_your_writes and monotonic, a step serves at once only on a replica
    known to have applied the scope's position, and any other step waits for that
    very position first; only replicas the monitor lets serve appear at all."""
    plan = causal_plan(replicas, position, budget, level, stay)
    by_name = {r.name: r for r in replicas}
    for step in plan.steps:
        replica = by_name[step.replica]
        assert replica.may_serve
        if position is None:
            assert step.wait_for is None
        elif step.wait_for is None:
            assert replica.applied is not None
            assert replica.applied >= position
        else:
            assert step.wait_for == position


@given(
    replica_states,
    positions,
    budgets,
    levels,
    st.lists(st.tuples(st.booleans(), st.floats(0, 1)), min_size=8, max_size=8),
)
def test_the_deadline_is_never_exceeded(
    replicas: list[ReplicaState],
    position: int | None,
    budget: float,
    level: str,
    outcomes: list[tuple[bool, float]],
) -> None:
    """However each wait ends (reached, refused at once, timed out: any share of
    the timeout it was given), the waits of one read together never take longer
    than its budget, and a step is tried at most once."""
    plan = causal_plan(replicas, position, budget, level)
    now = [100.0]
    tried: list[Step] = []

    def take(step: Step, timeout: float) -> bool:
        tried.append(step)
        served, share = outcomes[len(tried) - 1]
        if step.wait_for is None:
            assert timeout == 0.0
            return served
        assert MIN_WAIT <= timeout <= budget
        now[0] += timeout * share
        return served and share < 1

    carry_out(plan, 100.0 + budget, lambda: now[0], take)
    assert now[0] - 100.0 <= budget
    assert len(tried) == len(set(tried))


@given(replica_states, st.integers(0, 20), budgets)
def test_a_replica_known_caught_up_is_always_preferred_to_a_wait(
    replicas: list[ReplicaState], position: int, budget: float
) -> None:
    """When a replica that may serve is known to have applied the position, the
    plan's first step is such a replica, and every known replica comes before
    every wait."""
    plan = causal_plan(replicas, position, budget)
    known = [r for r in replicas if r.may_serve and r.applied is not None and r.applied >= position]
    if known:
        assert plan.steps[0].wait_for is None
        assert plan.steps[0].reason == KNOWN_CAUGHT_UP
    kinds = [step.wait_for is None for step in plan.steps]
    assert kinds == sorted(kinds, reverse=True)


@given(replica_states, positions, budgets, levels, st.none() | st.sampled_from(["r1", "r2"]))
def test_the_plan_is_a_function_of_its_inputs(
    replicas: list[ReplicaState], position: int | None, budget: float, level: str, stay: str | None
) -> None:
    """Same snapshot, same plan: no clock, no randomness, no hidden state."""
    first = causal_plan(replicas, position, budget, level, stay)
    assert causal_plan(list(replicas), position, budget, level, stay) == first


@given(replica_states, st.integers(0, 20), budgets)
def test_no_futile_waits(replicas: list[ReplicaState], position: int, budget: float) -> None:
    """No wait with no budget, none on a suspect replica (its last wait timed out,
    no progress since), and none at all when every other candidate is known to
    have lacked a commit for longer than the budget; otherwise the others are
    waited on first, then those that were paused, then those known over it. When that
    rules out every candidate and none is known caught up, the plan is the primary
    at once."""
    plan = causal_plan(replicas, position, budget)
    by_name = {r.name: r for r in replicas}
    waited = [by_name[step.replica] for step in plan.steps if step.wait_for is not None]
    assert all(budget > 0 and r.wait_failed != "timed_out" for r in waited)
    if waited:
        assert any(not over_budget(r, budget) for r in waited)
    groups = [_group(r, budget) for r in waited]
    assert groups == sorted(groups)
    if not plan.steps:
        assert plan.fallback in (NOT_CAUGHT_UP, NO_REPLICA)


def _group(replica: ReplicaState, budget: float) -> int:
    """0: not known over the budget; 1: paused; 2: known over it."""
    if replica.wait_failed == "stopped":
        return 1
    return 2 if over_budget(replica, budget) else 0


@given(replica_states, st.integers(0, 20), budgets)
def test_the_order_of_preference_is_kept(
    replicas: list[ReplicaState], position: int, budget: float
) -> None:
    """Among replicas known caught up, and among those waited on, the read's
    order of preference (sticky or round robin) is kept: a sticky key's reads
    do not flock to whichever replica was waited on last when its own is known
    caught up too (and within each group of waits)."""
    plan = causal_plan(replicas, position, budget)
    order = [r.name for r in replicas]
    by_name = {r.name: r for r in replicas}
    groups: dict[int, list[str]] = {}
    for step in plan.steps:
        group = -1 if step.wait_for is None else _group(by_name[step.replica], budget)
        groups.setdefault(group, []).append(step.replica)
    for names in groups.values():
        assert names == [n for n in order if n in names]


# -- examples -----------------------------------------------------------------


def test_no_commit_any_replica_that_may_serve() -> None:
    """Without a commit in the scope, the replicas that may serve, in order, with
    no wait; the primary only when all of them are passed over for a full pool."""
    plan = causal_plan([state("r1", may_serve=False), state("r2"), state("r3")], None, BUDGET)
    assert plan.steps == (
        Step("r2", None, NOTHING_TO_WAIT_FOR),
        Step("r3", None, NOTHING_TO_WAIT_FOR),
    )
    assert plan.fallback == NO_FREE_CONNECTION


def test_no_replica_may_serve() -> None:
    """Every replica down, lagging or unverified: the primary, at once."""
    plan = causal_plan([state("r1", may_serve=False)], 5, BUDGET)
    assert plan == Plan((), NO_REPLICA)
    assert causal_plan([], 5, BUDGET) == Plan((), NO_REPLICA)


def test_known_first_then_waits_in_order_within_one_budget() -> None:
    """A replica known caught up serves at once; failing that (its pool full),
    waits on the others, in order, sharing the read's one budget."""
    plan = causal_plan([state("r1", applied=3), state("r2", applied=9), state("r3")], 5, BUDGET)
    assert plan.steps == (
        Step("r2", None, KNOWN_CAUGHT_UP),
        Step("r1", 5, CAUGHT_UP_AFTER_WAIT),
        Step("r3", 5, CAUGHT_UP_AFTER_WAIT),
    )
    assert (plan.fallback, plan.budget) == (NOT_CAUGHT_UP, BUDGET)


def test_a_refused_wait_leaves_the_budget_to_the_next_replica() -> None:
    """The first replica refuses its wait at once (replay paused): the second
    gets the whole rest of the budget, and serves."""
    plan = causal_plan([state("r1"), state("r2")], 5, BUDGET)
    now = [0.0]
    given_timeouts: list[float] = []

    def take(step: Step, timeout: float) -> bool:
        given_timeouts.append(timeout)
        now[0] += 0.001
        return step.replica == "r2"

    assert carry_out(plan, BUDGET, lambda: now[0], take) == plan.steps[1]
    assert given_timeouts == [BUDGET, BUDGET - 0.001]


def test_a_timed_out_wait_spends_the_budget() -> None:
    """A wait that times out uses the budget up: the next replica is not waited
    on (the read would take twice wait_timeout), the primary serves."""
    plan = causal_plan([state("r1"), state("r2")], 5, BUDGET)
    now = [0.0]
    tried: list[str] = []

    def take(step: Step, timeout: float) -> bool:
        tried.append(step.replica)
        now[0] += timeout
        return False

    assert carry_out(plan, BUDGET, lambda: now[0], take) is None
    assert tried == ["r1"]


def test_no_deadline_means_no_wait() -> None:
    """Without a deadline (get_bind may not wait) only known replicas are taken."""
    plan = causal_plan([state("r1"), state("r2", applied=7)], 5, BUDGET)
    tried: list[str] = []

    def take(step: Step, timeout: float) -> bool:
        tried.append(step.replica)
        return False

    assert carry_out(plan, None, lambda: 0.0, take) is None
    assert tried == ["r2"]


def test_lag_over_the_budget_goes_to_the_primary_at_once() -> None:
    """Both replicas known to have lacked a commit for over 1 s, a 0.5 s budget: a
    fresh commit cannot be applied in time, so no wait at all; one known to have
    the position still serves."""
    lagging = [state("r1", lag=1.1, lacking_for=1.05), state("r2", lag=1.2, lacking_for=1.1)]
    assert causal_plan(lagging, 5, BUDGET) == Plan((), NOT_CAUGHT_UP, BUDGET)
    caught_up = [state("r1", lacking_for=1.0, applied=5), state("r2", lacking_for=0.2)]
    assert causal_plan(caught_up, 5, BUDGET).steps == (
        Step("r1", None, KNOWN_CAUGHT_UP),
        Step("r2", 5, CAUGHT_UP_AFTER_WAIT),
    )
    # One within the budget: the one over it is still tried, after it.
    mixed = [state("r1", lacking_for=1.1), state("r2", lacking_for=0.1)]
    assert [s.replica for s in causal_plan(mixed, 5, BUDGET).steps] == ["r2", "r1"]


def test_a_loose_upper_bound_on_the_lag_is_no_reason_to_skip_the_wait() -> None:
    """After a quiet spell, replicas a moment behind are measured as stale as the
    last sample they reached is old (say 3 s), though they lacked nothing for long:
    the read still waits on them, in order of preference."""
    loose = [state("r1", lag=3.0, lacking_for=0.004), state("r2", lag=3.0, lag_exact=True)]
    assert [s.replica for s in causal_plan(loose, 5, BUDGET).steps] == ["r1", "r2"]


def test_a_suspect_replica_is_not_waited_on_but_may_serve_when_known() -> None:
    """Suspect (a wait on it timed out, no progress seen since): no wait on it; once
    known to have the position, it serves like any other."""
    suspect = state("r1", wait_failed="timed_out")
    assert causal_plan([suspect, state("r2")], 5, BUDGET).steps == (
        Step("r2", 5, CAUGHT_UP_AFTER_WAIT),
    )
    assert causal_plan([state("r1", wait_failed="timed_out", applied=6)], 5, BUDGET).steps == (
        Step("r1", None, KNOWN_CAUGHT_UP),
    )


def test_a_paused_replica_is_asked_again_last_whatever_its_lag() -> None:
    """A replica that refused a wait as paused is waited on after the others; its
    lag (how long it was paused) does not rule it out: asking costs a round trip."""
    paused = state("r1", wait_failed="stopped", lag=3.0, lag_exact=True)
    assert causal_plan([paused, state("r2")], 5, BUDGET).steps == (
        Step("r2", 5, CAUGHT_UP_AFTER_WAIT),
        Step("r1", 5, CAUGHT_UP_AFTER_WAIT),
    )


def test_eventual_and_bounded() -> None:
    """eventual: the replicas that may serve, the caller's reason; bounded: those
    reachable with an exact measured lag within the bound, whatever max_lag says."""
    replicas = [
        state("r1", may_serve=False, reachable=True, lag=6.0, lag_exact=True),
        state("r2", lag=0.5, lag_exact=False),
        state("r3", lag=0.2, lag_exact=True),
        state("r4", may_serve=False, reachable=False, lag=0.0, lag_exact=True),
    ]
    declared = Reason("declared_read", "execution option read_only=True")
    eventual = plan_read("eventual", replicas, default_reason=declared)
    assert [s.replica for s in eventual.steps] == ["r2", "r3"]
    assert {s.reason for s in eventual.steps} == {declared}
    assert plan_read("bounded", replicas, bound=1.0).steps[0].replica == "r3"
    assert [s.replica for s in plan_read("bounded", replicas, bound=10.0).steps] == ["r1", "r3"]
    assert plan_read("bounded", replicas, bound=0.1) == Plan((), NO_REPLICA)


def test_monotonic_stays_on_its_replica() -> None:
    """monotonic with a replica: that one, at once when known caught up, else after a
    wait; else (or with no budget) the scope leaves it; when it may not serve, the
    primary, and the scope forgets it. A name this router does not have is no stay."""
    replicas = [state("r1", applied=5), state("r2", applied=2)]
    plan = causal_plan(replicas, 5, BUDGET, "monotonic", stay="r2")
    assert plan.steps == (Step("r2", 5, MONOTONIC_STAY),)
    assert plan.stay
    assert not plan.forget_stay
    assert causal_plan(replicas, 5, BUDGET, "monotonic", stay="r1").steps == (
        Step("r1", None, MONOTONIC_STAY),
    )
    assert causal_plan(replicas, None, BUDGET, "monotonic", stay="r2").steps == (
        Step("r2", None, MONOTONIC_STAY),
    )
    leave = causal_plan(replicas, 5, 0.0, "monotonic", stay="r2")
    assert leave.steps == ()
    assert leave.stay
    out = causal_plan([state("r1", may_serve=False)], 5, BUDGET, "monotonic", stay="r1")
    assert out == Plan((), MONOTONIC_OUT, forget_stay=True)
    gone = causal_plan(replicas, 5, BUDGET, "monotonic", stay="r9")
    assert gone == causal_plan(replicas, 5, BUDGET)


def test_mariadb_positions() -> None:
    """GTID sets compare per domain: a replica missing a domain is not caught up."""
    backend = MariaDBPositions()
    target = {0: 10, 1: 3}
    replicas = [state("r1", applied={0: 12}), state("r2", applied={0: 10, 1: 4})]
    plan = plan_read(
        "read_your_writes", replicas, reached=backend.reached, position=target, budget=BUDGET
    )
    assert plan.steps == (
        Step("r2", None, KNOWN_CAUGHT_UP),
        Step("r1", target, CAUGHT_UP_AFTER_WAIT),
    )
