"""Router arguments from settings: the environment, a mapping or a settings object.

Pure code, no I/O: what :meth:`ReplicaRouter.from_env()
<sqlalchemy_replicas.ReplicaRouter.from_env>` and
:meth:`~sqlalchemy_replicas.ReplicaRouter.from_settings` build a router
from. Every value is checked here, and a bad one raises
:class:`~sqlalchemy_replicas.exc.ConfigurationError` naming the setting as
the user wrote it (``SQLALCHEMY_REPLICAS_WAIT_TIMEOUT``, or ``wait_timeout``
on a pydantic-settings object) and the fix. Messages never echo a secret or
a URL's password.

The names, for a ``prefix`` of ``""`` (``prefix="ANALYTICS_"`` puts
``ANALYTICS_`` in front of each)::

    DATABASE_URL                   the primary (else SQLALCHEMY_DATABASE_URI,
                                   Flask-SQLAlchemy's name for it)
    DATABASE_REPLICA_URLS          the replicas: comma-separated URLs, or
                                   name=URL pairs; a list or a mapping in objects
    SQLALCHEMY_REPLICAS_<OPTION>   each ReplicaRouter option, e.g.
                                   SQLALCHEMY_REPLICAS_WAIT_TIMEOUT=0.3

In the environment names are exact (upper case). In a mapping (Flask's
``app.config``, a dict) the upper-case name is looked up, then the lower-case
one; on any other object (a pydantic-settings ``BaseSettings``, a settings
module) the lower-case attribute, then the upper-case one.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from typing_extensions import TypedDict

from . import _config, zones
from ._config import kind_of
from .consistency import (
    CausalScopeKind,
    ConsistencyLevel,
    validate_causal_scope,
    validate_level,
    validate_seconds,
)
from .exc import ConfigurationError
from .urls import parse_replica_urls, parse_url, plain_value

if TYPE_CHECKING:
    from .targets import EngineSource

__all__ = [
    "OPTIONS",
    "OPTION_PREFIX",
    "PRIMARY_NAMES",
    "REPLICAS_NAME",
    "RouterArguments",
    "RouterOptions",
    "from_environ",
    "from_settings",
    "setting_name",
]

#: Where the primary's URL is looked for, in this order.
PRIMARY_NAMES: Final = ("DATABASE_URL", "SQLALCHEMY_DATABASE_URI")

#: The replicas' URLs.
REPLICAS_NAME: Final = "DATABASE_REPLICA_URLS"

#: What every router option's setting name starts with (after the prefix).
OPTION_PREFIX: Final = "SQLALCHEMY_REPLICAS_"

#: The ReplicaRouter options read from settings, each as
#: ``SQLALCHEMY_REPLICAS_<OPTION in upper case>``.
OPTIONS: Final = (
    "max_lag",
    "wait_timeout",
    "default_consistency",
    "secret",
    "engine_options",
    "name",
    "writing_functions",
    "read_only_functions",
    "token_max_age",
    "weights",
    "lag_check_interval",
    "primary_candidates",
    "causal_scope",
    "rules",
    "zone",
    "replica_zones",
)


class RouterOptions(TypedDict, total=False):
    """Keyword overrides of ``from_env()`` / ``from_settings()``: the
    arguments of ``ReplicaRouter(...)``; each wins over its setting."""

    primary: EngineSource
    replicas: Iterable[EngineSource] | Mapping[str, EngineSource]
    max_lag: float
    wait_timeout: float
    default_consistency: ConsistencyLevel
    secret: str | bytes | None
    engine_options: Mapping[str, Any] | None
    name: str
    writing_functions: Iterable[str]
    read_only_functions: Iterable[str]
    token_max_age: float
    weights: Mapping[str, float] | None
    lag_check_interval: float
    primary_candidates: Iterable[EngineSource]
    causal_scope: CausalScopeKind
    rules: Mapping[Any, ConsistencyLevel] | None
    zone: str | None
    replica_zones: Mapping[str, str] | None


@dataclass(frozen=True)
class RouterArguments:
    """What ``ReplicaRouter(primary, replicas, **options)`` is called with.

    :ivar primary: the primary's URL (or what an override gave).
    :ivar replicas: a list of URLs, or a mapping of replica name to URL.
    :ivar options: the router's keyword arguments that were set.
    :ivar sources: argument -> the setting it came from (absent for overrides).
    """

    primary: Any
    replicas: Any = ()
    options: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def setting_name(option: str, *, prefix: str = "") -> str:
    """The environment variable of a router option: ``setting_name("max_lag",
    prefix="ANALYTICS_")`` is ``"ANALYTICS_SQLALCHEMY_REPLICAS_MAX_LAG"``."""
    return f"{prefix}{OPTION_PREFIX}{option}".upper()


def from_environ(
    environ: Mapping[str, str], *, prefix: str = "", overrides: Mapping[str, Any] | None = None
) -> RouterArguments:
    """The router's arguments from environment variables (exact, upper-case names).

    :param environ: e.g. ``os.environ``.
    :param prefix: put in front of every name, e.g. ``"ANALYTICS_"``.
    :param overrides: router arguments that win over the settings.
    :raises ConfigurationError: naming the variable and the fix.
    """
    _check_prefix(prefix)

    def lookup(name: str) -> tuple[str, Any] | None:
        name = name.upper()
        return (name, environ[name]) if name in environ else None

    return _read(lookup, list(environ), prefix, overrides, where="in the environment")


def from_settings(
    settings: object, *, prefix: str = "", overrides: Mapping[str, Any] | None = None
) -> RouterArguments:
    """The router's arguments from a mapping (Flask's ``app.config``, a dict)
    or an object (a pydantic-settings ``BaseSettings``, a module).

    A mapping is asked for the upper-case name, then the lower-case one;
    an object for the lower-case attribute, then the upper-case one. A value
    of None counts as not set.

    :raises ConfigurationError: naming the key or attribute and the fix.
    """
    _check_prefix(prefix)
    if isinstance(settings, Mapping):
        mapping = settings

        def lookup(name: str) -> tuple[str, Any] | None:
            for key in (name.upper(), name.lower()):
                if mapping.get(key) is not None:
                    return key, mapping[key]
            return None

        keys = [k for k in mapping if isinstance(k, str)]
        return _read(lookup, keys, prefix, overrides, where="in the settings")

    def lookup_attribute(name: str) -> tuple[str, Any] | None:
        for key in (name.lower(), name.upper()):
            value = getattr(settings, key, None)
            if value is not None:
                return key, value
        return None

    return _read(
        lookup_attribute, dir(settings), prefix, overrides, where=f"on {type(settings).__name__}"
    )


# -- reading ----------------------------------------------------------------------

_Lookup = Callable[[str], "tuple[str, Any] | None"]


def _read(
    lookup: _Lookup,
    keys: list[str],
    prefix: str,
    overrides: Mapping[str, Any] | None,
    *,
    where: str,
) -> RouterArguments:
    overrides = dict(overrides or {})
    if unknown := sorted(set(overrides) - {"primary", "replicas", *OPTIONS}):
        raise ConfigurationError(
            f"unknown router argument(s) {', '.join(unknown)}; ReplicaRouter takes: "
            f"primary, replicas, {', '.join(OPTIONS)}"
        )
    _check_misspellings(keys, prefix)
    sources: dict[str, str] = {}

    if "primary" in overrides:
        primary = overrides.pop("primary")
    else:
        names = [prefix + name for name in PRIMARY_NAMES]
        found = next((hit for name in names if (hit := lookup(name)) is not None), None)
        if found is None:
            looked_for = " or ".join(
                n if where == "in the environment" else _both(n) for n in names
            )
            raise ConfigurationError(
                f"no primary database URL {where}: set {looked_for} "
                "(e.g. postgresql+psycopg://user:pass@host:5432/db), or pass primary=..."
            )
        sources["primary"] = found[0]
        primary = parse_url(found[1], found[0])

    if "replicas" in overrides:
        replicas = overrides.pop("replicas")
    else:
        hit = lookup(prefix + REPLICAS_NAME)
        replicas = () if hit is None else parse_replica_urls(hit[1], hit[0])
        if hit is not None:
            sources["replicas"] = hit[0]

    options: dict[str, Any] = {}
    for option in OPTIONS:
        if option in overrides:
            options[option] = overrides.pop(option)
            continue
        hit = lookup(setting_name(option, prefix=prefix))
        if hit is not None:
            key, value = hit
            options[option] = _PARSERS[option](value, key)
            sources[option] = key
    _check_together(replicas, options, sources)
    return RouterArguments(primary, replicas, options, sources)


def _check_together(replicas: Any, options: dict[str, Any], sources: dict[str, str]) -> None:
    """Checks across settings, naming the setting that was read."""
    if "token_max_age" in sources or "max_lag" in sources:
        max_age = options.get("token_max_age", 86400.0)
        max_lag = options.get("max_lag", 5.0)
        if isinstance(max_age, float) and isinstance(max_lag, float):
            name = sources.get("token_max_age") or sources["max_lag"]
            _reraise(name, lambda: _config.check_token_max_age(max_age, max_lag))
    if "lag_check_interval" in sources:
        interval = options["lag_check_interval"]
        _reraise(sources["lag_check_interval"], lambda: _config.check_lag_check_interval(interval))
    for option in ("weights", "replica_zones"):
        if option not in sources:
            continue
        if isinstance(replicas, Mapping):
            names = list(replicas)
        elif isinstance(replicas, (list, tuple)):
            names = [f"replica{i}" for i in range(1, len(replicas) + 1)]
        else:
            return
        if unknown := sorted(set(options[option]) - set(names)):
            raise ConfigurationError(
                f"{sources[option]} names unknown replicas {unknown}; the replicas are "
                f"{names} (unnamed replicas are replica1, replica2, ... in order)"
            )


def _reraise(name: str, check: Callable[[], None]) -> None:
    try:
        check()
    except ConfigurationError as exc:
        raise ConfigurationError(f"{name}: {exc}") from None


def _check_prefix(prefix: object) -> None:
    if not isinstance(prefix, str) or (prefix and not re.fullmatch(r"[A-Za-z0-9_]+", prefix)):
        raise ConfigurationError(
            f"prefix={prefix!r} must be a str of letters, digits and underscores, "
            "e.g. prefix='ANALYTICS_'"
        )


def _check_misspellings(keys: list[str], prefix: str) -> None:
    """A setting that looks like one of ours but is not: say which it resembles.

    Other names under ``SQLALCHEMY_REPLICAS_`` that resemble no option are
    left alone (integrations and the test harness have their own)."""
    options_prefix = (prefix + OPTION_PREFIX).upper()
    replica_stem = (prefix + "DATABASE_REPLICA").upper()
    replicas_name = (prefix + REPLICAS_NAME).upper()
    for key in keys:
        upper = key.upper()
        if upper.startswith(options_prefix):
            option = upper[len(options_prefix) :].lower()
            if option in OPTIONS:
                continue
            close = difflib.get_close_matches(option, OPTIONS, n=1, cutoff=0.8)
            if close:
                meant = setting_name(close[0], prefix=prefix)
                meant = meant if key.isupper() else meant.lower()
                raise ConfigurationError(
                    f"{key} is not a sqlalchemy-replicas setting; did you mean {meant}?"
                )
        elif upper.startswith(replica_stem) and upper != replicas_name:
            meant = replicas_name if key.isupper() else replicas_name.lower()
            raise ConfigurationError(
                f"{key} is not a sqlalchemy-replicas setting; did you mean {meant} "
                "(comma-separated replica URLs)?"
            )


def _both(name: str) -> str:
    return f"{name.upper()}/{name.lower()}"


# -- values -------------------------------------------------------------------------


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ConfigurationError(
                f"{name}={value!r} is not a number of seconds; give e.g. {name}=0.5"
            ) from None
    return validate_seconds(value, argument=name)


def _level(value: Any, name: str) -> ConsistencyLevel:
    return validate_level(value.strip() if isinstance(value, str) else value, argument=name)


def _scope(value: Any, name: str) -> CausalScopeKind:
    return validate_causal_scope(value.strip() if isinstance(value, str) else value, argument=name)


def _secret(value: Any, name: str) -> str | bytes:
    value = plain_value(value)
    if not isinstance(value, (str, bytes)):
        raise ConfigurationError(f"{name} must be a str or bytes key, not {kind_of(value)}")
    if not value.strip():
        raise ConfigurationError(
            f"{name} is empty; give a long random key (e.g. python -c "
            "'import secrets; print(secrets.token_urlsafe(32))'), or leave it unset "
            "to disable causal tokens"
        )
    return value


def _engine_options(value: Any, name: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            # exc.msg and the position only: the text may hold a password.
            raise ConfigurationError(
                f"{name} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                f"{exc.colno}); give a JSON object, e.g. {name}='{{\"pool_size\": 10}}'"
            ) from None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ConfigurationError(
            f"{name} must be a JSON object (a mapping) of create_engine() keyword arguments, "
            f'e.g. {{"pool_size": 10}}, not {kind_of(value)}'
        )
    return dict(value)


def _name(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{name} must be a non-empty name, e.g. {name}=orders-db")
    return value.strip()


def _function_names(value: Any, name: str) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return [item.strip() for item in value if item.strip()]
    raise ConfigurationError(
        f"{name} must be comma-separated function names or a list of them, not {kind_of(value)}"
    )


def _pairs(value: str, name: str, example: str) -> list[tuple[str, str]]:
    pairs = []
    for item in value.split(","):
        if not item.strip():
            continue
        key, equals, rest = item.partition("=")
        if not equals or not key.strip() or not rest.strip():
            raise ConfigurationError(
                f"{name} must be comma-separated name=value pairs, e.g. {name}={example}; "
                f"{item.strip()!r} is not one"
            )
        pairs.append((key.strip(), rest.strip()))
    return pairs


def _weights(value: Any, name: str) -> dict[str, float]:
    if isinstance(value, str):
        value = dict(_pairs(value, name, "replica1=2,replica2=1"))
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{name} must be replica=weight pairs or a mapping of replica name to weight, "
            f"not {kind_of(value)}"
        )
    weights = {}
    for replica, weight in value.items():
        if isinstance(weight, str):
            try:
                weight = float(weight)
            except ValueError:
                raise ConfigurationError(
                    f"{name}: the weight of {replica!r} must be a number, not {weight!r}"
                ) from None
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigurationError(
                f"{name}: the weight of {replica!r} must be a number, not {kind_of(weight)}"
            )
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigurationError(
                f"{name}: the weight of {replica!r} is {weight!r}; give a number > 0"
            )
        weights[str(replica)] = float(weight)
    return weights


def _candidates(value: Any, name: str) -> list[Any]:
    value = plain_value(value)
    if isinstance(value, str):
        items = [item for item in value.split(",") if item.strip()]
        return [parse_url(item, f"{name} item {i}") for i, item in enumerate(items, start=1)]
    if isinstance(value, (list, tuple)):
        return [parse_url(item, f"{name}[{i}]") for i, item in enumerate(value)]
    raise ConfigurationError(
        f"{name} must be comma-separated URLs or a list of them, not {kind_of(value)}"
    )


def _rules(value: Any, name: str) -> dict[Any, ConsistencyLevel]:
    if isinstance(value, str):
        value = dict(_pairs(value, name, "orders=strong,products=eventual"))
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{name} must be table=level pairs or a mapping of table to level, not {kind_of(value)}"
        )
    return {key: _level(level, f"{name}[{key!r}]") for key, level in value.items()}


def _zone(value: Any, name: str) -> str | None:
    return zones.check_zone(value, argument=name)


def _replica_zones(value: Any, name: str) -> dict[str, str]:
    if isinstance(value, str):
        value = dict(_pairs(value, name, "replica1=eu-west-1a,replica2=eu-west-1b"))
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{name} must be replica=zone pairs or a mapping of replica name to zone, "
            f"not {kind_of(value)}"
        )
    # The names are checked against the replicas with the other settings.
    return zones.check_replica_zones(value, None, argument=name)


_PARSERS: Final[dict[str, Callable[[Any, str], Any]]] = {
    "max_lag": _seconds,
    "wait_timeout": _seconds,
    "default_consistency": _level,
    "secret": _secret,
    "engine_options": _engine_options,
    "name": _name,
    "writing_functions": _function_names,
    "read_only_functions": _function_names,
    "token_max_age": _seconds,
    "weights": _weights,
    "lag_check_interval": _seconds,
    "primary_candidates": _candidates,
    "causal_scope": _scope,
    "rules": _rules,
    "zone": _zone,
    "replica_zones": _replica_zones,
}
