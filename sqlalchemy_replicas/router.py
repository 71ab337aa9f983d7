"""ReplicaRouter: one primary and its read replicas, and the sessions that use them."""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, cast, overload

from sqlalchemy import create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import sessionmaker
from typing_extensions import Self, TypeVar, Unpack

from . import _config, causal, zones
from . import settings as _settings
from ._asyncio import call_blocking, create_async_engine, is_async_engine, require_asyncio
from ._dependencies import missing_driver
from ._listeners import Listeners, weak_method
from .classify import Classifier
from .cluster import Cluster
from .connections import (
    dialect_family,
    install_monitor_connect,
    install_replica_guard,
    install_stale_connection_check,
)
from .consistency import (
    CausalScopeKind,
    ConsistencyLevel,
    validate_causal_scope,
    validate_level,
    validate_seconds,
)
from .discovery import PrimaryDiscovery
from .exc import ConfigurationError
from .monitor import ReplicaStatus
from .pipelining import pipeline_commits, pipeline_waits
from .positions import PositionBackend
from .rules import TableRules
from .session import RoutingSession
from .stats import RouterStats, StatsRecorder
from .targets import EngineSource, RoutedEngine

if TYPE_CHECKING:
    # Annotations only: importing the asyncio extension needs greenlet (see _asyncio).
    import sqlalchemy.ext.asyncio as sa_asyncio
    import sqlalchemy.orm as sa_orm
    from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

    from .settings import RouterOptions

__all__ = ["EngineSource", "ReplicaRouter", "RoutedEngine"]

_E = TypeVar("_E", bound="Engine | AsyncEngine", default=Engine, covariant=True)
"""The kind of engine a router hands out: ``Engine`` (the default) or ``AsyncEngine``."""
_S = TypeVar("_S", bound="RoutingSession", default="RoutingSession")
_AS = TypeVar("_AS", bound="AsyncSession", default="AsyncSession")


class ReplicaRouter(Generic[_E]):
    """A primary database and its read replicas.

    For type checkers the router is generic in the kind of engine it hands
    out (:attr:`primary`, :attr:`replicas`): ``ReplicaRouter[Engine]`` (also
    spelled plain ``ReplicaRouter``) or ``ReplicaRouter[AsyncEngine]``. Given
    an engine as the primary (or async engines in a replicas sequence), the
    kind is the engines'. A URL cannot tell a type checker whether its driver
    is async, so a router from URLs is a ``ReplicaRouter[Engine]`` unless you
    say otherwise: ``ReplicaRouter[AsyncEngine](url, ...)``, or an annotated
    variable. At run time the URL decides, as always, and only
    ``ReplicaRouter[AsyncEngine]`` has :meth:`async_sessionmaker` for type
    checkers, so a mistyped async router is caught at its session maker.

    :param primary: the primary, as a URL string, :class:`~sqlalchemy.engine.URL`,
        :class:`~sqlalchemy.engine.Engine` or
        :class:`~sqlalchemy.ext.asyncio.AsyncEngine`.
    :param replicas: the replicas, as a sequence of the same kinds (named
        ``replica1``, ``replica2``, ...) or a mapping of name to source. May be
        empty: then every statement goes to the primary.
    :param max_lag: seconds; a replica the lag monitor measures lagging more
        gets no reads until it is back under ``0.8 * max_lag``.
    :param wait_timeout: seconds a read may wait for a replica to catch up.
    :param default_consistency: the consistency level when nothing else says.
    :param secret: key that signs causal tokens (``str`` or ``bytes``).
    :param engine_options: keyword arguments for ``create_engine`` (or
        ``create_async_engine``) when URLs are given.
    :param name: names this database in causal tokens; routers with the same
        name and secret accept each other's tokens.
    :param writing_functions: names of your own SQL functions that write or
        take locks: statements calling them go to the primary.
    :param read_only_functions: function names safe on a replica although a
        built-in rule (:data:`~sqlalchemy_replicas.classify.WRITING_FUNCTIONS`)
        says otherwise.
    :param token_max_age: seconds a causal token stays acceptable; at least
        ``max_lag`` and 1 s (:data:`~sqlalchemy_replicas._config.MIN_TOKEN_MAX_AGE`):
        a token expiring sooner would let a replica within ``max_lag`` serve
        reads older than the token's commits.
    :param weights: replica name -> relative share of sticky keys (default 1
        each), e.g. ``{"replica1": 2.0}`` for a replica twice the size.
    :param lag_check_interval: seconds between the lag monitor's checks (it
        starts with the first routed read); at least 0.05
        (:data:`~sqlalchemy_replicas._config.MIN_LAG_CHECK_INTERVAL`).
    :param causal_scope: whose commits ``read_your_writes`` and ``monotonic``
        reads must see. ``"router"`` (the default): every commit acknowledged
        through this router before the read began, by any session, thread or
        task (Core commits through :attr:`primary` included), and everything
        the primary had committed when the router first served a read (one
        position query), so a process started after a migration or seed
        script never reads older than that. ``"session"``: only the
        session's own commits, plus the enclosing ``causal_context()`` and
        its token; more reads land on replicas without waiting, but a
        session does not see what another session of the app just
        committed unless a token or context carries it. Sessions may
        override it with ``RoutingSession(causal_scope=...)``.
    :param primary_candidates: the other servers (URLs, or engines whose URL
        is taken) that may become the primary after a failover. Each new
        primary connection goes to the candidate that accepts writes
        (PostgreSQL: not in recovery; MariaDB/MySQL: not ``read_only``), the
        configured primary first. A replica may be listed here too. When no
        candidate qualifies, primary connections raise
        :class:`~sqlalchemy_replicas.exc.PrimaryUnavailable`.
    :param rules: per-table consistency: table name (``"orders"``, or
        ``"schema.orders"``), ``Table`` or mapped class -> level, e.g.
        ``{"orders": "strong", Product: "eventual"}``. A read's level is the
        strictest rule of the tables it reads (strong, monotonic,
        read_your_writes, bounded, eventual), a table without a rule
        counting at the level that applies otherwise; a statement option or
        a ``consistency()`` block wins over rules, rules win over session
        and router defaults. Tables' ``info`` may hold rules too
        (:func:`~sqlalchemy_replicas.table_consistency`); these win over them.
    :param zone: the zone (availability zone, data centre) this application
        runs in, e.g. ``"eu-west-1a"``: reads prefer the replicas that
        ``replica_zones`` puts there, and go to the others only when none of
        those may serve (docs/zones.md). None: no zone preference.
    :param replica_zones: replica name -> its zone, e.g.
        ``{"replica1": "eu-west-1a", "replica2": "eu-west-1b"}``; a replica
        left out is in no zone (never local).
    :raises ConfigurationError: for a bad URL (a malformed port included),
        mixed dialects, mixed sync and async sources, a negative number, an
        unknown consistency level, ``replicas`` that is not a sequence or a
        mapping of str names (``"primary"`` and ``""`` are reserved), the
        primary's URL or one server twice among the replicas, ``engine_options``
        or ``weights`` that are not mappings, an engine option
        ``create_engine()`` does not take, a value below a documented floor,
        ``weights`` or ``replica_zones`` naming an unknown replica, or a zone
        (``zone``, a value of ``replica_zones``) that is not a non-empty str.
    """

    # The overloads differ only in ``self`` and the sources' types (URLs alone
    # leave the engine kind to the default or to ReplicaRouter[AsyncEngine](...)).
    # Keep the keyword arguments identical in all four signatures.
    @overload
    def __init__(
        self,
        primary: str | URL,
        replicas: Iterable[str | URL] | Mapping[str, str | URL] = (),
        *,
        max_lag: float = 5.0,
        wait_timeout: float = 0.5,
        default_consistency: ConsistencyLevel = "read_your_writes",
        secret: str | bytes | None = None,
        engine_options: Mapping[str, Any] | None = None,
        name: str = "default",
        writing_functions: Iterable[str] = (),
        read_only_functions: Iterable[str] = (),
        token_max_age: float = 86400.0,
        weights: Mapping[str, float] | None = None,
        lag_check_interval: float = 1.0,
        primary_candidates: Iterable[EngineSource] = (),
        causal_scope: CausalScopeKind = "router",
        rules: Mapping[Any, ConsistencyLevel] | None = None,
        zone: str | None = None,
        replica_zones: Mapping[str, str] | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self: ReplicaRouter[Engine],
        primary: str | URL | Engine,
        replicas: Iterable[str | URL | Engine] | Mapping[str, str | URL | Engine] = (),
        *,
        max_lag: float = 5.0,
        wait_timeout: float = 0.5,
        default_consistency: ConsistencyLevel = "read_your_writes",
        secret: str | bytes | None = None,
        engine_options: Mapping[str, Any] | None = None,
        name: str = "default",
        writing_functions: Iterable[str] = (),
        read_only_functions: Iterable[str] = (),
        token_max_age: float = 86400.0,
        weights: Mapping[str, float] | None = None,
        lag_check_interval: float = 1.0,
        primary_candidates: Iterable[EngineSource] = (),
        causal_scope: CausalScopeKind = "router",
        rules: Mapping[Any, ConsistencyLevel] | None = None,
        zone: str | None = None,
        replica_zones: Mapping[str, str] | None = None,
    ) -> None: ...
    @overload
    def __init__(
        self: ReplicaRouter[AsyncEngine],
        primary: str | URL | AsyncEngine,
        replicas: Iterable[str | URL | AsyncEngine] | Mapping[str, str | URL | AsyncEngine] = (),
        *,
        max_lag: float = 5.0,
        wait_timeout: float = 0.5,
        default_consistency: ConsistencyLevel = "read_your_writes",
        secret: str | bytes | None = None,
        engine_options: Mapping[str, Any] | None = None,
        name: str = "default",
        writing_functions: Iterable[str] = (),
        read_only_functions: Iterable[str] = (),
        token_max_age: float = 86400.0,
        weights: Mapping[str, float] | None = None,
        lag_check_interval: float = 1.0,
        primary_candidates: Iterable[EngineSource] = (),
        causal_scope: CausalScopeKind = "router",
        rules: Mapping[Any, ConsistencyLevel] | None = None,
        zone: str | None = None,
        replica_zones: Mapping[str, str] | None = None,
    ) -> None: ...
    def __init__(
        self,
        primary: EngineSource,
        replicas: Iterable[EngineSource] | Mapping[str, EngineSource] = (),
        *,
        max_lag: float = 5.0,
        wait_timeout: float = 0.5,
        default_consistency: ConsistencyLevel = "read_your_writes",
        secret: str | bytes | None = None,
        engine_options: Mapping[str, Any] | None = None,
        name: str = "default",
        writing_functions: Iterable[str] = (),
        read_only_functions: Iterable[str] = (),
        token_max_age: float = 86400.0,
        weights: Mapping[str, float] | None = None,
        lag_check_interval: float = 1.0,
        primary_candidates: Iterable[EngineSource] = (),
        causal_scope: CausalScopeKind = "router",
        rules: Mapping[Any, ConsistencyLevel] | None = None,
        zone: str | None = None,
        replica_zones: Mapping[str, str] | None = None,
    ) -> None:
        max_lag = validate_seconds(max_lag, argument="max_lag")
        wait_timeout = validate_seconds(wait_timeout, argument="wait_timeout")
        token_max_age = validate_seconds(token_max_age, argument="token_max_age")
        lag_check_interval = validate_seconds(lag_check_interval, argument="lag_check_interval")
        _config.check_lag_check_interval(lag_check_interval)
        _config.check_token_max_age(token_max_age, max_lag)
        self.default_consistency = validate_level(
            default_consistency, argument="default_consistency"
        )
        self.causal_scope: CausalScopeKind = validate_causal_scope(
            causal_scope, argument="causal_scope"
        )
        if secret is not None and not isinstance(secret, (str, bytes)):
            raise ConfigurationError(f"secret must be str or bytes, not {type(secret).__name__}")
        if secret is not None and len(secret) == 0:
            raise ConfigurationError("secret must not be empty; pass None to disable tokens")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"name must be a non-empty str, not {name!r}")
        self.name = name
        options = _config.check_engine_options(engine_options)
        _config.check_replicas(replicas)
        _config.check_weights(weights)

        candidates = _as_list(primary_candidates, "primary_candidates")
        # After a failover every pooled primary connection is dead: pinging on
        # checkout lets the first write find the new primary instead of failing.
        primary_options = {"pool_pre_ping": True, **options} if candidates else options
        self._primary = _routed("primary", primary, primary_options)
        named = (
            list(replicas.items())
            if isinstance(replicas, Mapping)
            else [
                (f"replica{i}", src)
                for i, src in enumerate(_as_list(replicas, "replicas"), start=1)
            ]
        )
        self._replicas = tuple(_routed(n, src, options) for n, src in named)
        self._check_uniform()
        _config.check_distinct_servers(
            self._primary.sync_engine.url, [(r.name, r.sync_engine.url) for r in self._replicas]
        )
        # Everything attached to the engines goes through here, so that
        # dispose() leaves them as they were; listeners that need the router
        # hold it weakly (see _listeners).
        self._listeners = Listeners()
        discovery = PrimaryDiscovery(
            [
                self._primary.sync_engine.url,
                *_candidate_urls(candidates, self._primary.sync_engine),
            ],
            weak_method(self._primary_moved, None),
        )
        discovery.install(self._primary.sync_engine, self._listeners)
        #: The zone this application runs in (None: no zone preference).
        self.zone = zones.check_zone(zone)
        #: Replica name -> zone, for the replicas given one (read-only).
        self.replica_zones: Mapping[str, str] = MappingProxyType(
            zones.check_replica_zones(replica_zones, self.replica_names)
        )
        #: The state this router's sessions, causal scopes and lag monitor
        #: share (internal: the router is the public face).
        self.cluster = Cluster(
            name=name,
            primary=self._primary,
            replicas=self._replicas,
            discovery=discovery,
            listeners=self._listeners,
            secret=secret,
            token_max_age=token_max_age,
            max_lag=max_lag,
            wait_timeout=wait_timeout,
            lag_check_interval=lag_check_interval,
            weights=_weights(weights, self.replica_names),
            replica_zones=self.replica_zones,
            local=zones.local_replicas(self.replica_names, self.replica_zones, self.zone),
        )
        family = dialect_family(self._primary.sync_engine)
        self.classifier = Classifier(
            "postgresql" if family == "postgresql" else "mysql" if family == "mysql" else "generic",
            writing_functions=writing_functions,
            read_only_functions=read_only_functions,
        )
        #: Per-table consistency rules (``rules=`` and tables' info).
        self.table_rules = TableRules(
            rules, classifier=self.classifier, dialect=self._primary.sync_engine.dialect
        )
        for replica in self._replicas:
            install_replica_guard(replica.sync_engine, listeners=self._listeners)
            pipeline_waits(replica.sync_engine, self._listeners)  # waits travel with reads
            install_stale_connection_check(
                replica.sync_engine,
                self.cluster.down_since(replica.name),
                listeners=self._listeners,
            )
        for routed in (self._primary, *self._replicas):
            install_monitor_connect(routed.sync_engine, self._listeners)
        if self._replicas and family in ("postgresql", "mysql"):  # it has positions
            # Until the primary tells its current position, the router's
            # reads go to the primary (see Cluster.process_scope).
            self.cluster.process_scope.mark_unknown(self.cluster)
        if self._replicas:  # else no commit's position is ever read
            pipeline_commits(self._primary.sync_engine, self._listeners, owned=self._primary.owned)
        self._listeners.listen_pool(
            self._primary.sync_engine, "reset", weak_method(self.cluster.capture_core_commit, None)
        )
        # A router dropped without dispose(): close the idle connections of
        # the sync engines it created, on the driver's terms (a DBAPI
        # connection left to the garbage collector is closed with a
        # ResourceWarning, or not at all while something still holds it).
        # Async connections cannot be closed outside their event loop:
        # those routers need adispose().
        weakref.finalize(
            self,
            _close_idle_connections,
            [r.sync_engine for r in (self._primary, *self._replicas) if r.owned and not r.is_async],
        )

    # -- from settings ------------------------------------------------------------

    @classmethod
    def from_env(
        cls,
        *,
        prefix: str = "",
        environ: Mapping[str, str] | None = None,
        **overrides: Unpack[RouterOptions],
    ) -> Self:
        """A router configured by environment variables.

        ``DATABASE_URL`` (else ``SQLALCHEMY_DATABASE_URI``) is the primary,
        ``DATABASE_REPLICA_URLS`` the replicas (comma-separated URLs, or
        ``name=URL`` pairs), and ``SQLALCHEMY_REPLICAS_<OPTION>`` each option
        of the constructor, e.g. ``SQLALCHEMY_REPLICAS_WAIT_TIMEOUT=0.3``
        (docs/configuration.md lists them all, with their formats).

        ``ReplicaRouter[AsyncEngine].from_env()`` is typed as an async router
        (the URLs decide at run time, as for the constructor).

        :param prefix: put in front of every name, for an app with several
            databases: ``prefix="ANALYTICS_"`` reads ``ANALYTICS_DATABASE_URL``,
            ``ANALYTICS_DATABASE_REPLICA_URLS``,
            ``ANALYTICS_SQLALCHEMY_REPLICAS_MAX_LAG``, ...
        :param environ: the variables to read (default ``os.environ``).
        :param overrides: constructor arguments (``primary``, ``replicas``,
            ``engine_options``, ...) that win over the variables.
        :raises ConfigurationError: naming the variable and the fix (a secret
            or a password is never echoed); for a missing primary, the names
            looked for.
        """
        arguments = _settings.from_environ(
            os.environ if environ is None else environ, prefix=prefix, overrides=overrides
        )
        return cls(arguments.primary, arguments.replicas, **arguments.options)

    @classmethod
    def from_settings(
        cls, settings: object, *, prefix: str = "", **overrides: Unpack[RouterOptions]
    ) -> Self:
        """A router configured by a settings mapping or object, with the names
        of :meth:`from_env`: Flask's ``app.config`` or a dict (upper-case keys,
        then lower-case), a pydantic-settings ``BaseSettings`` or a module
        (lower-case attributes such as ``database_url``, then upper-case).
        Values may be typed already (numbers, lists, mappings, pydantic's
        ``SecretStr`` and URL types); strings are read as in the environment.

        :param settings: the mapping or object.
        :param prefix: as for :meth:`from_env`.
        :param overrides: constructor arguments that win over the settings.
        :raises ConfigurationError: naming the key or attribute and the fix.
        """
        arguments = _settings.from_settings(settings, prefix=prefix, overrides=overrides)
        return cls(arguments.primary, arguments.replicas, **arguments.options)

    # -- public -------------------------------------------------------------

    @property
    def primary(self) -> _E:
        """The primary's engine (an ``AsyncEngine`` when the router is async)."""
        return cast("_E", self._primary.engine)

    @property
    def primary_url(self) -> str:
        """Where primary connections go now, without the password: the
        configured primary, or the ``primary_candidates`` entry that last
        answered as the primary."""
        return self.cluster.primary_url

    @property
    def primary_candidates(self) -> tuple[URL, ...]:
        """The URLs primary connections may go to: the configured primary,
        then ``primary_candidates``. They hold the passwords: render them
        with ``hide_password=True``."""
        return self.cluster.discovery.candidates

    def _primary_moved(self, url: URL) -> None:
        self.cluster.primary_moved()

    @property
    def replicas(self) -> tuple[_E, ...]:
        """The replicas' engines, in configuration order."""
        return tuple(cast("_E", r.engine) for r in self._replicas)

    @property
    def primary_target(self) -> RoutedEngine:
        """The primary as a routing target (its name, engine and sync engine)."""
        return self._primary

    @property
    def replica_targets(self) -> tuple[RoutedEngine, ...]:
        """The replicas as routing targets, in configuration order."""
        return self._replicas

    @property
    def replica_names(self) -> tuple[str, ...]:
        """The replicas' names, in configuration order."""
        return tuple(r.name for r in self._replicas)

    @property
    def is_async(self) -> bool:
        """True when the router was given async URLs or ``AsyncEngine`` objects."""
        return self._primary.is_async

    def sessionmaker(
        self: ReplicaRouter[Engine], *, class_: type[_S] | None = None, **session_kwargs: Any
    ) -> sa_orm.sessionmaker[_S]:
        """Return a :class:`~sqlalchemy.orm.sessionmaker` of :class:`RoutingSession`,
        or of ``class_``: typed ``sessionmaker[AppSession]`` for
        ``class_=AppSession``, so the subclass keeps its own methods for type
        checkers too.

        :param class_: :class:`RoutingSession` (the default) or a subclass of it,
            e.g. ``class AppSession(RoutingSession, sqlmodel.Session)``.
        :param session_kwargs: passed to every session, as for ``sessionmaker``.
        :raises ConfigurationError: when the router is async (for type
            checkers: only a ``ReplicaRouter[Engine]`` has this method), or
            (here, not at the first session) for an argument no session class
            takes or an unknown ``consistency``.
        """
        if self.is_async:
            raise ConfigurationError(
                "this router was configured with async engines; use "
                "router.async_sessionmaker() instead of router.sessionmaker()"
            )
        chosen: type[Any] = RoutingSession
        if class_ is not None:
            chosen = class_
        _require_routing_class(chosen, "class_")
        _config.check_session_kwargs([chosen], session_kwargs, method="sessionmaker")
        return sessionmaker(class_=chosen, router=self, **session_kwargs)

    def async_sessionmaker(
        self: ReplicaRouter[AsyncEngine],
        *,
        class_: type[_AS] | None = None,
        sync_session_class: type[RoutingSession] | None = None,
        **session_kwargs: Any,
    ) -> sa_asyncio.async_sessionmaker[_AS]:
        """Return an :class:`~sqlalchemy.ext.asyncio.async_sessionmaker` whose
        sessions route through :class:`RoutingSession`: typed
        ``async_sessionmaker[AsyncSession]``, or
        ``async_sessionmaker[AppAsyncSession]`` for ``class_=AppAsyncSession``.

        :param class_: the ``AsyncSession`` class (default ``AsyncSession``)
            or a subclass of it.
        :param sync_session_class: :class:`RoutingSession` (the default) or a
            subclass of it, the sync session each async session wraps.
        :param session_kwargs: passed to every session.
        :raises ConfigurationError: when the router is not async (for type
            checkers: only a ``ReplicaRouter[AsyncEngine]`` has this method;
            for async URLs write ``ReplicaRouter[AsyncEngine](url, ...)``).
        :raises MissingDependency: when greenlet is not installed (the
            ``[asyncio]`` extra).
        """
        require_asyncio("router.async_sessionmaker()")
        import sqlalchemy.ext.asyncio as async_ext

        if not self.is_async:
            raise ConfigurationError(
                "this router was configured with sync engines; use router.sessionmaker(), "
                "or give async URLs (e.g. postgresql+psycopg_async://, mysql+aiomysql://) "
                "or AsyncEngine objects for router.async_sessionmaker()"
            )
        sync_class = RoutingSession if sync_session_class is None else sync_session_class
        _require_routing_class(sync_class, "sync_session_class")
        if class_ is not None:
            session_kwargs["class_"] = class_
        _config.check_session_kwargs(
            [session_kwargs.get("class_", async_ext.AsyncSession), sync_class],
            session_kwargs,
            method="async_sessionmaker",
            factory_arguments=["class_"],
        )
        return async_ext.async_sessionmaker(
            sync_session_class=sync_class, router=self, **session_kwargs
        )

    @property
    def secret(self) -> str | bytes | None:
        """The key that signs this router's causal token entries."""
        return self.cluster.secret

    @property
    def positions(self) -> PositionBackend | None:
        """The replication-position backend of this database, or None for a
        database without one (e.g. SQLite). MySQL and MariaDB share a
        dialect, so telling them apart may connect to the primary once; an
        async router asked outside its event loop's greenlet (``status()``
        from a coroutine) cannot connect there, and returns None until the
        lag monitor's own connection tells."""
        return self.cluster.positions

    @property
    def max_lag(self) -> float:
        """Seconds of lag past which a replica gets no reads."""
        return self.cluster.max_lag

    @property
    def wait_timeout(self) -> float:
        """Seconds a read may wait for a replica to catch up."""
        return self.cluster.wait_timeout

    @property
    def token_max_age(self) -> float:
        """Seconds a causal token stays acceptable."""
        return self.cluster.token_max_age

    @property
    def lag_check_interval(self) -> float:
        """Seconds between the lag monitor's checks."""
        return self.cluster.lag_check_interval

    @property
    def ignore_lag(self) -> bool:
        """Operator switch: route reads to lagging replicas too (say, when
        the primary is overloaded). Unreachable replicas still get none."""
        return self.cluster.ignore_lag

    @ignore_lag.setter
    def ignore_lag(self, value: bool) -> None:
        self.cluster.ignore_lag = value

    @property
    def stats_recorder(self) -> StatsRecorder:
        """The live counters behind :meth:`stats` (sessions and the lag
        monitor update them)."""
        return self.cluster.stats_recorder

    def start(self) -> None:
        """Read the start of the router's causal scope (the primary's current
        position) and start the lag monitor now, instead of at the first read.

        Optional: call it at application start-up (a FastAPI lifespan, a
        Flask app factory) so that the first request does not pay the one
        position query; tests that count statements call it before counting.
        Calling it again costs nothing.

        :raises Exception: whatever the driver raises when the primary is
            unreachable (the first read then tries again).
        """
        if self.is_async:
            raise ConfigurationError(
                "this router was configured with async engines; use await router.astart()"
            )
        self._start()

    async def astart(self) -> None:
        """:meth:`start` for routers with async engines."""
        from sqlalchemy.util import greenlet_spawn

        await greenlet_spawn(self._start)

    def _start(self) -> None:
        cluster = self.cluster
        _, unknown = cluster.process_scope.target(cluster)
        if unknown:  # the primary did not answer: raise its error here
            cluster.current_position()
        monitor = cluster.ensure_monitor()
        if monitor is not None and not monitor.all_checked:
            # The first round: the primary's check, then the replicas' (each
            # bounded by check_timeout), so the first request finds them known.
            call_blocking(
                monitor.await_first_checks, list(self.replica_names), 2 * monitor.check_timeout
            )

    def dispose(self) -> None:
        """Stop the lag monitor; remove every event listener the router added
        to engines and pools (and undo the settings it changed); close the
        pools of the engines this router created from URLs.

        Engines passed in by the caller belong to the caller and are left
        open, as they were before the router. A disposed router is done
        with: build a new one to route again.
        """
        self.cluster.disposed = True
        self.cluster.stop_monitor()
        self._listeners.remove_all()
        for routed in (self._primary, *self._replicas):
            if not routed.owned:
                continue
            if routed.is_async:
                # Closing async connections needs the event loop: drop the pool
                # here, and let adispose() close connections properly.
                routed.sync_engine.dispose(close=False)
            else:
                routed.sync_engine.dispose()

    async def adispose(self) -> None:
        """Like :meth:`dispose`, closing async engines' connections properly."""
        self.cluster.disposed = True
        self.cluster.stop_monitor()
        self._listeners.remove_all()
        for routed in (self._primary, *self._replicas):
            if routed.owned:
                engine = routed.engine
                if isinstance(engine, Engine):
                    engine.dispose()
                else:
                    await engine.dispose()

    def __repr__(self) -> str:
        return (
            f"ReplicaRouter(name={self.name!r}, primary={self._primary.safe_url}, "
            f"replicas=[{', '.join(r.safe_url for r in self._replicas)}])"
        )

    @property
    def disposed(self) -> bool:
        """Whether :meth:`dispose` (or :meth:`adispose`) was called."""
        return self.cluster.disposed

    def status(self) -> list[ReplicaStatus]:
        """Each replica as the lag monitor last saw it: name, URL without the
        password, healthy, lag_seconds, applied position, reason when left out;
        the reads sent elsewhere because its pool was full; its zone.
        Starts the monitor if it is not running (the first call may show no
        measurement yet)."""
        return self.cluster.status()

    def stats(self) -> RouterStats:
        """A snapshot of the routing counters since the router was created
        (or :meth:`reset_stats`): decisions by target kind, reason code and
        level; causal waits (outcomes, total time, a histogram); fallbacks to
        the primary by cause; reruns; replicas marked down and readmitted;
        and causal tokens rejected in this process, by reason.
        See :class:`~sqlalchemy_replicas.stats.RouterStats`. No I/O."""
        with causal._rejected_lock:
            rejected = dict(causal.rejected_tokens)
        return self.stats_recorder.snapshot(rejected)

    def reset_stats(self) -> None:
        """Count from zero again (the process-wide rejected token counts excepted)."""
        self.stats_recorder.reset()

    # -- helpers ------------------------------------------------------------------

    def _check_uniform(self) -> None:
        family = dialect_family(self._primary.sync_engine)
        pools = {id(self._primary.sync_engine.pool): "primary"}
        for replica in self._replicas:
            shared = pools.setdefault(id(replica.sync_engine.pool), replica.name)
            if shared != replica.name:
                raise ConfigurationError(
                    f"replica {replica.name!r} is the same engine (connection pool) as "
                    f"{shared!r}; replica connections are made read-only, so give each "
                    "server its own engine or URL"
                )
            if dialect_family(replica.sync_engine) != family:
                raise ConfigurationError(
                    f"replica {replica.name!r} uses the "
                    f"{replica.sync_engine.dialect.name!r} dialect but the primary uses "
                    f"{self._primary.sync_engine.dialect.name!r}; every replica must "
                    "replicate from the primary, so all must be the same database kind"
                )
            if replica.is_async != self.is_async:
                kind = "async" if self.is_async else "sync"
                raise ConfigurationError(
                    f"replica {replica.name!r} is not {kind} like the primary; give all "
                    "URLs with sync drivers (e.g. postgresql+psycopg://) or all with async "
                    "drivers (e.g. postgresql+psycopg_async://)"
                )


def _close_idle_connections(engines: list[Engine]) -> None:
    """The finalizer of a router dropped without ``dispose()``."""
    for engine in engines:
        # The pool only: Engine.dispose() would make a new pool, and runs
        # the application's engine_disposed listeners from the collector.
        engine.pool.dispose()


def _candidate_urls(candidates: list[EngineSource], primary: Engine) -> list[URL]:
    """The URLs of ``primary_candidates``, checked against the primary's dialect."""
    urls = []
    for index, source in enumerate(candidates):
        routed = _routed(f"primary_candidates[{index}]", source, {})
        if dialect_family(routed.sync_engine) != dialect_family(primary):
            raise ConfigurationError(
                f"primary_candidates[{index}] uses the {routed.sync_engine.dialect.name!r} "
                f"dialect but the primary uses {primary.dialect.name!r}; a candidate is "
                "the same database cluster, so the same kind"
            )
        urls.append(routed.sync_engine.url)
        if routed.owned:
            routed.sync_engine.dispose()
    return urls


def _as_list(sources: Iterable[EngineSource], argument: str) -> list[EngineSource]:
    if isinstance(sources, (str, URL, Engine)) or is_async_engine(sources):
        mapping = " (or a mapping of name to URL/engine)" if argument == "replicas" else ""
        raise ConfigurationError(
            f"{argument} must be a sequence of URLs or engines{mapping}, not a single "
            f"{type(sources).__name__}; wrap it: {argument}=[...]"
        )
    return list(sources)


def _routed(name: str, source: object, options: dict[str, Any]) -> RoutedEngine:
    engine: Engine | AsyncEngine
    owned = False
    if isinstance(source, Engine) or is_async_engine(source):
        engine = source
    elif isinstance(source, (str, URL)):
        try:
            url = make_url(source)
            is_async = url.get_dialect().is_async
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ValueError) as exc:
            raise ConfigurationError(
                f"{name}: {_describe_source(source)} is not a usable database URL "
                f"({_config.url_problem(exc)}); "
                "expected e.g. 'postgresql+psycopg://user:pass@host:5432/db' or "
                "'mysql+pymysql://user:pass@host:3306/db'"
            ) from exc
        try:
            engine = (
                create_async_engine(url, name, **options)
                if is_async
                else create_engine(url, **options)
            )
        except ImportError as exc:
            # The DBAPI driver (psycopg, pymysql, aiomysql) is not installed.
            raise missing_driver(exc, url, name) from exc
        except TypeError as exc:  # SQLAlchemy: "Invalid argument(s) ... sent to create_engine()"
            raise ConfigurationError(
                f"engine_options are not valid for {name} "
                f"({url.render_as_string(hide_password=True)}): {exc}"
            ) from exc
        owned = True
    else:
        raise ConfigurationError(
            f"{name} must be a URL string, sqlalchemy URL, Engine or AsyncEngine, "
            f"not {type(source).__name__}"
        )
    sync_engine = engine if isinstance(engine, Engine) else engine.sync_engine
    return RoutedEngine(name, engine, sync_engine, owned)


def _describe_source(source: str | URL) -> str:
    if isinstance(source, URL):
        return source.render_as_string(hide_password=True)
    try:
        return make_url(source).render_as_string(hide_password=True)
    except (sa_exc.ArgumentError, ValueError):
        # An unparseable string may still carry credentials: never echo them.
        return repr("***@" + source.rsplit("@", 1)[1]) if "@" in source else repr(source)


def _weights(weights: Mapping[str, float] | None, names: tuple[str, ...]) -> tuple[float, ...]:
    given = dict(weights or {})
    if unknown := set(given) - set(names):
        raise ConfigurationError(
            f"weights name unknown replicas {sorted(unknown)}; the replicas are {list(names)}"
        )
    for name, weight in given.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigurationError(f"weights[{name!r}] must be a number, not {weight!r}")
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigurationError(f"weights[{name!r}]={weight!r} is invalid; give a number > 0")
    return tuple(float(given.get(name, 1.0)) for name in names)


def _require_routing_class(cls: object, argument: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, RoutingSession)):
        raise ConfigurationError(
            f"{argument}={cls!r} must be RoutingSession or a subclass of it "
            "(class AppSession(RoutingSession, YourSession): ...)"
        )
