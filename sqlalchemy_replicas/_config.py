"""Checks of a router's and a sessionmaker's arguments, made where they are given.

Each check raises :class:`~sqlalchemy_replicas.exc.ConfigurationError` naming
the argument and the fix, and never echoes a password. Pure code, no I/O:
URLs are compared as written, never resolved.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from sqlalchemy.engine import URL

from .consistency import validate_causal_scope, validate_level
from .exc import ConfigurationError

__all__ = [
    "MIN_LAG_CHECK_INTERVAL",
    "MIN_TOKEN_MAX_AGE",
    "RESERVED_NAMES",
    "check_distinct_servers",
    "check_engine_options",
    "check_lag_check_interval",
    "check_replicas",
    "check_session_kwargs",
    "check_token_max_age",
    "check_weights",
    "kind_of",
    "server_key",
    "url_problem",
]

#: The shortest ``lag_check_interval``, in seconds: each check queries the
#: primary and every replica, so shorter ones cost a core and the servers
#: real work for no earlier decision (SQL round trips take about as long).
MIN_LAG_CHECK_INTERVAL: Final = 0.05

#: The shortest ``token_max_age``, in seconds (it must also be at least
#: ``max_lag``): a token must outlive the gap between a response and the next
#: request.
MIN_TOKEN_MAX_AGE: Final = 1.0

#: Names a replica may not have: status, logs and explain() call the primary so.
RESERVED_NAMES: Final = frozenset({"primary"})

_DEFAULT_PORTS: Final = {"postgresql": 5432, "mysql": 3306}


def kind_of(value: object) -> str:
    """A value's type for a message ("a str", "an int"); never the value (it
    may hold a password)."""
    kind = type(value).__name__
    return f"an {kind}" if kind[:1].lower() in "aeiou" else f"a {kind}"


def url_problem(error: Exception) -> str:
    """What is wrong with a URL that did not parse, for a message (SQLAlchemy
    parses the port with ``int()``: a ValueError names no argument)."""
    if isinstance(error, ValueError):
        return "its port must be a number, e.g. host:5432"
    return str(error)


def check_replicas(replicas: object) -> None:
    """``replicas`` is a sequence of sources or a mapping of valid names to sources.

    :raises ConfigurationError: for None, a non-iterable, or a mapping with a
        name that is not a non-empty str or is reserved.
    """
    if replicas is None:
        raise ConfigurationError(
            "replicas=None is not a list of replicas; for none, pass replicas=() or leave "
            "it out (every statement then goes to the primary)"
        )
    if isinstance(replicas, Mapping):
        for name in replicas:
            if not isinstance(name, str):
                raise ConfigurationError(
                    f"replica names (the keys of replicas) must be str, not {type(name).__name__}; "
                    "e.g. replicas={'replica1': url}"
                )
            if not name.strip():
                raise ConfigurationError(
                    f"replica name {name!r} (a key of replicas) is empty; "
                    "name each replica, e.g. 'eu-1'"
                )
            if name in RESERVED_NAMES:
                raise ConfigurationError(
                    f"replica name {name!r} (a key of replicas) is reserved for the primary "
                    "in status and logs; "
                    "name the replica otherwise, e.g. 'replica1'"
                )
    elif not isinstance(replicas, Iterable):
        raise ConfigurationError(
            f"replicas must be a sequence of URLs or engines, or a mapping of name to "
            f"URL/engine, not {type(replicas).__name__}"
        )


def check_engine_options(engine_options: object) -> dict[str, Any]:
    """``engine_options`` as a dict of ``create_engine()`` keyword arguments.

    :raises ConfigurationError: when it is not None or a mapping with str keys.
    """
    if engine_options is None:
        return {}
    if not isinstance(engine_options, Mapping) or not all(
        isinstance(key, str) for key in engine_options
    ):
        raise ConfigurationError(
            "engine_options must be a mapping of create_engine() keyword arguments, "
            f"e.g. engine_options={{'pool_size': 10}}, not {_kind(engine_options)}"
        )
    return dict(engine_options)


def check_weights(weights: object) -> None:
    """``weights`` is None or a mapping (its names and values are checked later).

    :raises ConfigurationError: otherwise.
    """
    if weights is not None and not isinstance(weights, Mapping):
        raise ConfigurationError(
            "weights must be a mapping of replica name to relative share, "
            f"e.g. weights={{'replica1': 2.0}}, not {_kind(weights)}"
        )


def check_token_max_age(token_max_age: float, max_lag: float) -> None:
    """``token_max_age`` is at least :data:`MIN_TOKEN_MAX_AGE` and ``max_lag``.

    A token that expires sooner than ``max_lag`` lets a replica lagging
    within ``max_lag`` serve a read older than the token's commits: a token
    would not carry read-your-writes across requests.

    :raises ConfigurationError: naming the floor.
    """
    floor = max(MIN_TOKEN_MAX_AGE, max_lag)
    if token_max_age < floor:
        raise ConfigurationError(
            f"token_max_age={token_max_age!r} is too short: a causal token must stay "
            f"valid at least {floor:g} s (the larger of {MIN_TOKEN_MAX_AGE:g} s and "
            "max_lag, the staleness a replica may have), or requests would read older "
            "than their own earlier commits; give token_max_age >= "
            f"{floor:g} (default 86400)"
        )


def check_lag_check_interval(interval: float) -> None:
    """``lag_check_interval`` is at least :data:`MIN_LAG_CHECK_INTERVAL`.

    :raises ConfigurationError: naming the floor.
    """
    if interval < MIN_LAG_CHECK_INTERVAL:
        raise ConfigurationError(
            f"lag_check_interval={interval!r} is too short: each check queries the primary "
            f"and every replica; give at least {MIN_LAG_CHECK_INTERVAL:g} s (default 1.0)"
        )


def server_key(url: URL) -> tuple[Any, ...] | None:
    """What identifies the server (and database) ``url`` points at, as written:
    dialect family, host, port (the default filled in), database and query.
    None when the URL cannot tell (an in-memory SQLite database, or an engine
    built with ``creator=`` whose URL names no host)."""
    backend = url.get_backend_name()
    family = "mysql" if backend in ("mysql", "mariadb") else backend
    query = tuple(sorted((key, str(value)) for key, value in url.query.items()))
    if family == "sqlite":
        database = url.database
        if not database or database == ":memory:" or "memory" in dict(query).values():
            return None
        return ("sqlite", os.path.normpath(database), query)
    host = (url.host or "").lower()
    if not host and not query:
        return None
    return (family, host, url.port or _DEFAULT_PORTS.get(family), url.database, query)


def check_distinct_servers(primary: URL, replicas: Sequence[tuple[str, URL]]) -> None:
    """Each replica is another server than the primary and the other replicas.

    :param primary: the primary's URL.
    :param replicas: each replica's name and URL.
    :raises ConfigurationError: naming both, passwords hidden.
    """
    seen: dict[tuple[Any, ...], str] = {}
    primary_key = server_key(primary)
    for name, url in replicas:
        key = server_key(url)
        if key is None:
            continue
        shown = url.render_as_string(hide_password=True)
        if key == primary_key:
            raise ConfigurationError(
                f"replica {name!r} ({shown}) is the primary's URL: a replica must be "
                "another server that replicates from the primary; for no replicas pass "
                "replicas=() (every statement then goes to the primary)"
            )
        if key in seen:
            raise ConfigurationError(
                f"replica {name!r} ({shown}) is the same server as replica {seen[key]!r}: "
                "give each replica once (weights={name: 2.0} gives one a larger share)"
            )
        seen[key] = name


def check_session_kwargs(
    classes: Sequence[type],
    session_kwargs: Mapping[str, Any],
    *,
    method: str,
    factory_arguments: Iterable[str] = (),
) -> None:
    """The keyword arguments of ``router.sessionmaker()`` (or
    ``async_sessionmaker()``) are ones the session classes accept, and a
    ``consistency`` given there is a level, checked when the factory is made
    rather than at its first session.

    A keyword is known when an ``__init__`` in the classes' MROs names it
    (mixins pass the others on to ``super()``), or it is one of
    ``factory_arguments`` (taken by the factory itself).

    :raises ConfigurationError: naming the argument and the accepted ones.
    """
    if "router" in session_kwargs:
        raise ConfigurationError(
            f"router.{method}() passes this router to its sessions; leave out router="
        )
    if session_kwargs.get("consistency") is not None:
        validate_level(session_kwargs["consistency"], argument="consistency")
    if session_kwargs.get("causal_scope") is not None:
        validate_causal_scope(session_kwargs["causal_scope"], argument="causal_scope")
    known = (_init_parameters(classes) | set(factory_arguments)) - {"router"}
    unknown = sorted(set(session_kwargs) - known)
    if unknown:
        raise ConfigurationError(
            f"router.{method}() got unknown session argument(s) {', '.join(unknown)}; "
            f"the sessions accept: {', '.join(sorted(known))}"
        )


def _init_parameters(classes: Sequence[type]) -> set[str]:
    names: set[str] = set()
    for cls in classes:
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            try:
                parameters = inspect.signature(init).parameters.values()
            except (TypeError, ValueError):  # a builtin without a signature
                continue
            names.update(
                p.name
                for p in parameters
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
            )
    return names


def _kind(value: object) -> str:
    """A value's type for a message; never the value (it may hold a password)."""
    name = type(value).__name__
    return f"an {name}" if name[:1].lower() in "aeiou" else f"a {name}"
