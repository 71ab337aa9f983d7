"""How a causal token travels over HTTP, and what both ``CausalMiddleware`` share.

The ASGI and WSGI middleware are twins: one set of options (same names,
defaults and validation messages), one way to read and write the token,
and one per-request recipe. This module holds all of it; what differs
(byte headers and ``await`` vs environ keys and ``start_response``) stays in
:mod:`.asgi` and :mod:`.wsgi`. No framework imports, no I/O of its own
(:meth:`CausalMiddlewareBase.outgoing_token` reads ``ctx.token``, which may
ask the primary once for a commit whose position was lost).

- :func:`cookie_value` and :class:`TokenTransport` (a value object that
  validates its options once; :meth:`~TokenTransport.incoming` picks the
  request's token, :meth:`~TokenTransport.set_cookie` formats the
  response's ``Set-Cookie``) are pure and take and return ``str``.
- :class:`CausalMiddlewareBase` validates the middleware's options at
  construction and answers, per request, which settings to enter and which
  token to send back.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Generic, Literal, TypeVar

from ..causal import CausalContext
from ..consistency import ConsistencyLevel, default_consistency, validate_level
from ..exc import ConfigurationError
from ..router import ReplicaRouter
from ..sticky import StickyKey, sticky

__all__ = [
    "DEFAULT_COOKIE_NAME",
    "DEFAULT_HEADER_NAME",
    "DEFAULT_MAX_AGE",
    "CausalMiddlewareBase",
    "SameSite",
    "TokenTransport",
    "cookie_max_age",
    "cookie_value",
]

#: The cookie that carries the token by default.
DEFAULT_COOKIE_NAME: Final = "db_causal"
#: The request and response header that carries the token by default.
DEFAULT_HEADER_NAME: Final = "X-DB-Causal"
#: The cookie's lifetime when no router is known: ReplicaRouter's default
#: ``token_max_age`` (one day).
DEFAULT_MAX_AGE: Final = 86400

SameSite = Literal["lax", "strict", "none"]

# RFC 9110 "token": header names, and (RFC 6265) cookie names.
_TOKEN_CHARS: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)
# A cookie's Path or Domain attribute must not end the attribute early.
_ATTRIBUTE_CHARS: Final = re.compile(r"[\x21-\x3a\x3c-\x7e]+", re.ASCII)

_App = TypeVar("_App")
_Source = TypeVar("_Source")


def cookie_value(cookie_header: str | None, name: str) -> str | None:
    """The value of cookie ``name`` in a ``Cookie`` request header, or None.

    Untrusted input: never raises, whatever the header holds. Lenient like
    browsers and unlike :mod:`http.cookies`, which gives up on the whole
    header at the first cookie it cannot parse: another application's odd
    cookie must not hide ours. The first cookie of that name wins (the most
    specific path, as browsers send them); surrounding double quotes are
    removed.

    :param cookie_header: the ``Cookie`` header (several joined with ``"; "``).
    :param name: the cookie's name.
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


def cookie_max_age(routers: Iterable[ReplicaRouter[Any]]) -> int:
    """Seconds the token cookie lives: the shortest ``token_max_age`` of the
    routers (a token older than that is rejected anyway), in whole seconds and
    at least one; :data:`DEFAULT_MAX_AGE` without routers."""
    ages = [float(router.token_max_age) for router in routers]
    return max(1, math.floor(min(ages))) if ages else DEFAULT_MAX_AGE


@dataclass(frozen=True, slots=True)
class TokenTransport:
    """Where a causal token travels: a cookie and a header, and the
    cookie's attributes. Its fields are named as the middleware's options.

    :param cookie_name: the cookie's name.
    :param header_name: the header's name, for requests and responses
        (matched case-insensitively).
    :param max_age: the cookie's lifetime in seconds (whole seconds are sent);
        give the router's ``token_max_age``: a token older than that is
        ignored anyway.
    :param secure: the cookie's ``Secure`` attribute: ``True``, ``False``, or
        ``None`` to follow each request's scheme (set for ``https``).
    :param samesite: the cookie's ``SameSite`` attribute; ``"none"`` needs
        ``secure=True``.
    :param cookie_path: the cookie's ``Path``.
    :param cookie_domain: the cookie's ``Domain`` (None: the request's host only).
    :param httponly: the cookie's ``HttpOnly`` attribute: scripts need not
        read the token, so by default they cannot.
    :raises ConfigurationError: for a name or attribute that would make a
        broken header, a bad ``max_age``, or ``samesite="none"`` without
        ``secure=True``.
    """

    cookie_name: str = DEFAULT_COOKIE_NAME
    header_name: str = DEFAULT_HEADER_NAME
    max_age: float = DEFAULT_MAX_AGE
    secure: bool | None = None
    samesite: SameSite = "lax"
    cookie_path: str = "/"
    cookie_domain: str | None = None
    httponly: bool = True

    def __post_init__(self) -> None:
        for argument, kind, value in (
            ("cookie_name", "cookie", self.cookie_name),
            ("header_name", "HTTP header", self.header_name),
        ):
            if not isinstance(value, str) or not _TOKEN_CHARS.fullmatch(value):
                raise ConfigurationError(
                    f"{argument}={value!r} is not a valid {kind} name (letters, digits "
                    "and !#$%&'*+-.^_`|~ only)"
                )
        for argument, attribute in (
            ("cookie_path", self.cookie_path),
            ("cookie_domain", self.cookie_domain),
        ):
            if attribute is not None and not (
                isinstance(attribute, str) and _ATTRIBUTE_CHARS.fullmatch(attribute)
            ):
                raise ConfigurationError(
                    f"{argument}={attribute!r} is not a valid cookie attribute "
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
        if self.secure is not None and not isinstance(self.secure, bool):
            raise ConfigurationError(
                f"secure={self.secure!r} is invalid; use True, False or None (per "
                "request: set for https)"
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

        :param header_value: the request's :attr:`header_name`, if any.
        :param cookie_header: the request's ``Cookie`` header, if any.
        """
        if header_value:
            return header_value.strip()
        return cookie_value(cookie_header, self.cookie_name) or None

    def set_cookie(self, token: str, *, https: bool = False) -> str:
        """The ``Set-Cookie`` header value that stores ``token``.

        :param token: ``ctx.token`` (URL-safe, so it needs no quoting).
        :param https: whether the request came over HTTPS (for ``secure=None``).
        """
        parts = [
            f"{self.cookie_name}={token}",
            f"Max-Age={int(self.max_age)}",
            f"Path={self.cookie_path}",
        ]
        if self.cookie_domain is not None:
            parts.append(f"Domain={self.cookie_domain}")
        if self.secure or (self.secure is None and https):
            parts.append("Secure")
        if self.httponly:
            parts.append("HttpOnly")
        parts.append(f"SameSite={self.samesite.capitalize()}")
        return "; ".join(parts)


def _routers(routers: object) -> tuple[ReplicaRouter[Any], ...]:
    """``routers`` (one router, or an iterable of them) as a tuple, each
    with a ``secret``; else ConfigurationError naming the fix."""
    if isinstance(routers, ReplicaRouter):
        found: tuple[object, ...] = (routers,)
    elif isinstance(routers, Iterable) and not isinstance(routers, (str, bytes)):
        found = tuple(routers)
    else:
        found = (routers,)
    checked: list[ReplicaRouter[Any]] = []
    for router in found:
        if not isinstance(router, ReplicaRouter):
            raise ConfigurationError(
                f"routers must be a ReplicaRouter or several, not {type(router).__name__}"
            )
        if router.secret is None:
            raise ConfigurationError(
                f"router {router.name!r} has no secret, so CausalMiddleware cannot sign "
                "its causal tokens; pass ReplicaRouter(..., secret=...), the same on "
                "every app server"
            )
        checked.append(router)
    return tuple(checked)


class CausalMiddlewareBase(Generic[_App, _Source]):
    """The options and per-request decisions of both ``CausalMiddleware``.

    Subclasses (ASGI, WSGI) only move bytes: they find the request's header
    and cookie, enter :meth:`request_settings`, and add the token of
    :meth:`outgoing_token` to the response. ``_Source`` is what
    ``sticky_key`` receives: the ASGI scope or the WSGI environ.

    :param app: the application to wrap.
    :param routers: the router, or routers, whose tokens the application
        issues: each must have a ``secret`` (checked here, at start-up, not
        at the first request that commits), and the shortest
        ``token_max_age`` is the cookie's default lifetime. May be empty:
        then a router without secret is reported (one ERROR log) at the first
        request that commits through it, and that response goes out without
        a token instead of failing after its commit.
    :param cookie_name: the token cookie (default ``db_causal``).
    :param header_name: the token header, for requests and responses
        (default ``X-DB-Causal``, matched case-insensitively): clients that
        are not browsers (an API client, another service) send and read it;
        when a request has both, the header wins.
    :param max_age: the cookie's lifetime in seconds; default: the shortest
        ``token_max_age`` of ``routers``, else one day (the routers' default).
    :param secure: the cookie's ``Secure`` attribute; None (default): set
        for ``https`` requests (behind a TLS-terminating proxy, have the
        server trust its forwarded scheme, or pass True).
    :param samesite: the cookie's ``SameSite`` attribute (default ``"lax"``:
        sent on top-level navigations, such as the redirect after a POST);
        ``"none"`` needs ``secure=True``.
    :param cookie_path: the cookie's ``Path``.
    :param cookie_domain: the cookie's ``Domain`` (default: none, this host only).
    :param sticky_key: called with each request's ASGI scope or WSGI environ:
        the key whose reads stick to one replica (see ``sr.sticky``), or None
        for none. It runs before the app, so it reads what the request has
        (a header, a cookie, the client address), not what the app adds.
    :param method_consistency: a default level per HTTP method, e.g.
        ``{"GET": "eventual"}``, in force as ``sr.default_consistency()``:
        weaker than a view's ``@sr.consistency()``, a statement's option, a
        table rule and a session's own ``consistency=``.
    :raises ConfigurationError: here, for a router without ``secret``, a bad
        name, attribute or level, or a ``sticky_key`` that is not callable.
    """

    #: What ``sticky_key`` receives, for messages.
    _source_name: ClassVar[str] = "request"
    #: Where reports go (each subclass logs under its own module's name).
    _logger: ClassVar[logging.Logger] = logging.getLogger(__name__)

    def __init__(
        self,
        app: _App,
        routers: ReplicaRouter[Any] | Iterable[ReplicaRouter[Any]] = (),
        *,
        cookie_name: str = DEFAULT_COOKIE_NAME,
        header_name: str = DEFAULT_HEADER_NAME,
        max_age: float | None = None,
        secure: bool | None = None,
        samesite: SameSite = "lax",
        cookie_path: str = "/",
        cookie_domain: str | None = None,
        sticky_key: Callable[[_Source], StickyKey | None] | None = None,
        method_consistency: Mapping[str, ConsistencyLevel] | None = None,
    ) -> None:
        self.app = app
        self.routers = _routers(routers)
        self.transport = TokenTransport(
            cookie_name=cookie_name,
            header_name=header_name,
            max_age=cookie_max_age(self.routers) if max_age is None else max_age,
            secure=secure,
            samesite=samesite,
            cookie_path=cookie_path,
            cookie_domain=cookie_domain,
        )
        if sticky_key is not None and not callable(sticky_key):
            raise ConfigurationError(
                f"sticky_key must be a callable taking the {self._source_name}, not {sticky_key!r}"
            )
        self.sticky_key = sticky_key
        if method_consistency is not None and not isinstance(method_consistency, Mapping):
            raise ConfigurationError(
                "method_consistency must be a mapping of HTTP method to level, not "
                f"{type(method_consistency).__name__}"
            )
        self.method_consistency: dict[str, ConsistencyLevel] = {
            str(method).upper(): validate_level(level, argument=f"method_consistency[{method!r}]")
            for method, level in (method_consistency or {}).items()
        }
        self._reported: set[str] = set()
        self._reported_lock = threading.Lock()

    def request_settings(
        self, method: object, source: _Source
    ) -> tuple[default_consistency | sticky, ...]:
        """The settings a request runs in, not entered yet: the default level
        of its HTTP ``method`` (None for a websocket) and the sticky key
        ``sticky_key`` finds in ``source``; only those configured (this runs
        on every request)."""
        settings: tuple[default_consistency | sticky, ...] = ()
        if self.method_consistency and isinstance(method, str):
            level = self.method_consistency.get(method)
            if level is not None:
                settings = (default_consistency(level),)
        if self.sticky_key is not None:
            settings += (sticky(self.sticky_key(source)),)
        return settings

    def outgoing_token(self, ctx: CausalContext, incoming: str | None) -> str | None:
        """The token the response must carry: ``ctx``'s, when the request's
        commits changed it, else None.

        Never raises: the commit is done, and failing the response now would
        tell the user it was not. A router without ``secret`` is reported
        once, at ERROR (the process's own reads still see the commit, other
        app servers not); anything else is logged with its traceback.
        """
        if not ctx.changed:
            return None
        try:
            token = ctx.token
        except ConfigurationError as error:
            self.report_once(str(error), f"CausalMiddleware sends no causal token: {error}")
            return None
        except Exception:  # a bug must not turn a committed request into an error
            self._logger.exception("CausalMiddleware could not make the causal token")
            return None
        return None if token == incoming else token

    def report_once(self, key: str, text: str, *, level: int = logging.ERROR) -> None:
        """Log ``text`` at ``level`` the first time ``key`` is reported."""
        with self._reported_lock:
            if key in self._reported:
                return
            self._reported.add(key)
        self._logger.log(level, text)

    def __repr__(self) -> str:
        names = ", ".join(router.name for router in self.routers)
        return f"{type(self).__name__}({self.app!r}, routers=[{names}])"
