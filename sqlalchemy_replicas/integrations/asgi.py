"""Causal tokens for ASGI apps (Starlette, FastAPI, Litestar, any ASGI app).

:class:`CausalMiddleware` is plain ASGI (not Starlette's
``BaseHTTPMiddleware``: no extra task, no buffering of streamed bodies, and
the endpoint runs in the middleware's own context, so the ContextVars it sets
are the endpoint's)::

    from sqlalchemy_replicas.integrations.asgi import CausalMiddleware

    app.add_middleware(CausalMiddleware, routers=router)

Per HTTP request it opens a ``causal_context()`` seeded from the request's
token (the ``X-DB-Causal`` header wins over the ``db_causal`` cookie), and
optionally ``sticky()`` and ``default_consistency()``; when the request's
commits changed the token, the response carries the new one in the same
header and in the cookie. Its options, and the WSGI twin's, are those of
:class:`~sqlalchemy_replicas.integrations._http.CausalMiddlewareBase`.
Imports no framework; does no I/O of its own (signing a token may ask the
primary for its position after a commit whose position was lost).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from contextlib import ExitStack
from functools import cached_property
from typing import Any, ClassVar, TypeAlias

from ..causal import CausalContext, causal_context
from ._http import CausalMiddlewareBase

__all__ = ["ASGIApp", "CausalMiddleware", "Message", "Receive", "Scope", "Send"]

# The ASGI types, loose enough that every framework's own spelling fits
# without casts: Starlette's (MutableMapping scopes and messages) and
# Litestar's (TypedDict unions, which are Mappings but not MutableMappings).
#: An ASGI connection scope, as this module reads it (``sticky_key`` gets one).
Scope: TypeAlias = Mapping[str, Any]
#: An ASGI event, as this module writes it.
Message: TypeAlias = MutableMapping[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Any]]
Send: TypeAlias = Callable[[Any], Awaitable[None]]
#: Any ASGI application (the middleware passes the three arguments through).
ASGIApp: TypeAlias = Callable[[Any, Any, Any], Awaitable[None]]


class CausalMiddleware(CausalMiddlewareBase[ASGIApp, Scope]):
    """Carry each user's causal scope from request to request, across app servers.

    ::

        app.add_middleware(
            CausalMiddleware,
            routers=router,                                 # checks its secret at startup
            sticky_key=lambda scope: user_id_from(scope),   # optional
            method_consistency={"GET": "eventual"},         # optional
        )

    ``CausalMiddleware(app, routers=(), *, cookie_name="db_causal",
    header_name="X-DB-Causal", max_age=None, secure=None, samesite="lax",
    cookie_path="/", cookie_domain=None, sticky_key=None,
    method_consistency=None)``: the options of
    :class:`~sqlalchemy_replicas.integrations._http.CausalMiddlewareBase`,
    the same as the WSGI middleware's; ``sticky_key`` is given the ASGI
    scope of each HTTP request and websocket, before any other middleware
    ran. Starlette and FastAPI build middleware when the app starts, so a
    router without a secret fails then.

    Websocket connections get the causal context (seeded from the handshake's
    header or cookie) and the sticky key for the whole connection, but no
    token back: a handshake response cannot reflect commits made later.
    Lifespan and other scopes pass through untouched.
    """

    _source_name: ClassVar[str] = "ASGI scope"
    _logger: ClassVar[logging.Logger] = logging.getLogger(__name__)

    @cached_property
    def _header_key(self) -> bytes:
        """The token header as ASGI spells it: lower-case bytes."""
        return self.transport.header_name.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app for one connection (the ASGI interface)."""
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            with causal_context(token=self.incoming_token(scope)), ExitStack() as stack:
                for setting in self.request_settings(None, scope):
                    stack.enter_context(setting)
                await self.app(scope, receive, send)
        else:  # lifespan, and scope types of future ASGI versions
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        https = scope.get("scheme") == "https"
        incoming = self.incoming_token(scope)
        # Whether the token changed before the response started: commits
        # after that (a streaming body) cannot reach this response's headers.
        started_with_commits = -1

        with causal_context(token=incoming) as ctx:

            async def send_with_token(message: Message) -> None:
                nonlocal started_with_commits
                if message["type"] == "http.response.start":
                    started_with_commits = ctx.scope.commits
                    message = self._with_token(message, ctx, incoming, https=https)
                await send(message)

            # Block-scoped settings in the request's own context: the app's
            # tasks and threadpool calls copy it, and another request's
            # context never sees it.
            with ExitStack() as stack:
                for setting in self.request_settings(scope.get("method"), scope):
                    stack.enter_context(setting)
                await self.app(scope, receive, send_with_token)
            if started_with_commits >= 0 and ctx.scope.commits != started_with_commits:
                self.report_once(
                    "late",
                    "a request committed after its response had started (a streaming "
                    "response?): its token, sent with the response's headers, leaves "
                    "those commits out, so another app server may not see them in the "
                    "user's next request; commit before returning the response",
                    level=logging.WARNING,
                )

    def incoming_token(self, scope: Scope) -> str | None:
        """The request's token, from its header (which wins) or its cookie."""
        header_value: str | None = None
        cookies: list[str] = []
        for key, value in scope.get("headers", ()):
            if key == self._header_key:
                header_value = value.decode("latin-1")
            elif key == b"cookie":
                cookies.append(value.decode("latin-1"))
        return self.transport.incoming(header_value, "; ".join(cookies) if cookies else None)

    def _with_token(
        self, message: Message, ctx: CausalContext, incoming: str | None, *, https: bool
    ) -> Message:
        """``message`` (a response start) with the scope's token in its
        header and cookie, when the request changed it; else unchanged."""
        token = self.outgoing_token(ctx, incoming)
        if token is None:
            return message
        headers = list(message.get("headers", ()))
        headers.append((self._header_key, token.encode("latin-1")))
        headers.append((b"set-cookie", self.transport.set_cookie(token, https=https).encode()))
        return {**message, "headers": headers}
