"""The pytest plugin, by a name inside the package, for loading it explicitly.

Installed, the plugin loads automatically from the top-level module
``_sqlalchemy_replicas_pytest`` (entry point ``pytest11``, name
``sqlalchemy_replicas``), which lives outside this package so that pytest
can load it without importing sqlalchemy-replicas or SQLAlchemy. Projects
that turn plugin auto-loading off (``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``)
name this module instead: ``-p sqlalchemy_replicas.testing.pytest_plugin``
or ``pytest_plugins = ["sqlalchemy_replicas.testing.pytest_plugin"]`` in
their root ``conftest.py``. Naming it while the plugin is also auto-loaded
changes nothing.

Fixtures: ``postgres_topology``, ``mariadb_topology`` (session-scoped),
``fresh_postgres_topology``, ``fresh_mariadb_topology`` (reset per test);
see :mod:`_sqlalchemy_replicas_pytest`. No I/O on import.
"""

from __future__ import annotations

import pytest

import _sqlalchemy_replicas_pytest

__all__: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    """Register the plugin module, unless pytest already auto-loaded it.

    The fixtures are not re-exported here: the same fixture functions in two
    plugins make ``pytest --fixtures`` fail (it cannot order the duplicates),
    and registering a module a second time, under another name, is an error.
    The module goes in under its own name, as ``-p`` would register it.
    """
    manager = config.pluginmanager
    if not manager.is_registered(_sqlalchemy_replicas_pytest):
        manager.register(_sqlalchemy_replicas_pytest)
