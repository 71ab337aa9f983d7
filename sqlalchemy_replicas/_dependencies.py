"""Optional packages: is one importable, and which extra installs it.

The package itself needs only SQLAlchemy; drivers (psycopg, PyMySQL,
aiomysql) and greenlet come with extras. When one is missing, the user
gets a :class:`~sqlalchemy_replicas.exc.MissingDependency` at once, naming
the module and the ``pip install`` that brings it, instead of a bare
``ModuleNotFoundError`` from deep inside SQLAlchemy (or, for a test
topology, a server-start timeout a minute later).

I/O: imports modules; nothing else.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Final

from sqlalchemy.engine import URL

from .exc import MissingDependency

__all__ = ["EXTRAS", "install_command", "missing_driver", "require_module"]

#: Top-level module -> the sqlalchemy-replicas extra that installs it.
EXTRAS: Final[Mapping[str, str]] = {
    "psycopg": "postgresql",
    "pymysql": "mysql",
    "aiomysql": "asyncio",
    "greenlet": "asyncio",
    "celery": "celery",
    "prometheus_client": "prometheus",
    "opentelemetry": "opentelemetry",
}

# Why a module is needed, when its name does not say it.
_PURPOSE: Final[Mapping[str, str]] = {"greenlet": "SQLAlchemy's asyncio support"}


def install_command(extras: Iterable[str]) -> str:
    """The ``pip install`` line for sqlalchemy-replicas with ``extras``."""
    return f"pip install 'sqlalchemy-replicas[{','.join(extras)}]'"


def _missing(
    module: str, needed_by: str, error: ImportError, also: Iterable[str]
) -> MissingDependency:
    extra = EXTRAS.get(module, EXTRAS.get(module.split(".")[0]))
    purpose = f" (for {_PURPOSE[module]})" if module in _PURPOSE else ""
    if extra is None:
        fix = f"install the package that provides the {module!r} module"
    else:
        # dict.fromkeys: the module's own extra first, no repeats.
        fix = install_command(dict.fromkeys((extra, *also)))
    return MissingDependency(
        f"{needed_by} needs the Python module {module!r}{purpose}, which cannot be "
        f"imported ({error}); install it: {fix}",
        module=module,
        extra=extra,
    )


def require_module(module: str, needed_by: str, *, also: Iterable[str] = ()) -> None:
    """Import ``module`` or raise the error that names its extra.

    :param needed_by: what needs it, for the message (``"PostgresTopology"``).
    :param also: further extras the fix must name (``asyncio`` for an async
        driver).
    :raises MissingDependency: when ``module`` cannot be imported.
    """
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise _missing(module, needed_by, exc, also) from exc


def missing_driver(error: ImportError, url: URL, needed_by: str) -> MissingDependency:
    """The error for ``url``'s DBAPI driver failing to import with ``error``
    (as ``create_engine`` raises it).

    :param needed_by: what the URL was given as (``"primary"``, ``"replica1"``).
    """
    # ModuleNotFoundError names the module; other ImportErrors (psycopg
    # without libpq) may not, and then the driver is what is missing.
    module = (error.name or url.get_driver_name()).split(".")[0]
    also = ("asyncio",) if url.get_dialect().is_async else ()
    return _missing(module, f"{needed_by} ({url.drivername})", error, also)
