"""Sticky routing: the same key prefers the same replica.

Rendezvous (highest random weight) hashing: every (key, replica) pair gets a
stable pseudo-random score, and a key prefers the replicas in score order.
When a replica is left out, only the keys that preferred it move (each to
its own next choice); weights give replicas proportional shares. Scores
come from BLAKE2b, not Python's ``hash()``, so every process and every app
server agrees. Pure code, no I/O.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any, TypeAlias

from ._scoped import ScopedSetting
from .exc import ConfigurationError

__all__ = ["StickyKey", "current_sticky_key", "rank", "sticky"]

StickyKey: TypeAlias = "str | int | bytes | uuid.UUID"
"""What identifies a user (or tenant, or session) to stick to a replica."""

_SCALE = float(2**64)


def key_bytes(key: StickyKey) -> bytes:
    """The canonical bytes of a key: ``5`` and ``"5"`` are the same user."""
    if isinstance(key, bytes):
        return key
    return str(key).encode()


def score(key: bytes, replica: str, weight: float = 1.0) -> float:
    """The pair's score; higher wins. Weighted by the logarithmic method:
    ``-weight / ln(u)`` with ``u`` uniform in (0, 1) from the hash."""
    digest = hashlib.blake2b(key + b"\x00" + replica.encode(), digest_size=8).digest()
    uniform = (int.from_bytes(digest, "big") + 0.5) / _SCALE
    return -weight / math.log(uniform)


def rank(key: bytes, replicas: Sequence[str], weights: Sequence[float]) -> list[int]:
    """Indexes of ``replicas`` in the key's order of preference."""
    scores = [score(key, name, weight) for name, weight in zip(replicas, weights, strict=True)]
    return sorted(range(len(replicas)), key=lambda i: scores[i], reverse=True)


class sticky(ScopedSetting[bytes]):  # used like a function: @sticky(user_id)
    """Send the block's (or function's) reads to the replica the key prefers.

    ::

        with sr.sticky(current_user.id):
            ...

    :param key: a str, int, bytes or UUID; ``None`` sets no key (anonymous
        users spread over all replicas).
    :raises ConfigurationError: for another type of key.

    Consistency still rules: when the preferred replica may not serve a read
    (it has not applied the scope's commits in time), the key's next choice
    is tried. Isolated per thread and per asyncio task; nests.
    """

    _stack: ContextVar[tuple[Any, ...]] = ContextVar("sqlalchemy_replicas.sticky", default=())

    def __init__(self, key: StickyKey | None) -> None:
        if key is not None and (
            isinstance(key, bool) or not isinstance(key, (str, int, bytes, uuid.UUID))
        ):
            raise ConfigurationError(
                f"a sticky key is a str, int, bytes or UUID, not {type(key).__name__}"
            )
        super().__init__(b"" if key is None else key_bytes(key))


def current_sticky_key() -> bytes | None:
    """The innermost ``sticky()`` key in force here (None when none, or None given)."""
    key = sticky.current()
    return key or None
