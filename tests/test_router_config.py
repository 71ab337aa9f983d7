"""ReplicaRouter and RoutingSession reject bad configuration where it is given."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.exc import ConfigurationError

PG = "postgresql+psycopg://u:secretpw@127.0.0.1:1/db"
PG_ASYNC = "postgresql+psycopg_async://u:secretpw@127.0.0.1:1/db"
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
        sr.ReplicaRouter(PG, [PG], **kwargs)  # type: ignore[call-overload]


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
        sr.ReplicaRouter(PG, [PG_ASYNC])
    with pytest.raises(ConfigurationError, match="is not async like the primary"):
        sr.ReplicaRouter(PG_ASYNC, [PG])


def test_sessionmaker_kind_must_match_the_engines() -> None:
    """sessionmaker() needs sync engines, async_sessionmaker() async ones (type
    checkers reject the wrong one too: tests/test_typing.py)."""
    sync_router = sr.ReplicaRouter(PG, [PG])
    async_router = sr.ReplicaRouter(create_async_engine(PG_ASYNC), [PG_ASYNC])
    with pytest.raises(ConfigurationError, match=r"use router\.sessionmaker"):
        sync_router.async_sessionmaker()  # type: ignore[misc]
    with pytest.raises(ConfigurationError, match=r"use router\.async_sessionmaker"):
        async_router.sessionmaker()  # type: ignore[misc]
    assert async_router.is_async
    assert not sync_router.is_async


def test_session_class_must_route() -> None:
    """A sessionmaker class_ (or an async maker's sync_session_class) that is not a
    RoutingSession would silently not route: refused at run time as by type checkers."""
    router = sr.ReplicaRouter(PG, [PG])
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

    router = sr.ReplicaRouter(PG, [PG])
    assert isinstance(router.sessionmaker()(), sr.RoutingSession)
    session = router.sessionmaker(class_=AppSession)()
    assert isinstance(session, AppSession)
    assert session.router is router
    async_router = sr.ReplicaRouter[AsyncEngine](PG_ASYNC, [PG_ASYNC])
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
    router = sr.ReplicaRouter(PG, [PG])
    other = sa.create_engine(PG.replace(":1/", ":2/"))
    with pytest.raises(ConfigurationError, match="does not support binds="):
        router.sessionmaker(binds={sa.table("t"): other})()
    assert sr.RoutingSession(router=router, bind=other).get_bind() is other
    other.dispose()


def test_replicas_may_be_named_by_a_mapping() -> None:
    """A mapping of name to URL names the replicas."""
    router = sr.ReplicaRouter(PG, {"eu": PG, "us": PG})
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
