"""Replica connection pools: whether one is full, and checkouts that never wait.

A read whose replica has no free connection should go to the next replica
that qualifies, or to the primary, at once: waiting up to the pool's
``pool_timeout`` for that replica while others have connections to spare
only delays the read, and then fails it with SQLAlchemy's ``TimeoutError``.

Two pieces serve the session's routing. :func:`pool_is_full` is the cheap
pre-check made while choosing a replica; it reads counters that other
threads change, so a checkout may still find the pool full. For that race,
:class:`nowait_checkout` makes the checkouts of one replica pool inside its
block raise :class:`PoolFull` (a ``TimeoutError``) at once instead of
waiting, and the session runs the read elsewhere. Only the pool named is
affected: a primary checkout in the same block (an autoflush) waits as
usual, so no write is ever turned away.

I/O: none. :class:`nowait_checkout` wraps the ``get`` of a ``QueuePool``'s
internal queue once per pool; SQLAlchemy has no per-checkout timeout.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, Final

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.util import queue as sa_queue

__all__ = ["PoolFull", "nowait_checkout", "pool_is_full"]

# The pool whose checkouts may not wait in the current thread or task (a
# ContextVar, not a thread-local: asyncio tasks share a thread).
_NOWAIT_POOL: ContextVar[Pool | None] = ContextVar("sqlalchemy_replicas_nowait_pool", default=None)
# Marks a pool queue whose get() already consults _NOWAIT_POOL.
_WRAPPED: Final = "_sqlalchemy_replicas_nowait"


class PoolFull(sa_exc.TimeoutError):
    """A replica pool had no free connection for a checkout that may not wait.

    Raised only inside :class:`nowait_checkout`, which the session uses
    around replica checkouts and handles by routing the read elsewhere; a
    ``TimeoutError`` so that anything else sees SQLAlchemy's usual error.
    """


def pool_is_full(pool: Pool) -> bool:
    """Whether a checkout from ``pool`` would wait for another's connection.

    True for a ``QueuePool`` (``AsyncAdaptedQueuePool`` included) with no
    idle connection and its ``max_overflow`` used up. Other pools never make
    a checkout wait for a connection to come back: ``NullPool`` opens one per
    checkout, ``StaticPool`` and ``SingletonThreadPool`` share one
    (per process, per thread), and so does a ``QueuePool`` with
    ``pool_size=0`` or ``max_overflow=-1`` (no limit).

    Pure: it reads counters only. Other threads change them, so the answer
    may be stale by the time a checkout is made (see :class:`nowait_checkout`).
    """
    if not isinstance(pool, QueuePool):
        return False
    # Private, but QueuePool keeps no public accessor for it; -1 = no limit
    # (also set for pool_size=0).
    max_overflow: int = pool._max_overflow
    # checkedin() takes the queue's lock: asked last, when all else says full.
    return max_overflow > -1 and pool.overflow() >= max_overflow and pool.checkedin() == 0


class nowait_checkout:  # lower case: used like a function, with nowait_checkout(engine)
    """Within the block, a checkout from ``engine``'s pool that would wait
    for a connection to come back raises :class:`PoolFull` at once.

    A checkout that finds an idle connection, or may open one within
    ``max_overflow``, proceeds as usual; so do checkouts from every other
    pool. Pools other than ``QueuePool`` never wait (see
    :func:`pool_is_full`) and are left as they are.

    :param engine: the replica's sync engine.
    """

    __slots__ = ("_pool", "_token")

    def __init__(self, engine: Engine) -> None:
        self._pool = engine.pool
        self._token: Token[Pool | None] | None = None

    def __enter__(self) -> None:
        pool = self._pool
        if isinstance(pool, QueuePool):
            if _WRAPPED not in pool._pool.__dict__:
                _install(pool)
            self._token = _NOWAIT_POOL.set(pool)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _NOWAIT_POOL.reset(self._token)
            self._token = None


def _install(pool: QueuePool) -> None:
    """Make ``pool``'s queue give up at once, instead of waiting, when
    :data:`_NOWAIT_POOL` names ``pool``.

    QueuePool asks its queue to wait (``get(block=True)``) only when all of
    its connections are checked out and no overflow is left; otherwise it
    takes an idle connection or opens a new one without waiting. Turning
    that one wait into :class:`PoolFull` leaves the rest of SQLAlchemy's
    checkout (overflow accounting, connection creation) untouched.

    Per queue, by :class:`nowait_checkout` when the queue has none yet:
    ``engine.dispose()`` replaces the pool and its queue, and the next
    :class:`nowait_checkout` installs the wrapper on the new one. Two threads
    installing at once wrap it twice, which behaves the same.
    """
    queue: sa_queue.QueueCommon[Any] = pool._pool
    get = queue.get

    def get_or_give_up(block: bool = True, timeout: float | None = None) -> Any:
        if block and _NOWAIT_POOL.get() is pool:
            try:
                return get(False)
            except sa_queue.Empty:
                raise PoolFull(
                    f"no free connection in the pool ({pool.status()}); not waiting for one",
                    code="3o7r",
                ) from None
        return get(block, timeout)

    # An instance attribute shadows the class's method for this queue only.
    queue.__dict__["get"] = get_or_give_up
    queue.__dict__[_WRAPPED] = True
