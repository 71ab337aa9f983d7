"""ReplicaRouter and RoutingSession reject bad configuration where it is given."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import sqlalchemy_replicas as sr
from sqlalchemy_replicas import _config
from sqlalchemy_replicas.exc import ConfigurationError

PG = "postgresql+psycopg://u:secretpw@127.0.0.1:1/db"
PG2 = "postgresql+psycopg://u:secretpw@127.0.0.1:2/db"
PG3 = "postgresql+psycopg://u:secretpw@127.0.0.1:3/db"
PG_ASYNC = "postgresql+psycopg_async://u:secretpw@127.0.0.1:1/db"
PG2_ASYNC = "postgresql+psycopg_async://u:secretpw@127.0.0.1:2/db"
MARIADB = "mariadb+pymysql://u:secretpw@127.0.0.1:1/db"


def test_configuration_errors_are_sqlalchemy_argument_errors() -> None:
    """Users can catch configuration errors as sqlalchemy.exc.ArgumentError."""
    assert issubclass(ConfigurationError, sa_exc.ArgumentError)
    assert issubclass(sr.exc.ReplicasError, sa_exc.InvalidRequestError)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_lag": -1}, "max_lag=-1 is invalid"),
        ({"max_lag": float("nan")}, "max_lag=nan is invalid"),
        ({"wait_timeout": -0.5}, "wait_timeout=-0.5 is invalid"),
        ({"wait_timeout": "1"}, "wait_timeout must be a number"),
        ({"max_lag": True}, "max_lag must be a number"),
        ({"default_consistency": "bogus"}, "'bogus' is not a consistency level; use one of"),
        ({"secret": 42}, "secret must be str or bytes"),
        ({"secret": ""}, "secret must not be empty"),
        ({"name": ""}, "name must be a non-empty str"),
    ],
)
def test_bad_options_raise_naming_the_option(kwargs: dict[str, object], message: str) -> None:
    """Each bad option raises ConfigurationError naming the option and the fix."""
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(")):
        sr.ReplicaRouter(PG, [PG2], **kwargs)  # type: ignore[call-overload]


def test_bad_url_names_the_server_and_hides_the_password() -> None:
    """An unusable URL names which server it was for and never echoes the password."""
    with pytest.raises(ConfigurationError, match="replica1") as caught:
        sr.ReplicaRouter(PG, ["nosuchdriver://u:secretpw@h/db"])
    assert "secretpw" not in str(caught.value)
    with pytest.raises(ConfigurationError, match="primary") as caught:
        sr.ReplicaRouter("not a url at all u:secretpw@", [])
    assert "secretpw" not in str(caught.value)


def test_replicas_must_be_a_collection() -> None:
    """A single URL as replicas (a common slip) is rejected with the fix."""
    with pytest.raises(ConfigurationError, match=r"wrap it: replicas=\[\.\.\.\]"):
        sr.ReplicaRouter(PG, PG)


def test_wrong_source_type_is_rejected() -> None:
    """Sources must be URLs or engines."""
    with pytest.raises(ConfigurationError, match="replica1 must be a URL string"):
        sr.ReplicaRouter(PG, [42])  # type: ignore[list-item]


def test_replica_of_another_dialect_is_rejected() -> None:
    """All servers must be the same database kind as the primary."""
    with pytest.raises(ConfigurationError, match="'mariadb' dialect but the primary uses"):
        sr.ReplicaRouter(PG, [MARIADB])


def test_mixed_sync_and_async_sources_are_rejected() -> None:
    """A sync primary with an async replica (or the reverse) is rejected."""
    with pytest.raises(ConfigurationError, match="is not sync like the primary"):
        sr.ReplicaRouter(PG, [PG2_ASYNC])
    with pytest.raises(ConfigurationError, match="is not async like the primary"):
        sr.ReplicaRouter(PG_ASYNC, [PG2])


def test_sessionmaker_kind_must_match_the_engines() -> None:
    """sessionmaker() needs sync engines, async_sessionmaker() async ones (type
    checkers reject the wrong one too: tests/test_typing.py)."""
    sync_router = sr.ReplicaRouter(PG, [PG2])
    async_router = sr.ReplicaRouter(create_async_engine(PG_ASYNC), [PG2_ASYNC])
    with pytest.raises(ConfigurationError, match=r"use router\.sessionmaker"):
        sync_router.async_sessionmaker()  # type: ignore[misc]
    with pytest.raises(ConfigurationError, match=r"use router\.async_sessionmaker"):
        async_router.sessionmaker()  # type: ignore[misc]
    assert async_router.is_async
    assert not sync_router.is_async


def test_session_class_must_route() -> None:
    """A sessionmaker class_ (or an async maker's sync_session_class) that is not a
    RoutingSession would silently not route: refused at run time as by type checkers."""
    router = sr.ReplicaRouter(PG, [PG2])
    with pytest.raises(ConfigurationError, match=r"class_=.* must be RoutingSession or a sub"):
        router.sessionmaker(class_=Session)  # type: ignore[type-var]
    async_router = sr.ReplicaRouter(create_async_engine(PG_ASYNC))
    with pytest.raises(ConfigurationError, match=r"sync_session_class=.* must be RoutingSession"):
        async_router.async_sessionmaker(sync_session_class=Session)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="router must be a ReplicaRouter"):
        sr.RoutingSession(router="nope")  # type: ignore[arg-type]


def test_session_makers_make_the_classes_they_are_given() -> None:
    """sessionmaker(class_=X) makes X sessions (RoutingSession without class_), and
    async_sessionmaker(class_=Y, sync_session_class=Z) makes Y sessions around a Z,
    as their types say (tests/test_typing.py); ReplicaRouter[AsyncEngine](url)
    builds the same router as ReplicaRouter(url)."""

    class AppSession(sr.RoutingSession):
        pass

    class AppAsyncSession(AsyncSession):
        pass

    router = sr.ReplicaRouter(PG, [PG2])
    assert isinstance(router.sessionmaker()(), sr.RoutingSession)
    session = router.sessionmaker(class_=AppSession)()
    assert isinstance(session, AppSession)
    assert session.router is router
    async_router = sr.ReplicaRouter[AsyncEngine](PG_ASYNC, [PG2_ASYNC])
    assert isinstance(async_router.primary, AsyncEngine)
    assert isinstance(async_router.async_sessionmaker()().sync_session, sr.RoutingSession)
    make = async_router.async_sessionmaker(class_=AppAsyncSession, sync_session_class=AppSession)
    async_session = make()
    assert isinstance(async_session, AppAsyncSession)
    assert isinstance(async_session.sync_session, AppSession)
    router.dispose()
    async_router.dispose()


def test_binds_are_refused_rather_than_ignored() -> None:
    """binds= would be overridden by routing (rows written to the wrong database):
    the session refuses it, naming the alternative; bind= still works as is."""
    router = sr.ReplicaRouter(PG, [PG2])
    other = sa.create_engine(PG.replace(":1/", ":2/"))
    with pytest.raises(ConfigurationError, match="does not support binds="):
        router.sessionmaker(binds={sa.table("t"): other})()
    assert sr.RoutingSession(router=router, bind=other).get_bind() is other
    other.dispose()


def test_replicas_may_be_named_by_a_mapping() -> None:
    """A mapping of name to URL names the replicas."""
    router = sr.ReplicaRouter(PG, {"eu": PG2, "us": PG3})
    assert router.replica_names == ("eu", "us")
    assert "secretpw" not in repr(router)


def test_dispose_closes_only_engines_the_router_created() -> None:
    """The router disposes engines it made from URLs, not engines it was given."""
    given = sa.create_engine("sqlite://")
    router = sr.ReplicaRouter(given, ["sqlite://"])
    for engine in (given, router.replicas[0]):
        with engine.connect():
            pass
    given_pool, made_pool = given.pool, router.replicas[0].pool
    router.dispose()
    assert given.pool is given_pool
    assert router.replicas[0].pool is not made_pool


def test_bad_primary_candidates_are_rejected_where_given() -> None:
    """primary_candidates: a bare URL, another database kind or a bad URL raise
    ConfigurationError naming the entry; the password is never echoed."""
    with pytest.raises(ConfigurationError, match=r"wrap it: primary_candidates=\[\.\.\.\]"):
        sr.ReplicaRouter(PG, [], primary_candidates=PG)
    with pytest.raises(ConfigurationError, match=r"primary_candidates\[0\] uses the 'mariadb'"):
        sr.ReplicaRouter(PG, [], primary_candidates=[MARIADB])
    with pytest.raises(ConfigurationError, match=r"primary_candidates\[1\]") as caught:
        sr.ReplicaRouter(PG, [], primary_candidates=[PG, "nosuchdriver://u:secretpw@h/db"])
    assert "secretpw" not in str(caught.value)


def test_primary_url_names_the_configured_primary_without_its_password() -> None:
    """Before any failover, primary_url is the configured primary, password hidden."""
    router = sr.ReplicaRouter(PG, [], primary_candidates=[PG.replace(":1/", ":2/")])
    assert router.primary_url == "postgresql+psycopg://u:***@127.0.0.1:1/db"
    router.dispose()


PG_BAD_PORT = "postgresql+psycopg://u:secretpw@127.0.0.1:54x2/db"


@pytest.mark.parametrize(
    ("make", "argument", "fix"),
    [
        pytest.param(
            lambda: sr.ReplicaRouter(PG_BAD_PORT, []),
            "primary",
            "port must be a number",
            id="malformed-port-primary",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, [PG_BAD_PORT]),
            "replica1",
            "port must be a number",
            id="malformed-port-replica",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, None),  # type: ignore[call-overload]
            "replicas=None",
            "pass replicas=()",
            id="replicas-none",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, 3),  # type: ignore[call-overload]
            "replicas must be a sequence",
            "mapping of name to",
            id="replicas-not-iterable",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, [PG2], engine_options=["x"]),  # type: ignore[call-overload]
            "engine_options must be a mapping",
            "engine_options={'pool_size': 10}",
            id="engine-options-list",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, [PG2], engine_options={"pool_sizee": 3}),
            "engine_options are not valid for primary",
            "'pool_sizee'",
            id="engine-options-unknown",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, [PG2], weights="replica1"),  # type: ignore[call-overload]
            "weights must be a mapping",
            "weights={'replica1': 2.0}",
            id="weights-str",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, {1: PG2}),  # type: ignore[dict-item]
            "replica names (the keys of replicas) must be str",
            "replicas={'replica1': url}",
            id="replica-name-int",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, {"primary": PG2}),
            "replica name 'primary'",
            "name the replica otherwise",
            id="replica-name-primary",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, {"": PG2}),
            "replica name ''",
            "name each replica",
            id="replica-name-empty",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, [PG2, PG2]),
            "replica 'replica2'",
            "same server as replica 'replica1': give each replica once",
            id="same-replica-twice",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, [PG]),
            "replica 'replica1'",
            "is the primary's URL",
            id="primary-as-replica",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, {"eu": sa.create_engine(PG)}),
            "replica 'eu'",
            "for no replicas pass replicas=()",
            id="primary-as-replica-engine",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, [PG2]).sessionmaker(bogus=1),
            "unknown session argument(s) bogus",
            "the sessions accept: ",
            id="sessionmaker-unknown-argument",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, [PG2]).sessionmaker(consistency="bogus"),
            "consistency='bogus'",
            "use one of: strong",
            id="sessionmaker-bad-consistency",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, [PG2]).sessionmaker(router=None),
            "leave out router=",
            "router.sessionmaker() passes this router",
            id="sessionmaker-router",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter[AsyncEngine](PG_ASYNC, [PG2_ASYNC]).async_sessionmaker(
                bogus=1
            ),
            "router.async_sessionmaker() got unknown session argument(s) bogus",
            "the sessions accept: ",
            id="async-sessionmaker-unknown-argument",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, [PG2], token_max_age=0),
            "token_max_age=0",
            "give token_max_age >= 5",
            id="token-max-age-zero",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, [PG2], token_max_age=30, max_lag=60),
            "token_max_age=30",
            "give token_max_age >= 60",
            id="token-max-age-below-max-lag",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, [PG2], lag_check_interval=1e-9),
            "lag_check_interval=1e-09",
            "give at least 0.05 s",
            id="lag-check-interval-tiny",
        ),
        pytest.param(
            lambda: sr.ReplicaRouter(PG, [PG2], lag_check_interval=0),
            "lag_check_interval=0",
            "give at least 0.05 s",
            id="lag-check-interval-zero",
        ),
    ],
)
def test_configuration_fails_at_construction_naming_the_argument_and_the_fix(
    make: Callable[[], object], argument: str, fix: str
) -> None:
    """Each slip raises ConfigurationError where it is given (ReplicaRouter(...) or
    router.sessionmaker(...), not at the first session or query), naming the argument
    and the fix, and never echoing the password."""
    with pytest.raises(ConfigurationError) as caught:
        make()
    message = str(caught.value)
    assert argument in message
    assert fix in message
    assert "secretpw" not in message


def test_the_floors_and_distinct_servers_are_accepted() -> None:
    """Values at the documented floors, replicas that differ from the primary only by
    port or database, in-memory SQLite and engines whose URLs name no server (built
    with creator=), and session arguments of a RoutingSession subclass are accepted."""
    minimum = sr.ReplicaRouter(PG, [PG2], token_max_age=5.0, max_lag=5.0, lag_check_interval=0.05)
    assert (minimum.token_max_age, minimum.lag_check_interval) == (5.0, 0.05)
    other_database = PG.replace("/db", "/db2")
    same_host_default_port = "postgresql+psycopg://u@127.0.0.1/db"
    assert sr.ReplicaRouter(PG, [other_database, same_host_default_port]).replica_names == (
        "replica1",
        "replica2",
    )
    assert len(sr.ReplicaRouter("sqlite://", ["sqlite://", "sqlite://"]).replicas) == 2
    creator = "postgresql+psycopg://"
    engines = [sa.create_engine(creator, creator=lambda: None) for _ in range(3)]
    assert len(sr.ReplicaRouter(engines[0], engines[1:]).replicas) == 2

    class TenantSession(sr.RoutingSession):
        def __init__(self, *args: object, tenant: str = "", **kwargs: object) -> None:
            self.tenant = tenant
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    maker = minimum.sessionmaker(class_=TenantSession, tenant="t1", consistency="strong")
    with maker() as session:
        assert isinstance(session, TenantSession)
        assert session.tenant == "t1"


def test_the_same_server_is_recognised_however_the_url_is_spelled() -> None:
    """server_key: the default port, the host's case, the driver and the user do not
    make another server; another port, database or query does; URLs that name no
    server (in-memory SQLite, creator= engines) are never compared."""
    key = _config.server_key
    url = sa.make_url
    base = key(url("postgresql+psycopg://u@DB.example:5432/app"))
    assert base is not None
    assert key(url("postgresql://other:pw@db.example/app")) == base
    assert key(url("postgresql+psycopg://u@db.example:5433/app")) != base
    assert key(url("postgresql+psycopg://u@db.example/app2")) != base
    assert key(url("postgresql+psycopg://u@db.example/app?host=/sock")) != base
    assert key(url("mariadb+pymysql://u@db:3306/app")) == key(url("mysql+pymysql://v@db/app"))
    assert key(url("sqlite://")) is None
    assert key(url("sqlite:///:memory:")) is None
    assert key(url("sqlite:///a.db")) == key(url("sqlite:///./a.db"))
    assert key(url("postgresql+psycopg://")) is None
