"""Down and back up: the breaker's backoff and what counts as a disconnect (pure)."""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc

from sqlalchemy_replicas.breaker import FIRST_BACKOFF, LONGEST_BACKOFF, Breaker, is_disconnect


def test_probes_back_off_exponentially_from_one_to_thirty_seconds() -> None:
    """Marked down at t=0: probes are due 1, 2, 4, 8, 16 s after each failed
    probe, then every 30 s at most; reads failing meanwhile do not delay them."""
    breaker = Breaker()
    assert breaker.trip(0.0) is True
    due_gaps = []
    now = 0.0
    for _ in range(8):
        assert not breaker.probe_due(breaker.next_probe - 0.01)
        assert breaker.probe_due(breaker.next_probe)
        due_gaps.append(breaker.next_probe - now)
        now = breaker.next_probe
        assert breaker.trip(now + 0.5) is False  # a late read failing changes nothing
        assert breaker.probe_due(now)
        assert breaker.check_failed(now) is False  # the probe failed: still down
    assert due_gaps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert (FIRST_BACKOFF, LONGEST_BACKOFF) == (1.0, 30.0)


def test_a_successful_probe_readmits_and_resets_the_backoff() -> None:
    """After a probe gets through, the replica is up, every check is due, and a
    new failure starts again at 1 s."""
    breaker = Breaker()
    assert breaker.check_failed(0.0) is True  # a failed regular check marks it down
    breaker.check_failed(1.0)
    breaker.check_failed(3.0)
    assert breaker.down_since == 0.0
    assert breaker.succeed() is True
    assert not breaker.down
    assert breaker.probe_due(3.1)
    assert breaker.succeed() is False  # already up
    breaker.trip(100.0)
    assert (breaker.next_probe, breaker.down_since) == (101.0, 100.0)


def _error(cls: type[sa_exc.DBAPIError], statement: str | None, invalidated: bool) -> Exception:
    return cls(statement, None, Exception("driver says no"), connection_invalidated=invalidated)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_error(sa_exc.OperationalError, "SELECT 1", True), True),  # lost mid-statement
        (_error(sa_exc.OperationalError, None, False), True),  # connect() refused
        (_error(sa_exc.InterfaceError, None, False), True),
        (_error(sa_exc.ProgrammingError, "SELEC 1", False), False),  # syntax
        (_error(sa_exc.IntegrityError, "INSERT ...", False), False),  # constraint
        (_error(sa_exc.OperationalError, "SELECT 1", False), False),  # lock timeout
        (ValueError("not a database error"), False),
    ],
    ids=["lost", "refused", "interface", "syntax", "constraint", "lock-timeout", "other"],
)
def test_only_a_lost_or_refused_connection_counts_as_a_disconnect(
    error: Exception, expected: bool
) -> None:
    """Statement errors never mark a replica down; a lost or refused connection does."""
    assert is_disconnect(error) is expected
