"""Signed causal tokens: a causal scope's positions, carried across requests.

A token is opaque and URL-safe: base64url (no padding) of a compact JSON
object ``{"v": 1, "e": {router_name: [kind, lineage, position, issued_at, signature]}}``.
Each entry is signed on its own with HMAC-SHA256 under its router's secret,
so an app with several databases (routers with different names and
secrets) carries them all in one token, and each router verifies only its
own entry. Pure code, no I/O.

Every byte of a token is untrusted (it comes from a cookie or a header):
:func:`decode` and :func:`verify` raise :class:`TokenError` and nothing else,
whatever the input; the routers parse the position inside the same handling.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_TOKEN_LENGTH",
    "UNKNOWN_POSITION",
    "TokenEntry",
    "TokenError",
    "check_entry",
    "decode",
    "encode",
    "sign",
    "verify",
]

#: Tokens longer than this are rejected unread (they come from cookies and headers).
MAX_TOKEN_LENGTH: Final = 4096
_VERSION: Final = 1
_FUTURE_SKEW: Final = 300.0
#: A position kind: a short ASCII identifier (``pg``, ``mariadb``, ``mysql``).
_KIND: Final = re.compile(r"[a-z][a-z0-9_]{0,31}", re.ASCII)
#: An HMAC-SHA256 digest in base64url without padding.
_SIGNATURE: Final = re.compile(r"[A-Za-z0-9_-]{43}", re.ASCII)
#: Later than any real token (year 5138): issued-at times above it are malformed.
_MAX_ISSUED_AT: Final = 1e11


class TokenError(ValueError):
    """A token or entry that must be ignored; ``reason`` is a short label for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


#: The position text of an entry whose scope lost a commit's position (the
#: primary could not be asked): the next request reads the primary's current
#: position instead, or from the primary.
UNKNOWN_POSITION: Final = "unknown"


@dataclass(frozen=True, slots=True)
class TokenEntry:
    """One router's part of a token: its position (in text form), the primary
    history the position belongs to, and the signature."""

    kind: str
    lineage: str
    position: str
    issued_at: float
    signature: str


def _message(name: str, kind: str, lineage: str, position: str, issued_at: float) -> bytes:
    return json.dumps([_VERSION, name, kind, lineage, position, round(issued_at, 3)]).encode()


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(
    secret: str | bytes, name: str, kind: str, lineage: str, position: str, issued_at: float
) -> TokenEntry:
    """A signed entry for router ``name``."""
    issued_at = round(issued_at, 3)
    message = _message(name, kind, lineage, position, issued_at)
    digest = hmac.new(_key(secret), message, hashlib.sha256)
    signature = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    return TokenEntry(kind, lineage, position, issued_at, signature)


def verify(
    secret: str | bytes, name: str, entry: TokenEntry, *, now: float, max_age: float
) -> None:
    """Check an entry's signature and age.

    :raises TokenError: ``malformed`` (a field of the wrong type or out of
        range), ``bad_signature``, ``expired`` or ``from_the_future``; never
        anything else, whatever the entry holds.
    """
    check_entry(entry)
    expected = sign(
        secret, name, entry.kind, entry.lineage, entry.position, entry.issued_at
    ).signature
    # Both ASCII (check_entry): compare_digest refuses non-ASCII str.
    if not hmac.compare_digest(expected.encode(), entry.signature.encode()):
        raise TokenError("bad_signature")
    if entry.issued_at > now + _FUTURE_SKEW:
        raise TokenError("from_the_future")
    if now - entry.issued_at > max_age:
        raise TokenError("expired")


def encode(entries: dict[str, TokenEntry]) -> str:
    """The token for ``entries`` (router name -> entry)."""
    body = {
        "v": _VERSION,
        "e": {
            name: [e.kind, e.lineage, e.position, e.issued_at, e.signature]
            for name, e in sorted(entries.items())
        },
    }
    raw = json.dumps(body, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode(token: str) -> dict[str, TokenEntry]:
    """Parse a token's entries, unverified.

    :raises TokenError: ``oversized`` or ``malformed``; never anything else,
        whatever the input.
    """
    if not isinstance(token, str):
        raise TokenError("malformed", f"a token is a str, not {type(token).__name__}")
    if len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("oversized", f"{len(token)} characters")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise TokenError("malformed", str(exc)) from None
    if (
        not isinstance(body, dict)
        or type(body.get("v")) is not int
        or body.get("v") != _VERSION
        or not isinstance(body.get("e"), dict)
    ):
        raise TokenError("malformed", "not a version-1 token")
    entries: dict[str, TokenEntry] = {}
    for name, value in body["e"].items():
        entries[name] = _entry(name, value)
    return entries


def _entry(name: str, value: object) -> TokenEntry:
    """One decoded entry, checked field by field (see :func:`check_entry`)."""
    if not (isinstance(value, list) and len(value) == 5):
        raise TokenError("malformed", f"the entry for {name!r} is not a 5-item list")
    kind, lineage, position, issued_at, signature = value
    if isinstance(issued_at, bool) or not isinstance(issued_at, (int, float)):
        raise TokenError("malformed", f"the entry for {name!r} has a non-numeric issued-at")
    try:
        issued = float(issued_at)  # an int beyond a float's range overflows
    except OverflowError:
        raise TokenError(
            "malformed", f"the entry for {name!r} has an issued-at out of range"
        ) from None
    entry = TokenEntry(kind, lineage, position, issued, signature)
    check_entry(entry, name)
    return entry


def check_entry(entry: TokenEntry, name: str | None = None) -> None:
    """Check the types and ranges of an entry's fields (not its signature).

    :raises TokenError: ``malformed``, naming the field.
    """
    for_ = f" for {name!r}" if name is not None else ""
    if not (isinstance(entry.kind, str) and _KIND.fullmatch(entry.kind)):
        raise TokenError("malformed", f"the kind{for_} is not a position kind")
    if not (isinstance(entry.lineage, str) and isinstance(entry.position, str)):
        raise TokenError("malformed", f"the lineage and position{for_} must be strings")
    if not (isinstance(entry.signature, str) and _SIGNATURE.fullmatch(entry.signature)):
        raise TokenError("malformed", f"the signature{for_} is not a base64url HMAC-SHA256")
    issued_at = entry.issued_at
    # A chained comparison: False for NaN and infinities, no float conversion
    # (which overflows) for huge ints.
    if (
        isinstance(issued_at, bool)
        or not isinstance(issued_at, (int, float))
        or not 0 <= issued_at <= _MAX_ISSUED_AT
    ):
        raise TokenError("malformed", f"the issued-at{for_} is not a time")
