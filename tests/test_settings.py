"""Router configuration from settings: the environment, Flask's config, pydantic-settings.

Pure: URLs name servers that are never connected to (engines connect lazily).
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from typing import Any

import flask
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import PostgresDsn, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

import sqlalchemy_replicas as sr
from sqlalchemy_replicas import settings
from sqlalchemy_replicas.exc import ConfigurationError
from sqlalchemy_replicas.integrations import flask as flask_integration

PG = "postgresql+psycopg://app:s3cretpw@127.0.0.1:5001/app"
PG2 = "postgresql+psycopg://app:s3cretpw@127.0.0.1:5002/app"
PG3 = "postgresql+psycopg://app:s3cretpw@127.0.0.1:5003/app"
SECRET = "token-signing-key-0123456789"


@pytest.fixture
def routers() -> Iterator[list[sr.ReplicaRouter[Any]]]:
    """Routers a test builds, disposed after it."""
    built: list[sr.ReplicaRouter[Any]] = []
    yield built
    for router in built:
        router.dispose()


def urls(router: sr.ReplicaRouter[Any]) -> list[str]:
    """The primary's and the replicas' URLs, passwords shown."""
    engines = [router.primary, *router.replicas]
    return [e.url.render_as_string(hide_password=False) for e in engines]


def test_from_env_reads_urls_and_every_option(routers: list[sr.ReplicaRouter[Any]]) -> None:
    """Every router option has its SQLALCHEMY_REPLICAS_<OPTION> variable, in its
    documented text format, and each reaches the router."""
    environ = {
        "DATABASE_URL": PG,
        "DATABASE_REPLICA_URLS": f" {PG2} , {PG3},",
        "SQLALCHEMY_REPLICAS_MAX_LAG": "2.5",
        "SQLALCHEMY_REPLICAS_WAIT_TIMEOUT": "0.3",
        "SQLALCHEMY_REPLICAS_DEFAULT_CONSISTENCY": "monotonic",
        "SQLALCHEMY_REPLICAS_SECRET": SECRET,
        "SQLALCHEMY_REPLICAS_ENGINE_OPTIONS": '{"pool_size": 3, "pool_pre_ping": true}',
        "SQLALCHEMY_REPLICAS_NAME": "orders-db",
        "SQLALCHEMY_REPLICAS_WRITING_FUNCTIONS": "audit_log, bump",
        "SQLALCHEMY_REPLICAS_READ_ONLY_FUNCTIONS": "last_insert_id",
        "SQLALCHEMY_REPLICAS_TOKEN_MAX_AGE": "600",
        "SQLALCHEMY_REPLICAS_WEIGHTS": "replica1=2,replica2=0.5",
        "SQLALCHEMY_REPLICAS_LAG_CHECK_INTERVAL": "0.25",
        "SQLALCHEMY_REPLICAS_PRIMARY_CANDIDATES": PG2,
        "SQLALCHEMY_REPLICAS_CAUSAL_SCOPE": "session",
        "SQLALCHEMY_REPLICAS_ZONE": " eu-west-1b ",
        "SQLALCHEMY_REPLICAS_REPLICA_ZONES": "replica1=eu-west-1a, replica2=eu-west-1b",
        "UNRELATED": "x",
    }
    router = sr.ReplicaRouter.from_env(environ=environ)
    routers.append(router)
    assert urls(router) == [PG, PG2, PG3]
    assert router.replica_names == ("replica1", "replica2")
    assert (router.max_lag, router.wait_timeout, router.token_max_age) == (2.5, 0.3, 600.0)
    assert router.lag_check_interval == 0.25
    assert router.default_consistency == "monotonic"
    assert router.secret == SECRET
    assert router.primary.pool.size() == 3  # type: ignore[attr-defined]
    assert router.name == "orders-db"
    assert router.classifier.is_writing_function("audit_log")
    assert router.classifier.is_writing_function("bump")
    assert not router.classifier.is_writing_function("last_insert_id")
    assert router.cluster._weights == (2.0, 0.5)
    assert router.causal_scope == "session"
    assert [u.port for u in router.cluster.discovery._candidates] == [5001, 5002]
    assert router.zone == "eu-west-1b"
    assert router.replica_zones == {"replica1": "eu-west-1a", "replica2": "eu-west-1b"}


def test_from_env_defaults_with_only_a_primary(routers: list[sr.ReplicaRouter[Any]]) -> None:
    """DATABASE_URL alone: no replicas, and every option at the constructor's default."""
    router = sr.ReplicaRouter.from_env(environ={"DATABASE_URL": PG})
    routers.append(router)
    default = sr.ReplicaRouter(PG)
    routers.append(default)
    assert router.replicas == ()
    assert (router.max_lag, router.wait_timeout, router.default_consistency) == (
        default.max_lag,
        default.wait_timeout,
        default.default_consistency,
    )
    assert router.secret is None
    assert router.name == "default"


def test_named_replicas_in_the_environment(routers: list[sr.ReplicaRouter[Any]]) -> None:
    """name=URL pairs name the replicas; a URL's own query (with '=') is no name."""
    pg3 = f"{PG3}?sslmode=disable"
    router = sr.ReplicaRouter.from_env(
        environ={"DATABASE_URL": PG, "DATABASE_REPLICA_URLS": f"eu-1={PG2}, us.1 = {pg3}"}
    )
    routers.append(router)
    assert router.replica_names == ("eu-1", "us.1")
    assert urls(router)[1:] == [PG2, pg3]
    unnamed = sr.ReplicaRouter.from_env(environ={"DATABASE_URL": PG, "DATABASE_REPLICA_URLS": pg3})
    routers.append(unnamed)
    assert unnamed.replica_names == ("replica1",)


def test_prefix_reads_another_databases_names(routers: list[sr.ReplicaRouter[Any]]) -> None:
    """prefix="ANALYTICS_" reads ANALYTICS_DATABASE_URL, ANALYTICS_DATABASE_REPLICA_URLS
    and ANALYTICS_SQLALCHEMY_REPLICAS_*, and none of the unprefixed names."""
    environ = {
        "DATABASE_URL": PG3,
        "SQLALCHEMY_REPLICAS_MAX_LAG": "9",
        "ANALYTICS_DATABASE_URL": PG,
        "ANALYTICS_DATABASE_REPLICA_URLS": PG2,
        "ANALYTICS_SQLALCHEMY_REPLICAS_MAX_LAG": "1.5",
    }
    router = sr.ReplicaRouter.from_env(prefix="ANALYTICS_", environ=environ)
    routers.append(router)
    assert urls(router) == [PG, PG2]
    assert router.max_lag == 1.5
    assert settings.setting_name("max_lag", prefix="ANALYTICS_") == (
        "ANALYTICS_SQLALCHEMY_REPLICAS_MAX_LAG"
    )
    with pytest.raises(ConfigurationError, match="prefix='ANALYTICS-'"):
        sr.ReplicaRouter.from_env(prefix="ANALYTICS-", environ=environ)


def test_keyword_overrides_win_over_settings(routers: list[sr.ReplicaRouter[Any]]) -> None:
    """from_env(engine_options=..., replicas=..., max_lag=...) wins over the variables,
    and a bad variable that an override replaces is not read at all."""
    environ = {
        "DATABASE_URL": PG,
        "DATABASE_REPLICA_URLS": PG2,
        "SQLALCHEMY_REPLICAS_MAX_LAG": "not a number",
        "SQLALCHEMY_REPLICAS_ENGINE_OPTIONS": '{"pool_size": 3}',
    }
    router = sr.ReplicaRouter.from_env(
        environ=environ, max_lag=7.0, engine_options={"pool_size": 4}, replicas=[PG3]
    )
    routers.append(router)
    assert router.max_lag == 7.0
    assert router.primary.pool.size() == 4  # type: ignore[attr-defined]
    assert urls(router) == [PG, PG3]
    primary_only = sr.ReplicaRouter.from_env(environ={}, primary=PG)
    routers.append(primary_only)
    assert urls(primary_only) == [PG]
    with pytest.raises(ConfigurationError, match="unknown router argument"):
        sr.ReplicaRouter.from_env(environ=environ, max_lags=1.0)  # type: ignore[call-arg]


def test_flask_config_with_flask_sqlalchemy_uri(routers: list[sr.ReplicaRouter[Any]]) -> None:
    """Flask's app.config (a dict subclass, upper-case keys): SQLALCHEMY_DATABASE_URI
    is the primary when DATABASE_URL is absent, and values may be typed already."""
    app = flask.Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=PG,
        DATABASE_REPLICA_URLS=[PG2, PG3],
        SQLALCHEMY_REPLICAS_WAIT_TIMEOUT=0.2,
        SQLALCHEMY_REPLICAS_ENGINE_OPTIONS={"pool_size": 2},
        SQLALCHEMY_REPLICAS_WEIGHTS={"replica2": 3},
        SQLALCHEMY_REPLICAS_WRITING_FUNCTIONS=["audit_log"],
    )
    router = sr.ReplicaRouter.from_settings(app.config)
    routers.append(router)
    assert urls(router) == [PG, PG2, PG3]
    assert router.wait_timeout == 0.2
    assert router.primary.pool.size() == 2  # type: ignore[attr-defined]
    assert router.cluster._weights == (1.0, 3.0)
    assert router.classifier.is_writing_function("audit_log")
    app.config["DATABASE_URL"] = PG3
    app.config["DATABASE_REPLICA_URLS"] = {"eu": PG2}
    app.config["SQLALCHEMY_REPLICAS_WEIGHTS"] = {"eu": 3}
    preferred = sr.ReplicaRouter.from_settings(app.config)
    routers.append(preferred)
    assert urls(preferred) == [PG3, PG2]
    assert preferred.replica_names == ("eu",)


class AppSettings(BaseSettings):
    """A pydantic-settings class as an app writes it: lower-case fields, typed values."""

    model_config = SettingsConfigDict(env_prefix="TEST_SR_UNUSED_")

    database_url: PostgresDsn
    database_replica_urls: list[str] = []
    sqlalchemy_replicas_secret: SecretStr | None = None
    sqlalchemy_replicas_max_lag: float = 5.0
    sqlalchemy_replicas_default_consistency: str = "read_your_writes"


def test_pydantic_settings_object(routers: list[sr.ReplicaRouter[Any]]) -> None:
    """A BaseSettings subclass: lower-case attributes, PostgresDsn and SecretStr values
    (the secret reaches the router revealed), unset optional fields left out."""
    app_settings = AppSettings(
        database_url=PG,  # type: ignore[arg-type]
        database_replica_urls=[PG2],
        sqlalchemy_replicas_secret=SecretStr(SECRET),
        sqlalchemy_replicas_max_lag=3.0,
    )
    router = sr.ReplicaRouter.from_settings(app_settings)
    routers.append(router)
    assert urls(router) == [PG, PG2]
    assert router.secret == SECRET
    assert router.max_lag == 3.0
    no_secret = sr.ReplicaRouter.from_settings(AppSettings(database_url=PG))  # type: ignore[arg-type]
    routers.append(no_secret)
    assert no_secret.secret is None
    assert no_secret.replicas == ()


def test_pydantic_bad_value_names_the_attribute_without_the_secret() -> None:
    """A bad value on a settings object is named as the attribute the user wrote."""
    app_settings = AppSettings(
        database_url=PG,  # type: ignore[arg-type]
        sqlalchemy_replicas_secret=SecretStr(SECRET),
        sqlalchemy_replicas_default_consistency="fresh",
    )
    with pytest.raises(ConfigurationError) as caught:
        sr.ReplicaRouter.from_settings(app_settings)
    message = str(caught.value)
    assert "sqlalchemy_replicas_default_consistency='fresh' is not a consistency level" in message
    assert SECRET not in message
    assert "s3cretpw" not in message


class ModuleLike:
    """A settings module or class with upper-case attributes (Django style)."""

    DATABASE_URL = PG
    DATABASE_REPLICA_URLS = (PG2,)
    SQLALCHEMY_REPLICAS_MAX_LAG = 4


def test_object_with_upper_case_attributes(routers: list[sr.ReplicaRouter[Any]]) -> None:
    """An object whose attributes are the upper-case names works too."""
    router = sr.ReplicaRouter.from_settings(ModuleLike())
    routers.append(router)
    assert urls(router) == [PG, PG2]
    assert router.max_lag == 4.0


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"SQLALCHEMY_REPLICAS_MAX_LAG": "soon"}, "SQLALCHEMY_REPLICAS_MAX_LAG='soon' is not a"),
        ({"SQLALCHEMY_REPLICAS_MAX_LAG": "-1"}, "SQLALCHEMY_REPLICAS_MAX_LAG=-1.0 is invalid"),
        ({"SQLALCHEMY_REPLICAS_WAIT_TIMEOUT": "nan"}, "SQLALCHEMY_REPLICAS_WAIT_TIMEOUT=nan"),
        ({"SQLALCHEMY_REPLICAS_TOKEN_MAX_AGE": "inf"}, "SQLALCHEMY_REPLICAS_TOKEN_MAX_AGE=inf"),
        (
            {"SQLALCHEMY_REPLICAS_TOKEN_MAX_AGE": "2", "SQLALCHEMY_REPLICAS_MAX_LAG": "10"},
            "SQLALCHEMY_REPLICAS_TOKEN_MAX_AGE: token_max_age=2.0 is too short",
        ),
        (
            {"SQLALCHEMY_REPLICAS_LAG_CHECK_INTERVAL": "0.001"},
            "SQLALCHEMY_REPLICAS_LAG_CHECK_INTERVAL: lag_check_interval=0.001 is too short",
        ),
        (
            {"SQLALCHEMY_REPLICAS_DEFAULT_CONSISTENCY": "fresh"},
            "SQLALCHEMY_REPLICAS_DEFAULT_CONSISTENCY='fresh' is not a consistency level",
        ),
        (
            {"SQLALCHEMY_REPLICAS_CAUSAL_SCOPE": "global"},
            "SQLALCHEMY_REPLICAS_CAUSAL_SCOPE='global' is not a causal scope",
        ),
        ({"SQLALCHEMY_REPLICAS_SECRET": "  "}, "SQLALCHEMY_REPLICAS_SECRET is empty"),
        (
            {"SQLALCHEMY_REPLICAS_ENGINE_OPTIONS": "pool_size=3"},
            "SQLALCHEMY_REPLICAS_ENGINE_OPTIONS is not valid JSON",
        ),
        (
            {"SQLALCHEMY_REPLICAS_ENGINE_OPTIONS": "[1, 2]"},
            "SQLALCHEMY_REPLICAS_ENGINE_OPTIONS must be a JSON object",
        ),
        ({"SQLALCHEMY_REPLICAS_NAME": " "}, "SQLALCHEMY_REPLICAS_NAME must be a non-empty name"),
        (
            {"SQLALCHEMY_REPLICAS_WEIGHTS": "replica1"},
            "SQLALCHEMY_REPLICAS_WEIGHTS must be comma-separated name=value pairs",
        ),
        (
            {"SQLALCHEMY_REPLICAS_WEIGHTS": "replica1=heavy"},
            "SQLALCHEMY_REPLICAS_WEIGHTS: the weight of 'replica1' must be a number",
        ),
        (
            {"SQLALCHEMY_REPLICAS_WEIGHTS": "replica1=0"},
            "SQLALCHEMY_REPLICAS_WEIGHTS: the weight of 'replica1' is 0.0; give a number > 0",
        ),
        (
            {"SQLALCHEMY_REPLICAS_WEIGHTS": "replica9=2"},
            r"SQLALCHEMY_REPLICAS_WEIGHTS names unknown replicas \['replica9'\]",
        ),
        (
            {"SQLALCHEMY_REPLICAS_ZONE": " "},
            "SQLALCHEMY_REPLICAS_ZONE must name the zone this application runs in",
        ),
        (
            {"SQLALCHEMY_REPLICAS_REPLICA_ZONES": "eu-west-1a"},
            "SQLALCHEMY_REPLICAS_REPLICA_ZONES must be comma-separated name=value pairs, "
            "e.g. SQLALCHEMY_REPLICAS_REPLICA_ZONES=replica1=eu-west-1a",
        ),
        (
            {"SQLALCHEMY_REPLICAS_REPLICA_ZONES": "replica3=eu-west-1a"},
            r"SQLALCHEMY_REPLICAS_REPLICA_ZONES names unknown replicas \['replica3'\]; "
            r"the replicas are \['replica1', 'replica2'\]",
        ),
        (
            {"SQLALCHEMY_REPLICAS_ZONES": "eu-west-1a"},
            "SQLALCHEMY_REPLICAS_ZONES is not a sqlalchemy-replicas setting; "
            "did you mean SQLALCHEMY_REPLICAS_ZONE",
        ),
        (
            {"SQLALCHEMY_REPLICAS_PRIMARY_CANDIDATES": "nosuch://h/db"},
            "SQLALCHEMY_REPLICAS_PRIMARY_CANDIDATES item 1 .* is not a usable database URL",
        ),
        (
            {"DATABASE_REPLICA_URLS": f"{PG2},postgresql+psycopg://app:s3cretpw@h:port/db"},
            "DATABASE_REPLICA_URLS item 2 is not a usable database URL",
        ),
        (
            {"DATABASE_REPLICA_URLS": f"eu={PG2},{PG3}"},
            "DATABASE_REPLICA_URLS mixes name=URL pairs and bare URLs",
        ),
        (
            {"DATABASE_REPLICA_URLS": f"eu={PG2},eu={PG3}"},
            "DATABASE_REPLICA_URLS names replica 'eu' twice",
        ),
        ({"DATABASE_URL": "  "}, "DATABASE_URL is empty"),
        ({"DATABASE_URL": "postgresql+psycopg://app:s3cretpw@h:x/db"}, "DATABASE_URL is not a"),
        (
            {"SQLALCHEMY_REPLICAS_WAIT_TIMOUT": "1"},
            "SQLALCHEMY_REPLICAS_WAIT_TIMOUT is not a sqlalchemy-replicas setting; "
            "did you mean SQLALCHEMY_REPLICAS_WAIT_TIMEOUT",
        ),
        (
            {"DATABASE_REPLICA_URL": PG2},
            "DATABASE_REPLICA_URL is not a sqlalchemy-replicas setting; "
            "did you mean DATABASE_REPLICA_URLS",
        ),
    ],
)
def test_bad_variables_raise_naming_the_variable_and_never_the_secrets(
    variables: dict[str, str], message: str
) -> None:
    """Each bad value raises ConfigurationError naming its variable and the fix, and
    neither the secret nor a URL's password appears in the message."""
    environ = {
        "DATABASE_URL": PG,
        "DATABASE_REPLICA_URLS": f"{PG2},{PG3}",
        "SQLALCHEMY_REPLICAS_SECRET": SECRET,
        **variables,
    }
    with pytest.raises(ConfigurationError, match=message) as caught:
        sr.ReplicaRouter.from_env(environ=environ)
    assert SECRET not in str(caught.value)
    assert "s3cretpw" not in str(caught.value)


def test_other_names_under_the_prefix_are_left_alone(routers: list[sr.ReplicaRouter[Any]]) -> None:
    """Variables under SQLALCHEMY_REPLICAS_ that resemble no option (the test harness's
    SQLALCHEMY_REPLICAS_PG_BINDIR, an integration's own) are not errors."""
    router = sr.ReplicaRouter.from_env(
        environ={
            "DATABASE_URL": PG,
            "SQLALCHEMY_REPLICAS_PG_BINDIR": "/usr/lib/postgresql/15/bin",
            "SQLALCHEMY_REPLICAS_COOKIE": "db_causal",
        }
    )
    routers.append(router)
    assert router.replicas == ()


def test_the_flask_extensions_keys_are_not_taken_for_misspellings(
    routers: list[sr.ReplicaRouter[Any]],
) -> None:
    """The Flask extension reads its middleware options from the same
    app.config (SQLALCHEMY_REPLICAS_COOKIE_NAME, _HEADER_NAME, _COOKIE_SECURE,
    _METHOD_CONSISTENCY): from_settings does not take them for misspelt
    router options (METHOD_CONSISTENCY is near DEFAULT_CONSISTENCY; a
    SECURE key would be taken for SECRET)."""
    keys = [
        flask_integration.COOKIE_NAME_KEY,
        flask_integration.HEADER_NAME_KEY,
        flask_integration.COOKIE_SECURE_KEY,
        flask_integration.METHOD_CONSISTENCY_KEY,
    ]
    settings = {"DATABASE_URL": PG, **dict.fromkeys(keys, "x")}
    routers.append(sr.ReplicaRouter.from_settings(settings))
    with pytest.raises(ConfigurationError, match="did you mean SQLALCHEMY_REPLICAS_SECRET"):
        sr.ReplicaRouter.from_settings({"DATABASE_URL": PG, "SQLALCHEMY_REPLICAS_SECURE": True})


def test_missing_primary_names_what_was_looked_for() -> None:
    """Without a primary the message lists the names looked for, as the source spells
    them, and echoes no value that was set."""
    with pytest.raises(ConfigurationError) as caught:
        sr.ReplicaRouter.from_env(
            environ={"SQLALCHEMY_REPLICAS_SECRET": SECRET, "DATABASE_REPLICA_URLS": PG2}
        )
    message = str(caught.value)
    assert "set DATABASE_URL or SQLALCHEMY_DATABASE_URI" in message
    assert SECRET not in message
    assert "s3cretpw" not in message
    with pytest.raises(ConfigurationError, match="ANALYTICS_DATABASE_URL or ANALYTICS_SQLALCHEMY"):
        sr.ReplicaRouter.from_env(environ={"DATABASE_URL": PG}, prefix="ANALYTICS_")
    with pytest.raises(ConfigurationError, match="DATABASE_URL/database_url or "):
        sr.ReplicaRouter.from_settings({"database_replica_urls": PG2})


def test_flask_config_bad_value_names_the_key() -> None:
    """A typed value of the wrong kind in a mapping is named by its key."""
    with pytest.raises(ConfigurationError, match="SQLALCHEMY_REPLICAS_ENGINE_OPTIONS must be"):
        sr.ReplicaRouter.from_settings(
            {"DATABASE_URL": PG, "SQLALCHEMY_REPLICAS_ENGINE_OPTIONS": ["pool_size"]}
        )
    with pytest.raises(
        ConfigurationError, match=r"DATABASE_REPLICA_URLS\[1\] \(nosuch://x:\*\*\*@h/db\) is not a"
    ):
        sr.ReplicaRouter.from_settings(
            {"DATABASE_URL": PG, "DATABASE_REPLICA_URLS": [PG2, "nosuch://x:s3cretpw@h/db"]}
        )
    with pytest.raises(ConfigurationError, match="SQLALCHEMY_REPLICAS_SECRET must be a str"):
        sr.ReplicaRouter.from_settings({"DATABASE_URL": PG, "SQLALCHEMY_REPLICAS_SECRET": 42})


# -- properties ------------------------------------------------------------------------

# Each ends in a marker that no message text contains: a bare "postgres" would
# be "found" in every message that names postgresql+psycopg.
_PASSWORDS = st.text(string.ascii_letters + string.digits, min_size=8, max_size=20).map(
    lambda password: password + "~7~"
)


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_seconds_round_trip_through_text(seconds: float) -> None:
    """Any finite number of seconds >= 0, written as Python writes it, reads back as itself."""
    name = "SQLALCHEMY_REPLICAS_MAX_LAG"
    parsed = settings.from_environ(
        {"DATABASE_URL": PG, name: repr(seconds), "SQLALCHEMY_REPLICAS_TOKEN_MAX_AGE": "1e9"}
    )
    assert parsed.options["max_lag"] == seconds
    assert parsed.sources["max_lag"] == name


@given(st.lists(st.integers(min_value=1, max_value=65535), min_size=1, max_size=6, unique=True))
def test_replica_lists_round_trip(ports: list[int]) -> None:
    """Comma-separated replica URLs read back in order; as name=URL pairs, by name."""
    written = [f"postgresql+psycopg://u@10.0.0.1:{port}/db" for port in ports]
    parsed = settings.from_environ({"DATABASE_URL": PG, "DATABASE_REPLICA_URLS": ",".join(written)})
    assert parsed.replicas == written
    pairs = ",".join(f"r{port}={url}" for port, url in zip(ports, written, strict=True))
    named = settings.from_environ({"DATABASE_URL": PG, "DATABASE_REPLICA_URLS": pairs})
    assert named.replicas == {f"r{port}": url for port, url in zip(ports, written, strict=True)}


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
        st.floats(min_value=0.001, max_value=1000, allow_nan=False),
        min_size=1,
        max_size=5,
    )
)
def test_weights_round_trip(weights: dict[str, float]) -> None:
    """name=weight pairs read back as the mapping they were written from."""
    text = ",".join(f"{name}={weight!r}" for name, weight in weights.items())
    parsed = settings.from_environ(
        {"DATABASE_URL": PG, "SQLALCHEMY_REPLICAS_WEIGHTS": text},
        overrides={"replicas": dict.fromkeys(weights, PG2)},
    )
    assert parsed.options["weights"] == weights


@given(_PASSWORDS, st.sampled_from(["h:port", "h:99x", ":abc"]))
def test_a_malformed_url_never_echoes_its_password(password: str, address: str) -> None:
    """Whatever the password, the message about an unparseable URL leaves it out."""
    bad = f"postgresql+psycopg://app:{password}@{address}/db"
    for environ in (
        {"DATABASE_URL": bad},
        {"DATABASE_URL": PG, "DATABASE_REPLICA_URLS": bad},
        {"DATABASE_URL": PG, "SQLALCHEMY_REPLICAS_ENGINE_OPTIONS": '{"password": "' + password},
    ):
        with pytest.raises(ConfigurationError) as caught:
            settings.from_environ(environ)
        assert password not in str(caught.value)


@given(st.text(min_size=1, max_size=12).filter(lambda s: s.strip() not in settings.OPTIONS))
def test_unknown_override_names_are_refused(name: str) -> None:
    """An override that is no router argument is refused, named."""
    if name in ("primary", "replicas"):
        return
    with pytest.raises(ConfigurationError, match="unknown router argument"):
        settings.from_environ({"DATABASE_URL": PG}, overrides={name: 1})


def test_every_option_has_a_parser_and_is_a_router_argument() -> None:
    """OPTIONS covers each keyword argument of ReplicaRouter, and nothing else."""
    import inspect

    parameters = inspect.signature(sr.ReplicaRouter.__init__).parameters
    keyword_only = {n for n, p in parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert set(settings.OPTIONS) == keyword_only
    assert set(settings.OPTIONS) <= set(settings._PARSERS)
