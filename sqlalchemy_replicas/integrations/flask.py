"""Flask integration: a router per app, causal tokens per request.

::

    from sqlalchemy_replicas.integrations.flask import Replicas, current_router

    replicas = Replicas()

    def create_app():
        app = Flask(__name__)
        app.config.from_prefixed_env()   # FLASK_DATABASE_URL -> DATABASE_URL, ...
        replicas.init_app(app)           # or init_app(app, router=ReplicaRouter(...))
        return app

``init_app`` wraps ``app.wsgi_app`` in the WSGI
:class:`~sqlalchemy_replicas.integrations.wsgi.CausalMiddleware` and
registers the router in ``app.extensions["sqlalchemy_replicas"]``. Session
makers made before any app exists (Flask-SQLAlchemy's, at import time) take
:func:`current_router` as their ``router``: each session then routes through
its app's router. No I/O of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import flask
from flask.globals import app_ctx
from sqlalchemy.engine import Engine
from sqlalchemy.orm import scoped_session, sessionmaker

from ..consistency import ConsistencyLevel
from ..exc import ConfigurationError, ReplicasError
from ..router import ReplicaRouter
from ..session import RoutingSession
from .wsgi import CausalMiddleware, StickyKeyFunction

__all__ = ["EXTENSION_KEY", "Replicas", "ReplicasState", "current_router"]

#: The key of the extension's state in ``app.extensions``.
EXTENSION_KEY: Final = "sqlalchemy_replicas"

#: app.config keys the extension reads, and the CausalMiddleware option each
#: sets. ``COOKIE_SECURE`` (as Flask's ``SESSION_COOKIE_SECURE``) rather than
#: ``SECURE``: ``ReplicaRouter.from_settings`` would take that for a
#: misspelt ``SECRET``.
COOKIE_NAME_KEY: Final = "SQLALCHEMY_REPLICAS_COOKIE_NAME"  # cookie_name
HEADER_NAME_KEY: Final = "SQLALCHEMY_REPLICAS_HEADER_NAME"  # header_name
COOKIE_SECURE_KEY: Final = "SQLALCHEMY_REPLICAS_COOKIE_SECURE"  # secure
METHOD_CONSISTENCY_KEY: Final = "SQLALCHEMY_REPLICAS_METHOD_CONSISTENCY"  # method_consistency
_CONFIG_OPTIONS: Final = {
    COOKIE_NAME_KEY: "cookie_name",
    HEADER_NAME_KEY: "header_name",
    COOKIE_SECURE_KEY: "secure",
    METHOD_CONSISTENCY_KEY: "method_consistency",
}


@dataclass(frozen=True)
class ReplicasState:
    """What ``app.extensions["sqlalchemy_replicas"]`` holds for one app."""

    router: ReplicaRouter[Engine]
    middleware: CausalMiddleware


def _state(app: flask.Flask) -> ReplicasState:
    state = app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, ReplicasState):
        raise ConfigurationError(
            f"the Flask app {app.name!r} has no sqlalchemy-replicas router: call "
            "Replicas().init_app(app, router=...) in the app factory"
        )
    return state


def current_router() -> ReplicaRouter[Engine]:
    """The current Flask app's router.

    A :data:`~sqlalchemy_replicas.session.RouterProvider`: give it as
    ``router=`` to a session maker made before the app (Flask-SQLAlchemy's
    ``session_options``), and each session routes through the router of the
    app it is created in.

    :raises ReplicasError: outside an application context.
    :raises ConfigurationError: when the current app has no router
        (``init_app`` was not called for it).
    """
    if not flask.has_app_context():
        raise ReplicasError(
            "current_router() needs a Flask application context (a request, a CLI "
            "command, or `with app.app_context():`) to know which app's router to use"
        )
    return _state(flask.current_app).router


def _app_context_id() -> int:
    """The scope of :attr:`Replicas.session`: one session per app context, as
    Flask-SQLAlchemy's ``db.session``."""
    # app_ctx is a proxy typed as the AppContext it stands for; the object
    # behind it is what identifies the context (Flask-SQLAlchemy does the same).
    return id(app_ctx._get_current_object())  # type: ignore[attr-defined]


class Replicas:
    """The Flask extension: a router per app, and the causal middleware.

    :param app: an app to initialise now (else call :meth:`init_app`).
    :param router: with ``app``, passed to :meth:`init_app`.
    :param session_options: keyword arguments of :attr:`session`'s sessions
        (``class_=`` a subclass of :class:`~sqlalchemy_replicas.RoutingSession`,
        ``consistency=``, ``expire_on_commit=``, ...).

    One ``Replicas`` object serves any number of apps (an app factory, a test
    suite that makes an app per test): each app keeps its own router.
    """

    def __init__(
        self,
        app: flask.Flask | None = None,
        *,
        router: ReplicaRouter[Engine] | None = None,
        session_options: Mapping[str, Any] | None = None,
    ) -> None:
        options = dict(session_options or {})
        if "router" in options:
            raise ConfigurationError(
                "session_options must not contain router: each session routes through "
                "its app's router (init_app(app, router=...))"
            )
        session_class: type[RoutingSession] = options.pop("class_", RoutingSession)
        #: A ``scoped_session`` for apps without Flask-SQLAlchemy: one session
        #: per application context (each request has its own), through that
        #: app's router, removed when the context ends.
        self.session: scoped_session[RoutingSession] = scoped_session(
            sessionmaker(class_=session_class, router=current_router, **options),
            scopefunc=_app_context_id,
        )
        if app is not None:
            self.init_app(app, router=router)

    def init_app(
        self,
        app: flask.Flask,
        *,
        router: ReplicaRouter[Engine] | None = None,
        sticky_key: StickyKeyFunction | None = None,
        method_consistency: Mapping[str, ConsistencyLevel] | None = None,
    ) -> None:
        """Give ``app`` its router and wrap its WSGI app in the causal middleware.

        Without ``router``, builds it from ``app.config`` with
        :meth:`ReplicaRouter.from_settings`: ``DATABASE_URL`` (else
        Flask-SQLAlchemy's ``SQLALCHEMY_DATABASE_URI``),
        ``DATABASE_REPLICA_URLS`` and ``SQLALCHEMY_REPLICAS_<OPTION>``
        (``SQLALCHEMY_REPLICAS_SECRET``, ``..._WAIT_TIMEOUT``, ...).

        Reads the middleware's options from ``app.config``:
        ``SQLALCHEMY_REPLICAS_COOKIE_NAME`` (``cookie_name``, default
        ``db_causal``), ``SQLALCHEMY_REPLICAS_HEADER_NAME`` (``header_name``,
        ``X-DB-Causal``), ``SQLALCHEMY_REPLICAS_COOKIE_SECURE`` (``secure``:
        True, False, or None, the default, for ``Secure`` on https requests)
        and ``SQLALCHEMY_REPLICAS_METHOD_CONSISTENCY``
        (``method_consistency``, a ``{method: level}`` mapping;
        ``method_consistency=`` wins).

        The router is the app's for its lifetime; ``router.dispose()`` when the
        app shuts down is yours (Flask has no shutdown hook). Sessions of
        :attr:`session` are removed when each app context ends.

        :param router: the app's router (default: from ``app.config``); it
            must be sync and have a ``secret``.
        :param sticky_key: given a request's WSGI environ, the key its reads
            stick to (see ``CausalMiddleware``).
        :param method_consistency: a default level per HTTP method.
        :raises ConfigurationError: for an app initialised twice, an async or
            secret-less router, or a missing or bad config value (naming it).
        """
        if EXTENSION_KEY in app.extensions:
            raise ConfigurationError(f"sqlalchemy-replicas is already set up on app {app.name!r}")
        if router is None:
            # The same names as the environment: DATABASE_URL (or
            # SQLALCHEMY_DATABASE_URI), DATABASE_REPLICA_URLS,
            # SQLALCHEMY_REPLICAS_<OPTION>.
            router = ReplicaRouter[Engine].from_settings(app.config)
        if not isinstance(router, ReplicaRouter):
            raise ConfigurationError(f"router must be a ReplicaRouter, not {type(router).__name__}")
        if router.is_async:
            raise ConfigurationError(
                "Flask views are synchronous: give init_app() a router of sync engines "
                "(postgresql+psycopg://, mariadb+pymysql://)"
            )
        # The middleware's options from app.config (an argument wins).
        configured: dict[str, Any] = {
            option: app.config[key] for key, option in _CONFIG_OPTIONS.items() if key in app.config
        }
        if method_consistency is not None:
            configured.pop("method_consistency", None)
        options = {"sticky_key": sticky_key, "method_consistency": method_consistency} | configured
        # A WSGI middleware rather than before/after_request hooks: the causal
        # context then spans everything the app does for the request,
        # teardown functions and a streamed body included (both run after
        # after_request), and the token goes into the final headers.
        try:
            middleware = CausalMiddleware(app.wsgi_app, router, **options)
        except ConfigurationError as error:
            # The middleware names its option; name the config key it came from.
            for key, option in _CONFIG_OPTIONS.items():
                if option in configured and str(error).startswith(option):
                    raise ConfigurationError(f"{key}: {error}") from None
            raise
        # Flask documents this assignment for WSGI middleware; mypy sees a method.
        app.wsgi_app = middleware  # type: ignore[method-assign]
        app.extensions[EXTENSION_KEY] = ReplicasState(router=router, middleware=middleware)
        app.teardown_appcontext(self._remove_session)

    def _remove_session(self, error: BaseException | None) -> None:
        self.session.remove()

    def get_router(self, app: flask.Flask | None = None) -> ReplicaRouter[Engine]:
        """``app``'s router (default: the current app's).

        :raises ConfigurationError: when that app was not initialised.
        """
        return current_router() if app is None else _state(app).router

    @property
    def router(self) -> ReplicaRouter[Engine]:
        """The current app's router."""
        return current_router()
