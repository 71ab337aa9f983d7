"""Causal tokens for any WSGI application: ``CausalMiddleware``.

Per request, a ``causal_context()`` seeded from the token the client sent
(the ``X-DB-Causal`` header, else the ``db_causal`` cookie), an optional
sticky key and an optional default consistency level per HTTP method. When
the request's commits changed the token, the response carries the new one in
the same header and the cookie. Its options, and the ASGI twin's, are those
of :class:`~sqlalchemy_replicas.integrations._http.CausalMiddlewareBase`. No
I/O of its own; reading ``ctx.token`` after a commit whose position was lost
asks the primary once.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar, TypeAlias

from ..causal import CausalContext, enter_causal_context
from ..sticky import StickyKey
from ._http import CausalMiddlewareBase

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["CausalMiddleware", "StickyKeyFunction"]

StickyKeyFunction: TypeAlias = "Callable[[WSGIEnvironment], StickyKey | None]"
"""Given a request's WSGI environ, the key its reads stick to (None: none)."""

_Write: TypeAlias = "Callable[[bytes], object]"
_App: TypeAlias = "WSGIApplication"
_Environ: TypeAlias = "WSGIEnvironment"


class CausalMiddleware(CausalMiddlewareBase[_App, _Environ]):
    """Carry each client's causal scope from request to request.

    ::

        app.wsgi_app = CausalMiddleware(app.wsgi_app, router)    # Flask
        application = CausalMiddleware(get_wsgi_application(), router)  # Django

    ``CausalMiddleware(app, routers=(), *, cookie_name="db_causal",
    header_name="X-DB-Causal", max_age=None, secure=None, samesite="lax",
    cookie_path="/", cookie_domain=None, sticky_key=None,
    method_consistency=None)``: the options of
    :class:`~sqlalchemy_replicas.integrations._http.CausalMiddlewareBase`,
    the same as the ASGI middleware's; ``sticky_key`` is given the request's
    WSGI environ, and ``secure=None`` follows its ``wsgi.url_scheme``.

    Per request, a :func:`~sqlalchemy_replicas.causal_context` holds from
    the application's call until the server closes the response (so it
    spans a streamed body too), seeded from the token in the request's
    header (which wins) or cookie. A malformed, expired or forged token is
    ignored (counted and logged), never raised. When a commit was made in
    the request and the token changed, the response carries the new one in
    the header and in the cookie.

    Headers leave with the response's status, at the application's first
    body chunk (or its ``write()``, or an empty body's end), not when it
    calls ``start_response``: commits made before that are in the token.
    Commits made while later chunks of a streamed body are produced cannot
    be: the headers are gone by then.

    The request's contexts live in a copy of the caller's
    :mod:`contextvars` context, entered for the call and for each step of
    the body's iteration, so whichever thread the server iterates in, the
    body sees them and nothing leaks into the server's own context.
    """

    _source_name: ClassVar[str] = "WSGI environ"
    _logger: ClassVar[logging.Logger] = logging.getLogger(__name__)

    @cached_property
    def _environ_key(self) -> str:
        """The WSGI environ key of the token header: X-DB-Causal -> HTTP_X_DB_CAUSAL."""
        return "HTTP_" + self.transport.header_name.upper().replace("-", "_")

    def incoming_token(self, environ: WSGIEnvironment) -> str | None:
        """The token the request carries: its header's, else its cookie's."""
        header = environ.get(self._environ_key)
        cookies = environ.get("HTTP_COOKIE")
        return self.transport.incoming(
            header if isinstance(header, str) else None,
            cookies if isinstance(cookies, str) else None,
        )

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        response = _Response(self, environ, start_response)
        response.call()
        return response

    def token_headers(
        self, ctx: CausalContext, incoming: str | None, *, https: bool = False
    ) -> list[tuple[str, str]]:
        """The headers that carry ``ctx``'s token, when the request changed it.

        Never raises: the response is more important than the token (see
        :meth:`outgoing_token`).
        """
        token = self.outgoing_token(ctx, incoming)
        if token is None:
            return []
        cookie = self.transport.set_cookie(token, https=https)
        return [(self.transport.header_name, token), ("Set-Cookie", cookie)]


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
        self._ctx = enter_causal_context(self._incoming)
        method = self._environ.get("REQUEST_METHOD", "GET")
        for setting in self._middleware.request_settings(method, self._environ):
            setting.__enter__()  # never left: the context is dropped with the response

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
        https = self._environ.get("wsgi.url_scheme") == "https"
        headers += self._middleware.token_headers(self._ctx, self._incoming, https=https)
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
