"""Cookie and header formatting for the causal token middlewares.

Pure functions, no I/O and no framework: what differs between WSGI and ASGI
(environ keys, byte headers) stays in their modules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any, Final

from ..exc import ConfigurationError

__all__ = [
    "DEFAULT_COOKIE_NAME",
    "DEFAULT_HEADER_NAME",
    "check_cookie_name",
    "check_header_name",
    "cookie_max_age",
    "cookie_value",
    "set_cookie_header",
]

DEFAULT_COOKIE_NAME: Final = "db_causal"
DEFAULT_HEADER_NAME: Final = "X-DB-Causal"

# RFC 9110 token characters: what a header or cookie name may contain.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# What a cookie attribute value (path, domain) may contain without breaking
# the Set-Cookie line: no controls, no semicolons.
_ATTRIBUTE: Final = re.compile(r"[\x21-\x3a\x3c-\x7e]+")


def check_header_name(name: object, *, argument: str) -> str:
    """``name`` if it is a valid HTTP header name, else ConfigurationError."""
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise ConfigurationError(f"{argument}={name!r} is not a valid HTTP header name")
    return name


def check_cookie_name(name: object, *, argument: str) -> str:
    """``name`` if it is a valid cookie name, else ConfigurationError."""
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise ConfigurationError(f"{argument}={name!r} is not a valid cookie name")
    return name


def check_attribute(value: object, *, argument: str) -> str:
    """``value`` if it can be a Set-Cookie attribute value (Path, Domain)."""
    if not isinstance(value, str) or not _ATTRIBUTE.fullmatch(value):
        raise ConfigurationError(f"{argument}={value!r} is not a valid cookie attribute value")
    return value


def cookie_value(cookie_header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` request header, or None.

    Untrusted input: never raises, whatever the header holds. The first
    cookie of that name wins (browsers send the most specific path first).
    """
    if not cookie_header:
        return None
    for part in cookie_header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value
    return None


def cookie_max_age(routers: Iterable[Any]) -> int:
    """Seconds the token cookie lives: the shortest ``token_max_age`` of the
    routers (a token older than that is rejected anyway), whole seconds."""
    ages = [float(router.token_max_age) for router in routers]
    # 86400: ReplicaRouter's default token_max_age, for a middleware not told its routers.
    return max(1, math.floor(min(ages))) if ages else 86400


def set_cookie_header(
    name: str,
    value: str,
    *,
    max_age: int,
    secure: bool,
    path: str = "/",
    domain: str | None = None,
) -> str:
    """The ``Set-Cookie`` header value for the token cookie: HttpOnly (no
    script needs it), SameSite=Lax (sent on top-level navigations, such as
    the redirect after a POST)."""
    parts = [f"{name}={value}", f"Max-Age={max_age}", f"Path={path}"]
    if domain is not None:
        parts.append(f"Domain={domain}")
    if secure:
        parts.append("Secure")
    parts += ["HttpOnly", "SameSite=Lax"]
    return "; ".join(parts)
