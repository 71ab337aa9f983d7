"""Causal scopes: the commits whose effects reads must see.

A session has its own scope (its commits). ``causal_context()`` opens a
scope shared by every session in the block (and by Core commits through a
router's primary engine), seeded from a token that an earlier request
returned, and yields an object whose ``token`` carries the scope onward.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

from . import token as tokens
from ._asyncio import in_async_greenlet
from .exc import ConfigurationError

if TYPE_CHECKING:
    from .positions import PositionBackend

__all__ = [
    "CausalContext",
    "CausalScope",
    "causal_context",
    "current_scope",
    "enter_causal_context",
    "rejected_tokens",
]

logger = logging.getLogger("sqlalchemy_replicas.causal")


class ScopeOwner(Protocol):
    """What a causal scope asks of the database whose commits it holds: a
    router's shared state (:class:`~sqlalchemy_replicas.cluster.Cluster`),
    named here so that this module does not import it."""

    @property
    def name(self) -> str:
        """The router's name: it keys the scope's positions and token entries."""

    @property
    def is_async(self) -> bool:
        """Whether its engines are async (then it asks the primary only from
        its event loop's greenlet)."""

    @property
    def secret(self) -> str | bytes | None:
        """The key that signs its token entries."""

    @property
    def positions(self) -> PositionBackend | None:
        """Its replication-position backend."""

    @property
    def known_lineage(self) -> str | None:
        """The primary's history, if read already."""

    def current_position(self) -> Any | None:
        """The primary's current position (one query)."""

    def accept_token_entry(self, entry: tokens.TokenEntry) -> Any:
        """Verify its token entry; the position it carries."""


class CausalScope:
    """Positions of the commits made in one scope, per router name.

    Thread-safe: sessions in several threads may share a scope.
    """

    def __init__(self, incoming: dict[str, tokens.TokenEntry] | None = None) -> None:
        self._lock = threading.Lock()
        # router name -> (the router that recorded it, position)
        self._positions: dict[str, tuple[ScopeOwner, Any]] = {}
        # Routers with a commit whose position could not be read (or a token
        # position that cannot be compared): until the primary's current
        # position stands in for it, their reads go to the primary.
        self._unknown: dict[str, ScopeOwner] = {}
        # Token entries not yet verified by their router (each verifies its own).
        self._incoming = dict(incoming or {})
        self._issued_at: dict[str, float] = {}
        # router name -> the replica this scope's monotonic reads stay on.
        self._monotonic_replica: dict[str, str] = {}
        # Commits recorded here (positions known or not), so that a web
        # middleware can tell whether the token changed without building it.
        self._commits = 0

    @property
    def commits(self) -> int:
        """How many commits were recorded in this scope (absorbed token entries
        do not count)."""
        return self._commits

    def add(self, router: ScopeOwner, position: Any) -> None:
        """Record a commit's position."""
        self._absorb_incoming(router)
        with self._lock:
            self._merge(router, position)
            self._issued_at.pop(router.name, None)
            self._commits += 1

    def monotonic_replica(self, router: ScopeOwner) -> str | None:
        """The replica this scope's monotonic reads on ``router`` stay on, if any."""
        return self._monotonic_replica.get(router.name)

    def stay_on(self, router: ScopeOwner, replica: str | None) -> None:
        """Make ``replica`` (None: none) the one monotonic reads stay on."""
        with self._lock:
            if replica is None:
                self._monotonic_replica.pop(router.name, None)
            else:
                self._monotonic_replica[router.name] = replica

    def mark_unknown(self, router: ScopeOwner) -> None:
        """A commit happened whose position is unknown: send reads to the
        primary until :meth:`target` can read the primary's current position
        (which includes that commit) instead."""
        with self._lock:
            self._unknown[router.name] = router
            self._commits += 1

    def target(self, router: ScopeOwner) -> tuple[Any | None, bool]:
        """The position ``router``'s replicas must have applied, and whether
        reads must go to the primary regardless (an unknown position that the
        primary's current position could not replace: it is unreachable)."""
        if self._incoming:
            self._absorb_incoming(router)
        name = router.name
        if not self._unknown:
            # The common case, without the lock: a commit recorded before this
            # read began is in _positions already (a position that replaces an
            # unknown one is merged before the unknown mark goes).
            known = self._positions.get(name)
            return (None if known is None else known[1]), False
        if name in self._unknown:
            self._resolve_unknown(router)
        with self._lock:
            known = self._positions.get(name)
            return (None if known is None else known[1]), name in self._unknown

    def _resolve_unknown(self, router: ScopeOwner) -> None:
        """Replace an unknown position by the primary's current one: a later
        position than the lost one, so a replica that has applied it has
        applied the lost commit too (and every later read is as fresh).

        An async router can only ask from its event loop's greenlet (inside
        its sessions): asked elsewhere (``ctx.token`` in a coroutine), the
        position stays unknown and travels so in the token."""
        if router.is_async and not in_async_greenlet():
            return
        try:
            position = router.current_position()
        except Exception as error:  # the primary is unreachable: keep reading from it
            logger.debug("an unknown position of %s stays unknown: %s", router.name, error)
            return
        with self._lock:
            if position is not None:
                self._merge(router, position)
            self._unknown.pop(router.name, None)

    def entries(self) -> dict[str, tokens.TokenEntry]:
        """Signed token entries: fresh ones for the routers that recorded
        positions here (an unknown position that cannot be resolved yet
        travels as :data:`~sqlalchemy_replicas.token.UNKNOWN_POSITION`, so
        the next request resolves it or reads from the primary), and incoming
        entries of routers this process never used, unchanged."""
        for router in list(self._unknown.values()):
            self._resolve_unknown(router)
        now = time.time()
        with self._lock:
            result = dict(self._incoming)
            routers = {name: router for name, (router, _) in self._positions.items()}
            routers.update(self._unknown)
            for name, router in routers.items():
                secret = router.secret
                if secret is None:
                    raise ConfigurationError(
                        f"router {name!r} has no secret, so its causal token cannot be "
                        "signed; pass ReplicaRouter(..., secret=...), the same on every "
                        "app server"
                    )
                backend = router.positions
                assert backend is not None
                lineage = router.known_lineage
                if lineage is None:  # never read, and the primary is unreachable now
                    logger.warning(
                        "the causal token leaves out %s: its primary's history is unknown", name
                    )
                    continue
                text = (
                    tokens.UNKNOWN_POSITION
                    if name in self._unknown
                    else backend.format(self._positions[name][1])
                )
                result[name] = tokens.sign(
                    secret, name, backend.kind, lineage, text, self._issued_at.get(name, now)
                )
            return result

    def _absorb_incoming(self, router: ScopeOwner) -> None:
        """Verify and absorb ``router``'s token entry, once. Verification may
        read the primary's lineage, so it runs without the lock held."""
        if not self._incoming:  # the common case: no token, or already absorbed
            return
        with self._lock:
            entry = self._incoming.pop(router.name, None)
        if entry is None:
            return
        try:
            position = router.accept_token_entry(entry)
        except tokens.TokenError as error:
            reject(error, router.name)
            if error.reason == "other_lineage":
                # Genuine, but its position cannot be compared with ours.
                with self._lock:
                    self._unknown[router.name] = router
            return
        except Exception as error:  # the primary's lineage could not be read
            logger.warning("could not check a causal token for %s: %s", router.name, error)
            with self._lock:
                self._unknown[router.name] = router
            return
        with self._lock:
            if position is None:  # the earlier request lost a commit's position
                self._unknown[router.name] = router
            else:
                self._merge(router, position)
            self._issued_at[router.name] = entry.issued_at

    def _merge(self, router: ScopeOwner, position: Any) -> None:
        """Merge ``position`` into the router's (lock held)."""
        backend = router.positions
        assert backend is not None
        known = self._positions.get(router.name)
        merged = position if known is None else backend.merge(known[1], position)
        self._positions[router.name] = (router, merged)

    def copy(self) -> CausalScope:
        """A new scope holding what this one holds now: positions, unknown
        positions, token entries not yet verified and their issue times.
        Later commits in either scope do not reach the other."""
        with self._lock:
            twin = CausalScope(self._incoming)
            twin._positions = dict(self._positions)
            twin._unknown = dict(self._unknown)
            twin._issued_at = dict(self._issued_at)
            twin._monotonic_replica = dict(self._monotonic_replica)
        return twin

    def include(self, other: CausalScope) -> None:
        """Add ``other``'s commits to this scope, as if they were made here.

        ``other`` must hold no unverified token entries (a router's own
        scope, ``Cluster.process_scope``, never does): an entry can only be
        merged once its router has verified it.

        :raises ValueError: when ``other`` holds unverified token entries.
        """
        with other._lock:
            if other._incoming:
                raise ValueError("a scope with unverified token entries cannot be included")
            positions = list(other._positions.values())
            unknown = list(other._unknown.values())
        for router, position in positions:
            self.add(router, position)
        for router in unknown:
            self._absorb_incoming(router)
            self.mark_unknown(router)


_scope: ContextVar[CausalScope | None] = ContextVar("sqlalchemy_replicas.causal", default=None)

#: Tokens (or token entries) ignored so far, by reason: ``malformed``,
#: ``oversized``, ``bad_signature``, ``expired``, ``from_the_future``,
#: ``no_secret``, ``wrong_database``, ``other_lineage`` (genuine, but from
#: another primary history: the scope's reads then go to the primary).
rejected_tokens: Counter[str] = Counter()
_rejected_lock = threading.Lock()


def reject(error: tokens.TokenError, router_name: str | None = None) -> None:
    """Count and log an ignored token; untrusted input never raises into a request."""
    with _rejected_lock:
        rejected_tokens[error.reason] += 1
    where = f" for router {router_name!r}" if router_name else ""
    logger.warning("ignored a causal token%s: %s", where, error)


def current_scope() -> CausalScope | None:
    """The innermost ``causal_context()``'s scope here, or None."""
    return _scope.get()


class CausalContext:
    """What ``causal_context()`` yields: the scope, and its token."""

    def __init__(self, scope: CausalScope) -> None:
        self.scope = scope

    @property
    def changed(self) -> bool:
        """Whether a commit was made in the block so far: only then can
        :attr:`token` differ from the token the block was given (a web
        middleware sets the cookie only then)."""
        return self.scope.commits > 0

    @property
    def token(self) -> str | None:
        """The scope's positions as an opaque, URL-safe, signed string, or
        None when the scope holds none. Set it as a cookie or header and pass
        it to ``causal_context(token=...)`` in the next request.

        :raises ConfigurationError: when a router with positions in the scope
            has no ``secret``.
        """
        entries = self.scope.entries()
        return tokens.encode(entries) if entries else None


@contextmanager
def causal_context(token: str | None = None) -> Iterator[CausalContext]:
    """Share one causal scope among all sessions in the block.

    Reads in the block see every commit made in it, and every commit the
    token (from an earlier request, maybe on another app server) carries.
    A missing, malformed, oversized, expired or wrongly signed token is
    ignored: counted in :data:`rejected_tokens`, logged, never raised.

    :param token: ``ctx.token`` of an earlier causal context, or None.
    """
    scope = _scope_from(token)
    reset = _scope.set(scope)
    try:
        yield CausalContext(scope)
    finally:
        _scope.reset(reset)


def enter_causal_context(token: str | None = None) -> CausalContext:
    """Open a causal scope, as :func:`causal_context` does, and make it
    current in the running :class:`contextvars.Context` for good.

    For middlewares that run each request in a context of its own
    (``contextvars.copy_context().run(...)``) and drop it afterwards: nothing
    needs resetting, so nothing can be reset from the wrong context, even
    when a server never closes a response.
    """
    scope = _scope_from(token)
    _scope.set(scope)
    return CausalContext(scope)


def _scope_from(token: str | None) -> CausalScope:
    """A new scope seeded from ``token``; a bad token is rejected, never raised."""
    incoming: dict[str, tokens.TokenEntry] = {}
    # An empty cookie or header is no token, not a bad one.
    if token is not None and not (isinstance(token, str) and not token):
        try:
            incoming = tokens.decode(token)
        except tokens.TokenError as error:
            reject(error)
        except Exception as error:  # decode raises only TokenError; untrusted input never raises
            reject(tokens.TokenError("malformed", f"{type(error).__name__}: {error}"))
    return CausalScope(incoming)


#: Set in a primary connection's info once its commit's position is recorded,
#: so that the pool's check-in does not capture it again.
CAPTURED_KEY = "sqlalchemy_replicas.captured"

#: Set in a primary connection's info when it commits: the pool's check-in
#: reads the position of connections that committed, and only of those.
COMMITTED_KEY = "sqlalchemy_replicas.committed"
