"""The shared part of the ASGI and WSGI CausalMiddleware (integrations._http).

Pure tests, no database: the token's cookie and header, the cookie's
lifetime, and the options both middlewares take, with the same names,
defaults and messages. SQLite routers stand in where a router's secret and
token lifetime are all that matters.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import pytest

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.consistency import default_consistency
from sqlalchemy_replicas.exc import ConfigurationError
from sqlalchemy_replicas.integrations import asgi, wsgi
from sqlalchemy_replicas.integrations._http import (
    CausalMiddlewareBase,
    TokenTransport,
    cookie_max_age,
    cookie_value,
)
from sqlalchemy_replicas.sticky import sticky

MIDDLEWARES = [
    pytest.param(asgi.CausalMiddleware, id="asgi"),
    pytest.param(wsgi.CausalMiddleware, id="wsgi"),
]


@pytest.fixture
def make_router() -> Iterator[Any]:
    """Makes SQLite routers, disposed of after the test."""
    made: list[sr.ReplicaRouter] = []

    def make(**options: Any) -> sr.ReplicaRouter:
        router = sr.ReplicaRouter("sqlite://", **options)
        made.append(router)
        return router

    yield make
    for router in made:
        router.dispose()


def app(*args: Any) -> Any:
    raise AssertionError("never called")


# --- the cookie and the header -------------------------------------------------


def test_cookie_value_finds_ours_among_odd_cookies() -> None:
    """The cookie parser finds the token past cookies http.cookies rejects,
    takes the first of a name, unquotes, and says None when it is absent or
    there is no Cookie header."""
    header = 'bad cookie; a=b=c; db_causal="tok1"; db_causal=tok2'
    assert cookie_value(header, "db_causal") == "tok1"
    assert cookie_value(header, "a") == "b=c"
    assert cookie_value("other=1", "db_causal") is None
    assert cookie_value(None, "db_causal") is None
    assert cookie_value("", "db_causal") is None


def test_header_wins_over_cookie_and_empty_is_no_token() -> None:
    """TokenTransport.incoming: a non-empty header beats the cookie (and is
    stripped); an empty header falls back to the cookie; an empty cookie is
    no token; under configured names too."""
    transport = TokenTransport()
    assert transport.incoming("from-header ", "db_causal=from-cookie") == "from-header"
    assert transport.incoming("", "db_causal=from-cookie") == "from-cookie"
    assert transport.incoming(None, "db_causal=") is None
    assert transport.incoming(None, None) is None
    named = TokenTransport(cookie_name="tok", header_name="X-Token")
    assert named.incoming(None, 'db_causal=x; tok="quoted"') == "quoted"


def test_set_cookie_attributes() -> None:
    """The Set-Cookie value: whole-second Max-Age, Path, HttpOnly, SameSite=Lax,
    and Secure exactly when asked for or (secure=None) over https."""
    transport = TokenTransport(max_age=3600.9)
    assert transport.set_cookie("t") == "db_causal=t; Max-Age=3600; Path=/; HttpOnly; SameSite=Lax"
    assert "; Secure;" in transport.set_cookie("t", https=True)
    assert "Secure" not in TokenTransport(secure=False).set_cookie("t", https=True)
    custom = TokenTransport(
        cookie_name="c", secure=True, samesite="strict", cookie_path="/app", cookie_domain="a.org"
    )
    assert custom.set_cookie("t") == (
        "c=t; Max-Age=86400; Path=/app; Domain=a.org; Secure; HttpOnly; SameSite=Strict"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cookie_name": "db causal"}, "cookie_name='db causal' is not a valid cookie name"),
        ({"cookie_name": "a=b"}, "cookie_name='a=b' is not a valid cookie name"),
        ({"header_name": "X-DB:Causal"}, "header_name='X-DB:Causal' is not a valid HTTP header"),
        ({"max_age": 0}, "max_age=0 is invalid"),
        ({"max_age": float("nan")}, "max_age=nan is invalid"),
        ({"max_age": True}, "max_age=True is invalid"),
        ({"secure": "yes"}, "secure='yes' is invalid"),
        ({"samesite": "loose"}, "samesite='loose' is invalid"),
        ({"samesite": "none"}, "samesite='none' needs secure=True"),
        ({"cookie_path": "/a;b"}, "cookie_path='/a;b' is not a valid cookie attribute"),
        ({"cookie_domain": "a b"}, "cookie_domain='a b' is not a valid cookie attribute"),
    ],
)
def test_bad_transport_options_are_refused(options: dict[str, Any], message: str) -> None:
    """Names or attributes that would make a broken header, a lifetime under a
    second, a Secure that is not a bool or None, and SameSite=None without
    Secure raise ConfigurationError naming the option as the middleware
    spells it."""
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(")):
        TokenTransport(**options)


def test_cookie_max_age_is_the_shortest_token_max_age(make_router: Any) -> None:
    """The cookie lives the shortest token_max_age of the routers, in whole
    seconds; one day without routers."""
    assert cookie_max_age([]) == 86400
    assert cookie_max_age([make_router(token_max_age=600.7)]) == 600
    assert cookie_max_age([make_router(token_max_age=3600), make_router(token_max_age=900)]) == 900


# --- the options of both middlewares -------------------------------------------


def test_both_middlewares_take_the_same_options() -> None:
    """The ASGI and WSGI CausalMiddleware have one signature: the same
    parameter names, kinds and defaults (only the types of app and of what
    sticky_key receives differ)."""

    def shape(cls: type) -> list[tuple[str, Any, Any]]:
        params = inspect.signature(cls).parameters.values()
        return [(p.name, p.kind, p.default) for p in params]

    assert shape(asgi.CausalMiddleware) == shape(wsgi.CausalMiddleware)
    assert shape(asgi.CausalMiddleware) == shape(CausalMiddlewareBase)
    assert [name for name, _, _ in shape(wsgi.CausalMiddleware)] == [
        "app", "routers", "cookie_name", "header_name", "max_age", "secure", "samesite",
        "cookie_path", "cookie_domain", "sticky_key", "method_consistency",
    ]  # fmt: skip


@pytest.mark.parametrize("middleware", MIDDLEWARES)
def test_defaults(middleware: type[CausalMiddlewareBase[Any, Any]], make_router: Any) -> None:
    """Defaults: cookie db_causal, header X-DB-Causal, Secure per request
    scheme, SameSite=Lax, Path=/, no Domain; the cookie lives the routers'
    shortest token_max_age, one router or several, else a day; max_age= wins."""
    bare = middleware(app)
    assert bare.routers == ()
    assert bare.transport == TokenTransport(max_age=86400)
    one = make_router(secret="s", token_max_age=600)
    two = make_router(secret="s", token_max_age=300, name="other")
    assert middleware(app, one).routers == (one,)
    assert middleware(app, one).transport.max_age == 600
    assert middleware(app, [one, two]).transport.max_age == 300
    assert middleware(app, routers=iter([one, two])).routers == (one, two)
    assert middleware(app, one, max_age=60).transport.max_age == 60


@pytest.mark.parametrize("middleware", MIDDLEWARES)
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"routers": "default"}, "routers must be a ReplicaRouter or several, not str"),
        ({"routers": [None]}, "routers must be a ReplicaRouter or several, not NoneType"),
        ({"header_name": "X DB"}, "header_name='X DB' is not a valid HTTP header name"),
        ({"cookie_name": "a=b"}, "cookie_name='a=b' is not a valid cookie name"),
        ({"max_age": -1}, "max_age=-1 is invalid"),
        ({"samesite": "none"}, "samesite='none' needs secure=True"),
        ({"method_consistency": {"get": "fast"}}, r"method_consistency\['get'\]"),
        ({"method_consistency": ["GET"]}, "method_consistency must be a mapping"),
        ({"sticky_key": "user"}, "sticky_key must be a callable taking the (ASGI scope|WSGI env)"),
    ],
)
def test_bad_options_are_refused_with_one_message(
    middleware: type[CausalMiddlewareBase[Any, Any]], options: dict[str, Any], message: str
) -> None:
    """Both middlewares refuse the same bad options at construction, with
    the same ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError, match=message):
        middleware(app, **options)


@pytest.mark.parametrize("middleware", MIDDLEWARES)
def test_a_router_without_secret_is_refused_naming_the_fix(
    middleware: type[CausalMiddlewareBase[Any, Any]], make_router: Any
) -> None:
    """A router without secret, alone or among others, is refused at
    construction: the message names it and the fix."""
    signed, unsigned = make_router(secret="s"), make_router(name="reports")
    for routers in (unsigned, [signed, unsigned]):
        with pytest.raises(ConfigurationError) as caught:
            middleware(app, routers)
        assert str(caught.value) == (
            "router 'reports' has no secret, so CausalMiddleware cannot sign its causal "
            "tokens; pass ReplicaRouter(..., secret=...), the same on every app server"
        )


@pytest.mark.parametrize("middleware", MIDDLEWARES)
def test_request_settings(middleware: type[CausalMiddlewareBase[Any, Any]]) -> None:
    """Per request: the default level of its method (keys upper-cased; none
    for other methods and for websockets, method None) and the sticky key
    sticky_key finds; nothing when neither is configured."""
    assert middleware(app).request_settings("GET", {}) == ()
    configured = middleware(
        app,
        method_consistency={"get": "eventual"},
        sticky_key=lambda source: source.get("user"),
    )
    level, key = configured.request_settings("GET", {"user": "ada"})
    assert isinstance(level, default_consistency)
    assert level.value == "eventual"
    assert isinstance(key, sticky)
    assert key.value == b"ada"
    (only_key,) = configured.request_settings("POST", {"user": "ada"})
    assert isinstance(only_key, sticky)
    (no_key,) = configured.request_settings(None, {})
    assert no_key.value == b""  # sticky(None): no key
