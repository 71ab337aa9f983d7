"""Database URLs: reading them from settings, and the sync twin of an async one.

Pure code, no I/O: a URL is parsed and its dialect looked up (which imports
the dialect's module, not its driver), never connected to. Messages never
echo a password.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from . import _config
from .exc import ConfigurationError

__all__ = [
    "SYNC_CONNECT_PARAMS",
    "SYNC_DRIVERS",
    "parse_replica_urls",
    "parse_url",
    "plain_value",
    "shown_url",
    "sync_url",
]

#: Async driver -> the sync driver of the same dialect (what threads outside
#: the application's event loop, such as the lag monitor's, connect with).
SYNC_DRIVERS: Final = {
    "psycopg_async": "psycopg",
    "asyncpg": "psycopg",
    "aiomysql": "pymysql",
    "asyncmy": "pymysql",
}

#: Async driver -> its connect parameter names that the sync driver of
#: :data:`SYNC_DRIVERS` spells otherwise (aiomysql ``db``, pymysql ``database``).
SYNC_CONNECT_PARAMS: Final = {
    "asyncpg": {"database": "dbname"},
    "aiomysql": {"db": "database"},
    "asyncmy": {"db": "database"},
}

_NAMED: Final = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*=\s*(\S.*?)\s*$")


def sync_url(url: URL) -> URL:
    """The same server through the sync driver of its dialect (``url`` itself
    when its driver is sync)."""
    backend, _, driver = url.drivername.partition("+")
    sync_driver = SYNC_DRIVERS.get(driver)
    return url.set(drivername=f"{backend}+{sync_driver}") if sync_driver else url


def plain_value(value: Any) -> Any:
    """A pydantic ``SecretStr``/``SecretBytes`` or URL type as str/bytes; others as given."""
    reveal = getattr(value, "get_secret_value", None)
    if callable(reveal):
        value = reveal()
    elif not isinstance(value, (str, bytes, URL, Mapping, list, tuple)) and hasattr(
        value, "unicode_string"
    ):
        value = str(value)  # pydantic AnyUrl, PostgresDsn, MultiHostUrl
    return value


def shown_url(value: str | URL) -> str:
    """`` (url)`` with the password hidden, or nothing when it does not parse
    (an unparseable string may still carry credentials)."""
    try:
        return f" ({make_url(value).render_as_string(hide_password=True)})"
    except (sa_exc.ArgumentError, ValueError):
        return ""


def parse_url(value: Any, name: str) -> Any:
    """A database URL from a setting, checked; an Engine or anything else is
    returned as given (the router checks it).

    :param value: a str, bytes, :class:`~sqlalchemy.engine.URL` or a pydantic
        secret or URL type.
    :param name: the setting's name, for the message.
    :raises ConfigurationError: for an empty or unusable URL (an unknown
        dialect, a malformed port), naming ``name``.
    """
    value = plain_value(value)
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise ConfigurationError(f"{name} is empty; give a database URL")
    if isinstance(value, (str, URL)):
        try:
            make_url(value).get_dialect()
        except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError, ValueError) as exc:
            raise ConfigurationError(
                f"{name}{shown_url(value)} is not a usable database URL "
                f"({_config.url_problem(exc)}); expected e.g. "
                "postgresql+psycopg://user:pass@host:5432/db or "
                "mariadb+pymysql://user:pass@host:3306/db"
            ) from None
    return value


def parse_replica_urls(value: Any, name: str) -> list[Any] | dict[str, Any]:
    """Replicas from a setting: comma-separated URLs or ``name=URL`` pairs, a
    list, or a mapping of name to URL; a list, or a mapping of name to URL.

    :param name: the setting's name, for the message.
    :raises ConfigurationError: for a bad URL, pairs mixed with bare URLs, a
        name given twice, or a value of another type.
    """
    value = plain_value(value)
    if isinstance(value, str):
        items = [item for item in value.split(",") if item.strip()]
        named = [_NAMED.match(item) for item in items]
        if not any(named):
            return [parse_url(item, f"{name} item {i}") for i, item in enumerate(items, start=1)]
        if not all(named):
            raise ConfigurationError(
                f"{name} mixes name=URL pairs and bare URLs; name every replica "
                "(replica1=postgresql://...,replica2=postgresql://...) or none"
            )
        result: dict[str, Any] = {}
        for match in named:
            assert match is not None
            replica, url = match[1], match[2]
            if replica in result:
                raise ConfigurationError(f"{name} names replica {replica!r} twice")
            result[replica] = parse_url(url, f"{name} ({replica})")
        return result
    if isinstance(value, Mapping):
        return {key: parse_url(url, f"{name}[{key!r}]") for key, url in value.items()}
    if isinstance(value, (list, tuple)):
        return [parse_url(url, f"{name}[{i}]") for i, url in enumerate(value)]
    raise ConfigurationError(
        f"{name} must be comma-separated URLs, a list of URLs or a mapping of name to URL, "
        f"not {_config.kind_of(value)}"
    )
