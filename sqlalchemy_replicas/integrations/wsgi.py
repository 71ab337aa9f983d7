"""Causal tokens for any WSGI application: ``CausalMiddleware``.

Per request, a ``causal_context()`` seeded from the token the client sent
(the ``X-DB-Causal`` header, else the ``db_causal`` cookie), an optional
sticky key and an optional default consistency level per HTTP method. When
the request's commits changed the token, the response carries the new one in
the same header and the cookie. No I/O of its own; reading ``ctx.token``
after a commit whose position was lost asks the primary once.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from ..causal import CausalContext, enter_causal_context
from ..consistency import ConsistencyLevel, default_consistency, validate_level
from ..exc import ConfigurationError
from ..router import ReplicaRouter
from ..sticky import StickyKey, sticky
from ._httputil import (
    DEFAULT_COOKIE_NAME,
    DEFAULT_HEADER_NAME,
    check_attribute,
    check_cookie_name,
    check_header_name,
    cookie_max_age,
    cookie_value,
    set_cookie_header,
)

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["CausalMiddleware", "StickyKeyFunction"]

logger = logging.getLogger("sqlalchemy_replicas.integrations")

StickyKeyFunction: TypeAlias = "Callable[[WSGIEnvironment], StickyKey | None]"
"""Given a request's WSGI environ, the key its reads stick to (None: none)."""

_Write: TypeAlias = "Callable[[bytes], object]"


class CausalMiddleware:
    """Carry each client's causal scope from request to request.

    ::

        app.wsgi_app = CausalMiddleware(app.wsgi_app, router)    # Flask
        application = CausalMiddleware(get_wsgi_application(), router)  # Django

    Per request, a :func:`~sqlalchemy_replicas.causal_context` holds from
    the application's call until the server closes the response (so it
    spans a streamed body too), seeded from the token in the request's
    header (which wins) or cookie. A malformed, expired or forged token is
    ignored (counted and logged), never raised. When a commit was made in
    the request and the token changed, the response carries the new one in
    the header and in the cookie (HttpOnly, SameSite=Lax, ``Secure`` when
    asked, for the routers' ``token_max_age``).

    Headers leave with the response's status, at the application's first
    body chunk (or its ``write()``, or an empty body's end), not when it
    calls ``start_response``: commits made before that are in the token.
    Commits made while later chunks of a streamed body are produced cannot
    be: the headers are gone by then.

    The request's contexts live in a copy of the caller's
    :mod:`contextvars` context, entered for the call and for each step of
    the body's iteration, so whichever thread the server iterates in, the
    body sees them and nothing leaks into the server's own context.

    :param app: the WSGI application to wrap.
    :param routers: the router, or routers, whose tokens the application
        issues: each must have a ``secret`` (checked here, at start-up, not
        at the first request that commits), and the shortest
        ``token_max_age`` is the cookie's lifetime. May be empty: then
        a router without secret is reported (logged at ERROR, the response
        goes out without a token) at the first request that commits through
        it, and the cookie lives a day.
    :param cookie_name: the token cookie (default ``db_causal``).
    :param header_name: the token header (default ``X-DB-Causal``): clients
        that are not browsers (an API client, another service) send and read
        it; when a request has both, the header wins.
    :param secure: mark the cookie ``Secure`` (HTTPS only); do in production.
    :param cookie_path: the cookie's ``Path``.
    :param cookie_domain: the cookie's ``Domain`` (default: none, this host only).
    :param sticky_key: given the request's environ, the key whose reads
        stick to one replica (``sr.sticky()``), or None for none.
    :param method_consistency: a default level per HTTP method, e.g.
        ``{"GET": "bounded"}``, in force as ``sr.default_consistency()``:
        weaker than a view's ``@sr.consistency()``, a statement's option
        and a session's own ``consistency=``.
    :raises ConfigurationError: for a router without ``secret``, a bad
        name or an unknown level, here.
    """

    def __init__(
        self,
        app: WSGIApplication,
        routers: ReplicaRouter[Any] | Iterable[ReplicaRouter[Any]] = (),
        *,
        cookie_name: str = DEFAULT_COOKIE_NAME,
        header_name: str = DEFAULT_HEADER_NAME,
        secure: bool = False,
        cookie_path: str = "/",
        cookie_domain: str | None = None,
        sticky_key: StickyKeyFunction | None = None,
        method_consistency: Mapping[str, ConsistencyLevel] | None = None,
    ) -> None:
        self.app = app
        self.routers: tuple[ReplicaRouter[Any], ...] = (
            (routers,) if isinstance(routers, ReplicaRouter) else tuple(routers)
        )
        for router in self.routers:
            if not isinstance(router, ReplicaRouter):
                raise ConfigurationError(
                    f"routers must be ReplicaRouters, not {type(router).__name__}"
                )
            if router.secret is None:
                raise ConfigurationError(
                    f"router {router.name!r} has no secret, so CausalMiddleware cannot sign "
                    "its causal tokens; pass ReplicaRouter(..., secret=...), the same on "
                    "every app server"
                )
        self.cookie_name = check_cookie_name(cookie_name, argument="cookie_name")
        self.header_name = check_header_name(header_name, argument="header_name")
        self.secure = bool(secure)
        self.cookie_path = check_attribute(cookie_path, argument="cookie_path")
        self.cookie_domain = (
            None
            if cookie_domain is None
            else check_attribute(cookie_domain, argument="cookie_domain")
        )
        self.max_age = cookie_max_age(self.routers)
        self.sticky_key = sticky_key
        self.method_consistency: dict[str, ConsistencyLevel] = {
            str(method).upper(): validate_level(level, argument=f"method_consistency[{method!r}]")
            for method, level in (method_consistency or {}).items()
        }
        # The WSGI environ key of the header: X-DB-Causal -> HTTP_X_DB_CAUSAL.
        self._environ_key = "HTTP_" + self.header_name.upper().replace("-", "_")
        self._reported: set[str] = set()
        self._reported_lock = threading.Lock()

    def incoming_token(self, environ: WSGIEnvironment) -> str | None:
        """The token the request carries: its header's, else its cookie's."""
        header = environ.get(self._environ_key)
        if isinstance(header, str) and header:
            return header
        cookies = environ.get("HTTP_COOKIE")
        return cookie_value(cookies if isinstance(cookies, str) else None, self.cookie_name)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        response = _Response(self, environ, start_response)
        response.call()
        return response

    def token_headers(self, ctx: CausalContext, incoming: str | None) -> list[tuple[str, str]]:
        """The headers that carry ``ctx``'s token, when the request changed it.

        Never raises: the response is more important than the token. A router
        without ``secret`` is reported once, at ERROR.
        """
        if not ctx.changed:
            return []
        try:
            token = ctx.token
        except ConfigurationError as error:
            self._report(str(error))
            return []
        except Exception as error:  # the commit is done; only the token is lost
            logger.warning("no causal token for this response: %s", error)
            return []
        if token is None or token == incoming:
            return []
        cookie = set_cookie_header(
            self.cookie_name,
            token,
            max_age=self.max_age,
            secure=self.secure,
            path=self.cookie_path,
            domain=self.cookie_domain,
        )
        return [(self.header_name, token), ("Set-Cookie", cookie)]

    def _report(self, message: str) -> None:
        with self._reported_lock:
            if message in self._reported:
                return
            self._reported.add(message)
        logger.error("CausalMiddleware sends no causal tokens: %s", message)

    def __repr__(self) -> str:
        names = ", ".join(router.name for router in self.routers)
        return f"CausalMiddleware({self.app!r}, routers=[{names}])"


class _Response:
    """One request: the application's call and its body, inside the request's
    contexts; the headers, with the token, sent at the first body chunk."""

    def __init__(
        self, middleware: CausalMiddleware, environ: WSGIEnvironment, start_response: StartResponse
    ) -> None:
        self._middleware = middleware
        self._environ = environ
        self._start_response = start_response
        self._incoming = middleware.incoming_token(environ)
        # The request's own context: its settings need no reset (it is dropped
        # with the response), and cannot leak into the server's.
        self._context = contextvars.copy_context()
        self._ctx: CausalContext | None = None
        self._pending: tuple[str, list[tuple[str, str]], OptExcInfo | None] | None = None
        self._write: _Write | None = None  # the server's write(): headers were sent
        self._body: Iterable[bytes] = ()
        self._iterator: Iterator[bytes] | None = None
        self._closed = False

    def call(self) -> None:
        """Enter the request's contexts and call the application."""
        context = self._context
        context.run(self._enter)
        self._body = context.run(self._middleware.app, self._environ, self._deferred_start)

    def _enter(self) -> None:
        """Set the request's causal scope, default level and sticky key, in
        the request's own context (where they stay until it is dropped)."""
        middleware = self._middleware
        self._ctx = enter_causal_context(self._incoming)
        method = self._environ.get("REQUEST_METHOD", "GET")
        level = middleware.method_consistency.get(method) if isinstance(method, str) else None
        if level is not None:
            default_consistency(level).__enter__()
        if middleware.sticky_key is not None:
            sticky(middleware.sticky_key(self._environ)).__enter__()

    def _deferred_start(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: OptExcInfo | None = None,
    ) -> _Write:
        """The application's start_response: keeps status and headers until
        the first body chunk, so that commits made until then are in the token."""
        if self._write is not None:
            if exc_info is None:
                raise AssertionError("start_response() called twice without exc_info")
            # Headers are gone: the server's start_response re-raises (PEP 3333).
            return self._start_response(status, headers, exc_info)
        self._pending = (status, list(headers), exc_info)
        return self._write_now

    def _write_now(self, data: bytes) -> object:
        """The legacy ``write()`` callable: the headers must go first."""
        return self._send_headers()(data)

    def _send_headers(self) -> _Write:
        if self._write is not None:
            return self._write
        if self._pending is None:
            raise AssertionError("the WSGI application sent its body before start_response()")
        status, headers, exc_info = self._pending
        assert self._ctx is not None
        headers += self._middleware.token_headers(self._ctx, self._incoming)
        self._write = self._start_response(status, headers, exc_info)
        return self._write

    def __iter__(self) -> _Response:
        return self

    def __next__(self) -> bytes:
        context = self._context
        if self._iterator is None:
            self._iterator = context.run(iter, self._body)
        try:
            chunk = context.run(next, self._iterator)
        except StopIteration:
            context.run(self._send_headers)
            raise
        context.run(self._send_headers)
        return chunk

    def close(self) -> None:
        """Close the application's body, inside the request's context."""
        if self._closed:
            return
        self._closed = True
        close = getattr(self._body, "close", None)
        if close is not None:
            self._context.run(close)
