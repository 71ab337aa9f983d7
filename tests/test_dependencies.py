"""A missing driver or greenlet is named at once, with the extra that installs it.

Modules are made unimportable here by a ``None`` entry in ``sys.modules`` (what
Python itself does to block an import); ``test_install.py`` proves the same in
real venvs that never had them.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc

import sqlalchemy_replicas as sr
from sqlalchemy_replicas import _demo, cli
from sqlalchemy_replicas.exc import ConfigurationError, MissingDependency
from sqlalchemy_replicas.testing import MariaDBTopology, PostgresTopology, Topology
from sqlalchemy_replicas.testing._binaries import mariadb_binaries

PG = "postgresql+psycopg://u:secretpw@127.0.0.1:1/db"
PG2 = "postgresql+psycopg://u:secretpw@127.0.0.1:2/db"


def block(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``modules`` unimportable for the rest of the test."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize(
    ("url", "module", "install"),
    [
        (PG, "psycopg", "pip install 'sqlalchemy-replicas[postgresql]'"),
        ("mysql+pymysql://u:secretpw@h/db", "pymysql", "pip install 'sqlalchemy-replicas[mysql]'"),
        (
            "mariadb+pymysql://u:secretpw@h/db",
            "pymysql",
            "pip install 'sqlalchemy-replicas[mysql]'",
        ),
        (
            "mysql+aiomysql://u:secretpw@h/db",
            "aiomysql",
            "pip install 'sqlalchemy-replicas[asyncio]'",
        ),
        (
            "postgresql+psycopg_async://u:secretpw@h/db",
            "psycopg",
            "pip install 'sqlalchemy-replicas[postgresql,asyncio]'",
        ),
    ],
)
def test_missing_driver_raises_a_configuration_error_naming_module_and_extra(
    monkeypatch: pytest.MonkeyPatch, url: str, module: str, install: str
) -> None:
    """ReplicaRouter with a URL whose driver is not installed raises MissingDependency
    (a ConfigurationError, so an sqlalchemy ArgumentError) naming the server, the
    module and the pip install line, never the password; the ImportError is its cause."""
    block(monkeypatch, module)
    with pytest.raises(MissingDependency) as caught:
        sr.ReplicaRouter(url)
    error = caught.value
    assert isinstance(error, ConfigurationError)
    assert isinstance(error, sa_exc.ArgumentError)
    assert not isinstance(error, ImportError)
    assert isinstance(error.__cause__, ImportError)
    assert error.module == module
    message = str(error)
    assert message.startswith("primary (")
    assert repr(module) in message
    assert install in message
    assert "secretpw" not in message


def test_a_replica_with_a_missing_driver_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """The error says which server's URL needs the driver."""
    block(monkeypatch, "pymysql")
    with pytest.raises(MissingDependency, match=r"^replica1 \(mysql\+pymysql\) needs"):
        sr.ReplicaRouter(PG, ["mysql+pymysql://u@h/db"])


def test_async_without_greenlet_names_the_asyncio_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without greenlet, async URLs and router.async_sessionmaker() raise
    MissingDependency naming greenlet and the [asyncio] extra, while a sync
    router still builds and makes sessions."""
    block(monkeypatch, "greenlet")
    install = "pip install 'sqlalchemy-replicas[asyncio]'"
    for url in ("postgresql+psycopg_async://u@h/db", "mysql+aiomysql://u@h/db"):
        with pytest.raises(MissingDependency, match=r"'greenlet' \(for SQLAlchemy's asyncio") as e:
            sr.ReplicaRouter(url)
        assert e.value.module == "greenlet"
        assert e.value.extra == "asyncio"
        assert install in str(e.value)
    router = sr.ReplicaRouter(PG, [PG2])
    try:
        with router.sessionmaker()() as session:
            assert isinstance(session, sr.RoutingSession)
        with pytest.raises(MissingDependency, match=r"router\.async_sessionmaker\(\) needs"):
            # A sync router, on purpose: greenlet is checked before the engine kind.
            router.async_sessionmaker()  # type: ignore[misc]
    finally:
        router.dispose()


def test_missing_dependency_survives_pickling() -> None:
    """The error crosses process boundaries (multiprocessing, task queues) intact."""
    error = MissingDependency("needs psycopg", module="psycopg", extra="postgresql")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is MissingDependency
    assert (str(copy), copy.module, copy.extra) == ("needs psycopg", "psycopg", "postgresql")


@pytest.mark.parametrize(
    ("topology_class", "module", "extra"),
    [(PostgresTopology, "psycopg", "[postgresql]"), (MariaDBTopology, "pymysql", "[mysql]")],
)
def test_topology_with_a_missing_driver_fails_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    topology_class: type[PostgresTopology] | type[MariaDBTopology],
    module: str,
    extra: str,
) -> None:
    """start() raises MissingDependency naming the driver and its extra before it
    looks for binaries or creates a directory (not a start-up timeout a minute later)."""
    block(monkeypatch, module)
    base = tmp_path / "base"
    base.mkdir()
    # Binaries from an empty directory: looking for them would raise ServerBinaryNotFound.
    topology: Topology = topology_class(replicas=1, bindir=tmp_path / "no-binaries", base_dir=base)
    with pytest.raises(MissingDependency, match=rf"^{topology_class.__name__} needs") as caught:
        topology.start()
    assert f"sqlalchemy-replicas{extra}" in str(caught.value)
    assert list(base.iterdir()) == []
    assert topology.server_pids == []


def test_demo_without_psycopg_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`sqlalchemy-replicas demo` always runs PostgreSQL: without psycopg it exits
    1 before starting any server, the module and the pip install line on
    stderr, no traceback, nothing of the demo on stdout."""
    block(monkeypatch, "psycopg")
    assert cli.main(["demo"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("sqlalchemy-replicas: error: ")
    assert repr("psycopg") in err
    assert "pip install 'sqlalchemy-replicas[postgresql]'" in err
    assert "Traceback" not in err


def test_demo_without_pymysql_runs_postgresql_and_says_why_mariadb_was_skipped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """MariaDB installed but PyMySQL not (a venv with the postgresql extra only):
    the demo runs its PostgreSQL part and ends saying MariaDB was skipped and
    what to install, instead of refusing to run at all. (The part itself is
    left out here: ./scripts/demo runs it in CI.)"""
    mariadb_binaries()  # the suite has MariaDB, so the demo would run it too
    block(monkeypatch, "pymysql")
    ran: list[str] = []
    monkeypatch.setattr(_demo, "_run", lambda topology, transcript: ran.append(topology.backend))
    assert cli.main(["demo"]) == 0
    out, err = capsys.readouterr()
    assert ran == ["postgresql"]
    assert err == ""
    assert out.splitlines()[-1].startswith("== MariaDB: skipped: ")
    assert repr("pymysql") in out
    assert "pip install 'sqlalchemy-replicas[mysql]'" in out


def test_sync_paths_never_import_the_asyncio_extension() -> None:
    """Importing the package, its CLI, demo and testing modules, and routing a sync
    session never imports sqlalchemy.ext.asyncio, which needs greenlet on
    SQLAlchemy 2.1 (run in a fresh interpreter where that import is blocked)."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["sqlalchemy.ext.asyncio"] = None
        sys.modules["greenlet"] = None
        import sqlalchemy as sa
        import sqlalchemy_replicas as sr
        import sqlalchemy_replicas._demo, sqlalchemy_replicas.cli
        import sqlalchemy_replicas.testing, sqlalchemy_replicas.testing.pytest_plugin
        import _sqlalchemy_replicas_pytest
        router = sr.ReplicaRouter("sqlite://")
        assert not router.is_async
        with router.sessionmaker()() as session:
            assert session.scalar(sa.select(sa.literal(1))) == 1
        router.dispose()
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"
