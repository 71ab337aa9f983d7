"""How a causal token travels over HTTP: its cookie and header, for any server.

Shared by the ASGI and WSGI middleware, so that both read and write the
token the same way. Pure code, no I/O, no framework imports: it takes and
returns header values as ``str``.

:class:`TokenTransport` is a value object that validates its options once,
when it is made; then :meth:`~TokenTransport.incoming` picks the token of a
request (the header wins over the cookie) and
:meth:`~TokenTransport.set_cookie` formats the ``Set-Cookie`` value of a
response.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final, Literal

from ..exc import ConfigurationError

__all__ = [
    "DEFAULT_COOKIE",
    "DEFAULT_HEADER",
    "SameSite",
    "TokenTransport",
    "cookie_value",
]

#: The cookie that carries the token by default.
DEFAULT_COOKIE: Final = "db_causal"
#: The request and response header that carries the token by default.
DEFAULT_HEADER: Final = "X-DB-Causal"

SameSite = Literal["lax", "strict", "none"]

# RFC 7230 "token": header names, and (RFC 6265) cookie names.
_TOKEN_CHARS: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)
# A cookie's Path or Domain attribute must not end the attribute early.
_ATTRIBUTE_CHARS: Final = re.compile(r"[\x21-\x3a\x3c-\x7e]+", re.ASCII)


def cookie_value(cookie_header: str, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` request header, or None.

    Lenient like browsers and unlike :mod:`http.cookies`, which gives up on
    the whole header at the first cookie it cannot parse: another
    application's odd cookie must not hide ours. The first cookie of that
    name wins (the most specific path, as browsers send them); surrounding
    double quotes are removed.

    :param cookie_header: the ``Cookie`` header (several joined with ``"; "``).
    :param name: the cookie's name.
    """
    for part in cookie_header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


@dataclass(frozen=True, slots=True)
class TokenTransport:
    """Where a causal token travels: a cookie and a header, and the
    cookie's attributes.

    :param cookie: the cookie's name.
    :param header: the header's name, for requests and responses (matched
        case-insensitively).
    :param max_age: the cookie's lifetime in seconds (whole seconds are sent);
        give the router's ``token_max_age``: a token older than that is
        ignored anyway.
    :param secure: the cookie's ``Secure`` attribute: ``True``, ``False``, or
        ``None`` to follow each request's scheme (set for ``https``).
    :param samesite: the cookie's ``SameSite`` attribute; ``"none"`` needs
        ``secure=True``.
    :param path: the cookie's ``Path``.
    :param domain: the cookie's ``Domain`` (None: the request's host only).
    :param httponly: the cookie's ``HttpOnly`` attribute: scripts need not
        read the token, so by default they cannot.
    :raises ConfigurationError: for a name or attribute that would make a
        broken header, a bad ``max_age``, or ``samesite="none"`` without
        ``secure=True``.
    """

    cookie: str = DEFAULT_COOKIE
    header: str = DEFAULT_HEADER
    max_age: float = 86400.0
    secure: bool | None = None
    samesite: SameSite = "lax"
    path: str = "/"
    domain: str | None = None
    httponly: bool = True

    def __post_init__(self) -> None:
        for argument, value in (("cookie", self.cookie), ("header", self.header)):
            if not isinstance(value, str) or not _TOKEN_CHARS.fullmatch(value):
                raise ConfigurationError(
                    f"{argument}={value!r} is not a valid {argument} name (letters, digits "
                    "and !#$%&'*+-.^_`|~ only)"
                )
        for argument, attribute in (("path", self.path), ("domain", self.domain)):
            if attribute is not None and not (
                isinstance(attribute, str) and _ATTRIBUTE_CHARS.fullmatch(attribute)
            ):
                raise ConfigurationError(
                    f"{argument}={attribute!r} is not a valid cookie {argument} "
                    "(printable ASCII without ';' or spaces)"
                )
        if (
            isinstance(self.max_age, bool)
            or not isinstance(self.max_age, (int, float))
            or not math.isfinite(self.max_age)
            or self.max_age < 1
        ):
            raise ConfigurationError(
                f"max_age={self.max_age!r} is invalid; give the token's lifetime in "
                "seconds (at least 1), e.g. the router's token_max_age"
            )
        if self.samesite not in ("lax", "strict", "none"):
            raise ConfigurationError(
                f"samesite={self.samesite!r} is invalid; use 'lax', 'strict' or 'none'"
            )
        if self.samesite == "none" and self.secure is not True:
            raise ConfigurationError(
                "samesite='none' needs secure=True: browsers drop such cookies otherwise"
            )

    def incoming(self, header_value: str | None, cookie_header: str | None) -> str | None:
        """The request's token: the header's when it is there and not empty,
        else the cookie's, else None. Not checked here: ``causal_context()``
        ignores a bad one.

        :param header_value: the request's :attr:`header`, if any.
        :param cookie_header: the request's ``Cookie`` header, if any.
        """
        if header_value:
            return header_value.strip()
        if cookie_header:
            return cookie_value(cookie_header, self.cookie) or None
        return None

    def set_cookie(self, token: str, *, https: bool = False) -> str:
        """The ``Set-Cookie`` header value that stores ``token``.

        :param token: ``ctx.token`` (URL-safe, so it needs no quoting).
        :param https: whether the request came over HTTPS (for ``secure=None``).
        """
        parts = [f"{self.cookie}={token}", f"Max-Age={int(self.max_age)}", f"Path={self.path}"]
        if self.domain is not None:
            parts.append(f"Domain={self.domain}")
        if self.secure or (self.secure is None and https):
            parts.append("Secure")
        if self.httponly:
            parts.append("HttpOnly")
        parts.append(f"SameSite={self.samesite.capitalize()}")
        return "; ".join(parts)
