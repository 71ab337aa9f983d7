"""Down and back up: when a failed replica may be tried again (pure, no I/O).

A replica is marked down at its first disconnect-class error. It gets no
reads until a probe (one lag check) succeeds. Probes are spaced by an
exponential backoff, so a replica that stays dead costs one failed connect
per backoff period, not one per request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sqlalchemy import exc as sa_exc

__all__ = ["FIRST_BACKOFF", "LONGEST_BACKOFF", "Breaker", "is_disconnect"]

#: Seconds from marking a replica down to its first probe.
FIRST_BACKOFF: Final = 1.0
#: The backoff doubles after each failed probe, up to this many seconds.
LONGEST_BACKOFF: Final = 30.0


@dataclass
class Breaker:
    """One replica's down/up state. Times are monotonic seconds, given by
    the caller, so that the logic is tested without a clock.

    :ivar down: True from a failure until a probe succeeds.
    :ivar next_probe: when the next probe is due (meaningful while down).
    :ivar backoff: the wait before the probe after the next failure.
    :ivar down_since: when it last went down (None: never).
    """

    down: bool = False
    down_since: float | None = None
    next_probe: float = 0.0
    backoff: float = FIRST_BACKOFF

    def trip(self, now: float) -> bool:
        """A read found the replica gone at ``now``: mark it down, first probe
        :data:`FIRST_BACKOFF` later. While it is down already, nothing changes
        (reads that were under way when it died must not delay the probe).
        Returns True when this marked it down."""
        if self.down:
            return False
        self.down = True
        self.down_since = now
        self.backoff = FIRST_BACKOFF
        self.next_probe = now + self.backoff
        return True

    def check_failed(self, now: float) -> bool:
        """A check (the regular one, or a probe) failed at ``now``: mark down,
        or, while down, double the backoff up to :data:`LONGEST_BACKOFF`.
        Returns True when this marked it down."""
        if self.trip(now):
            return True
        self.backoff = min(self.backoff * 2, LONGEST_BACKOFF)
        self.next_probe = now + self.backoff
        return False

    def probe_due(self, now: float) -> bool:
        """Whether the replica should be checked now: always while up (the
        regular lag check), while down only once its backoff has passed."""
        return not self.down or now >= self.next_probe

    def probe_at_once(self) -> None:
        """Make the next probe due now (a late answer showed the replica
        alive); the backoff is kept for the case the probe fails."""
        self.next_probe = 0.0

    def succeed(self) -> bool:
        """A check got through: the replica is up again. Returns True when it
        was down."""
        was_down = self.down
        self.down = False
        self.backoff = FIRST_BACKOFF
        return was_down


def is_disconnect(error: BaseException) -> bool:
    """True for errors that say the server is gone, not that the statement
    was bad: a connection lost mid-statement (SQLAlchemy invalidated it) or
    one that could not be opened at all. Syntax, constraint, lock-timeout or
    recovery-conflict errors are statement errors and return False."""
    if not isinstance(error, sa_exc.DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    # Raised by connect(): SQLAlchemy has no statement for it.
    return error.statement is None and isinstance(
        error, (sa_exc.OperationalError, sa_exc.InterfaceError)
    )
