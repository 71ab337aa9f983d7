"""Causal tokens for ASGI apps (Starlette, FastAPI, Litestar, any ASGI app).

:class:`CausalMiddleware` is plain ASGI (not Starlette's
``BaseHTTPMiddleware``: no extra task, no buffering of streamed bodies, and
the endpoint runs in the middleware's own context, so the ContextVars it sets
are the endpoint's)::

    from sqlalchemy_replicas.integrations.asgi import CausalMiddleware

    app.add_middleware(CausalMiddleware, router=router)

Per HTTP request it opens a ``causal_context()`` seeded from the request's
token (the ``X-DB-Causal`` header wins over the ``db_causal`` cookie), and
optionally ``sticky()`` and ``default_consistency()``; when the request's
commits changed the token, the response carries the new one in the same
header and in the cookie. Imports no framework; does no I/O of its own
(signing a token may ask the primary for its position after a commit whose
position was lost).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from contextlib import nullcontext
from typing import Any, TypeAlias

from ..causal import CausalContext, causal_context
from ..consistency import ConsistencyLevel, default_consistency, validate_level
from ..exc import ConfigurationError
from ..router import ReplicaRouter
from ..sticky import StickyKey, sticky
from ._http import DEFAULT_COOKIE, DEFAULT_HEADER, SameSite, TokenTransport

__all__ = ["ASGIApp", "CausalMiddleware", "Message", "Receive", "Scope", "Send"]

logger = logging.getLogger("sqlalchemy_replicas.integrations.asgi")

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


class CausalMiddleware:
    """Carry each user's causal scope from request to request, across app servers.

    ::

        app.add_middleware(
            CausalMiddleware,
            router=router,                                  # checks its secret at startup
            sticky_key=lambda scope: user_id_from(scope),   # optional
            method_levels={"GET": "eventual"},             # optional
        )

    :param app: the ASGI app to wrap (frameworks pass it).
    :param router: the router (or routers) whose tokens this middleware
        carries: each must have a ``secret``, checked here, so a missing one
        fails when the app starts instead of at a request; the cookie lives
        as long as the shortest ``token_max_age`` of them. Optional: without
        it a router with no secret is reported (logged at ERROR, once) at
        the first request that commits, and that request's response goes
        out without a token instead of failing after its commit.
    :param cookie: the cookie's name.
    :param header: the request and response header's name.
    :param max_age: the cookie's lifetime in seconds; default: the routers'
        ``token_max_age``, else one day (the routers' default).
    :param secure: the cookie's ``Secure`` attribute; None (default): set for
        ``https`` requests (behind a TLS-terminating proxy, have the server
        trust its forwarded scheme, e.g. ``uvicorn --proxy-headers``, or pass
        True).
    :param samesite: the cookie's ``SameSite`` attribute (default ``"lax"``).
    :param path: the cookie's ``Path``.
    :param domain: the cookie's ``Domain`` (default: the request's host).
    :param sticky_key: called with the ASGI scope of each HTTP request and
        websocket: the user's sticky key (see ``sr.sticky``), or None for
        none. It runs before the app, so it reads what the scope has (a
        header, a cookie, the client address), not what later middleware adds.
    :param method_levels: a default consistency level per HTTP method
        (``{"GET": "eventual"}``), set with ``sr.default_consistency``: view
        decorators, statement options, a session's own level and table rules
        still win over it.
    :raises ConfigurationError: for a router without a secret, a bad name,
        attribute or level.

    Websocket connections get the causal context (seeded from the handshake's
    header or cookie) and the sticky key for the whole connection, but no
    token back: a handshake response cannot reflect commits made later.
    Lifespan and other scopes pass through untouched.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        router: ReplicaRouter[Any] | Iterable[ReplicaRouter[Any]] | None = None,
        cookie: str = DEFAULT_COOKIE,
        header: str = DEFAULT_HEADER,
        max_age: float | None = None,
        secure: bool | None = None,
        samesite: SameSite = "lax",
        path: str = "/",
        domain: str | None = None,
        sticky_key: Callable[[Scope], StickyKey | None] | None = None,
        method_levels: Mapping[str, ConsistencyLevel] | None = None,
    ) -> None:
        self.app = app
        routers = _routers(router)
        for each in routers:
            if each.secret is None:
                raise ConfigurationError(
                    f"CausalMiddleware: router {each.name!r} has no secret, so its causal "
                    "tokens cannot be signed; pass ReplicaRouter(..., secret=...), the same "
                    "on every app server"
                )
        if max_age is None:
            max_age = min((each.token_max_age for each in routers), default=86400.0)
        self.transport = TokenTransport(
            cookie=cookie,
            header=header,
            max_age=max_age,
            secure=secure,
            samesite=samesite,
            path=path,
            domain=domain,
        )
        if sticky_key is not None and not callable(sticky_key):
            raise ConfigurationError(
                f"sticky_key must be a callable taking the ASGI scope, not {sticky_key!r}"
            )
        self.sticky_key = sticky_key
        self.method_levels: dict[str, ConsistencyLevel] = {
            str(method).upper(): validate_level(level, argument=f"method_levels[{method!r}]")
            for method, level in (method_levels or {}).items()
        }
        self._header_key = self.transport.header.lower().encode("latin-1")
        self._reported: set[str] = set()
        self._reported_lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app for one connection (the ASGI interface)."""
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            with (
                causal_context(token=self._incoming(scope)),
                sticky(self.sticky_key(scope)) if self.sticky_key else nullcontext(),
            ):
                await self.app(scope, receive, send)
        else:  # lifespan, and scope types of future ASGI versions
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        https = scope.get("scheme") == "https"
        # Whether the token changed before the response started: commits
        # after that (a streaming body) cannot reach this response's headers.
        started_with_commits = -1

        with causal_context(token=self._incoming(scope)) as ctx:

            async def send_with_token(message: Message) -> None:
                nonlocal started_with_commits
                if message["type"] == "http.response.start":
                    started_with_commits = ctx.scope.commits
                    if started_with_commits:
                        message = self._with_token(message, ctx, https=https)
                await send(message)

            level = self.method_levels.get(scope.get("method", ""))
            # Block-scoped settings in the request's own context: the app's
            # tasks and threadpool calls copy it, and another request's
            # context never sees it. Each is skipped when not configured:
            # this runs on every request.
            with (
                sticky(self.sticky_key(scope)) if self.sticky_key else nullcontext(),
                default_consistency(level) if level else nullcontext(),
            ):
                await self.app(scope, receive, send_with_token)
            if started_with_commits >= 0 and ctx.scope.commits != started_with_commits:
                self._report_once(
                    "late",
                    "a request committed after its response had started (a streaming "
                    "response?): its token, sent with the response's headers, leaves "
                    "those commits out, so another app server may not see them in the "
                    "user's next request; commit before returning the response",
                    level=logging.WARNING,
                )

    def _incoming(self, scope: Scope) -> str | None:
        """The request's token, from its header or its cookie (None: none)."""
        header_value: str | None = None
        cookies: list[str] = []
        for key, value in scope.get("headers", ()):
            if key == self._header_key:
                header_value = value.decode("latin-1")
            elif key == b"cookie":
                cookies.append(value.decode("latin-1"))
        return self.transport.incoming(header_value, "; ".join(cookies) if cookies else None)

    def _with_token(self, message: Message, ctx: CausalContext, *, https: bool) -> Message:
        """``message`` (a response start) with the scope's token in its
        header and cookie; unchanged when the token cannot be made."""
        try:
            token = ctx.token
        except ConfigurationError as error:
            # The commit is done: failing the response now would tell the
            # user it was not. Say it loudly once; the process's own reads
            # still see the commit (the router's scope), other servers not.
            self._report_once(str(error), f"CausalMiddleware sends no causal token: {error}")
            return message
        except Exception:  # a bug must not turn a committed request into an error
            logger.exception("CausalMiddleware could not make the causal token")
            return message
        if token is None:
            return message
        headers = list(message.get("headers", ()))
        headers.append((self._header_key, token.encode("latin-1")))
        headers.append((b"set-cookie", self.transport.set_cookie(token, https=https).encode()))
        return {**message, "headers": headers}

    def _report_once(self, key: str, text: str, *, level: int = logging.ERROR) -> None:
        with self._reported_lock:
            if key in self._reported:
                return
            self._reported.add(key)
        logger.log(level, text)


def _routers(
    router: ReplicaRouter[Any] | Iterable[ReplicaRouter[Any]] | None,
) -> list[ReplicaRouter[Any]]:
    if router is None:
        return []
    if isinstance(router, ReplicaRouter):
        return [router]
    routers = list(router)
    for each in routers:
        if not isinstance(each, ReplicaRouter):
            raise ConfigurationError(
                f"router must be a ReplicaRouter or several, not {type(each).__name__}"
            )
    return routers
