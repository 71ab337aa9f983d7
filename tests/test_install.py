"""A user's install works: fresh venvs with only the declared dependencies.

Each venv gets the package as a wheel with no extras (``pip install
sqlalchemy-replicas``) plus one driver, as a user adds it: one with every
declared dependency at its floor (SQLAlchemy, typing_extensions), one with
the newest that pip picks. Neither has
greenlet: SQLAlchemy 2.1 does not install it without ``sqlalchemy[asyncio]``,
and from 2.0 (which pulls it in on x86_64) it is uninstalled to prove the
same. In each: the package imports, ``sqlalchemy-replicas --help`` runs, a
RoutingSession writes on the primary and reads after it on a replica of a
real topology (the servers say which they are), and what is missing is
named with its extra: greenlet for async URLs, the other driver, the demo's
driver. pip's cache is used; without network or an index this fails, it
never skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from sqlalchemy_replicas.testing import Topology
from sqlalchemy_replicas.testing._binaries import mariadb_binaries

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).with_name("install_probe.py")


def _declared_floors() -> dict[str, str]:
    """Each ``name>=version`` of pyproject.toml's ``dependencies``: name -> version."""
    # A regex, not tomllib: Python 3.10 has no tomllib.
    line = re.search(r"^dependencies = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert line is not None, "pyproject.toml has no one-line dependencies = [...]"
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', line.group(1)))


FLOORS = _declared_floors()
LOWEST_SQLALCHEMY = FLOORS["sqlalchemy"]


@dataclass(frozen=True)
class Spec:
    """One fresh venv: what is installed besides the wheel, and what it lacks."""

    requirements: tuple[str, ...]
    #: The topology (fixture ``fresh_<topology>_topology``) it routes on.
    topology: str
    backend: str
    #: A URL whose driver this venv lacks, the driver's module and its extra.
    missing_url: str
    missing_module: str
    missing_extra: str
    async_url: str
    #: Exactly this SQLAlchemy, or None for the newest (2.1 or later).
    sqlalchemy: str | None


LOWEST = Spec(
    # Every declared dependency at its floor (SQLAlchemy, typing_extensions).
    requirements=(*(f"{name}=={version}" for name, version in FLOORS.items()), "psycopg[binary]"),
    topology="postgres",
    backend="postgresql",
    missing_url="mariadb+pymysql://app:pw@127.0.0.1:1/app",
    missing_module="pymysql",
    missing_extra="mysql",
    async_url="postgresql+psycopg_async://postgres@127.0.0.1:1/postgres",
    sqlalchemy=LOWEST_SQLALCHEMY,
)
NEWEST = Spec(
    requirements=("pymysql",),
    topology="mariadb",
    backend="mariadb",
    missing_url="postgresql+psycopg://postgres@127.0.0.1:1/postgres",
    missing_module="psycopg",
    missing_extra="postgresql",
    async_url="mysql+aiomysql://app:pw@127.0.0.1:1/app",
    sqlalchemy=None,
)

# The venvs must see only what was installed into them: no PYTHONPATH (a
# developer's checkout), no outer venv.
_ENV = {
    key: value
    for key, value in os.environ.items()
    if key not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "VIRTUAL_ENV")
}


def run(argv: Sequence[str | Path], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with the clean environment; with ``check``, fail showing its output."""
    result = subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        env=_ENV,
        timeout=300,
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, argv))} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
        )
    return result


def pip(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """This interpreter's pip (with its cache); ``--python`` points it at a venv."""
    return run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args])


@dataclass(frozen=True)
class Venv:
    """A fresh venv built from :class:`Spec`."""

    spec: Spec
    path: Path

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    def python(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the venv's Python isolated (``-I``: no script dir, no user site)."""
        return run([self.bin / "python", "-I", *args], check=check)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as a wheel, built from a copy of the sources (a build writes
    ``build/`` next to them; the checkout stays untouched)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(
        ROOT / "sqlalchemy_replicas",
        source / "sqlalchemy_replicas",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    # The top-level modules too (the pytest plugin is one).
    for path in (ROOT / "pyproject.toml", ROOT / "README.md", ROOT / "LICENSE", *ROOT.glob("*.py")):
        shutil.copy2(path, source / path.name)
    pip("wheel", "--quiet", "--no-deps", "--wheel-dir", work / "dist", source)
    (built,) = (work / "dist").glob("sqlalchemy_replicas-*.whl")
    return built


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(LOWEST, marks=pytest.mark.postgresql, id=f"sqlalchemy{LOWEST_SQLALCHEMY}"),
        pytest.param(NEWEST, marks=pytest.mark.mariadb, id="sqlalchemy-newest"),
    ],
)
def venv(
    request: pytest.FixtureRequest, wheel: Path, tmp_path_factory: pytest.TempPathFactory
) -> Venv:
    """A fresh venv: the wheel with no extras, the spec's requirements, no greenlet."""
    spec: Spec = request.param
    path = tmp_path_factory.mktemp("venv") / "venv"
    # No pip inside (saves ensurepip's seconds): this interpreter's pip installs into it.
    run([sys.executable, "-m", "venv", "--without-pip", path])
    target = ("--python", path / "bin" / "python")
    pip(*target, "install", "--quiet", wheel, *spec.requirements)
    if spec.sqlalchemy is not None and spec.sqlalchemy.startswith("2.0"):
        # SQLAlchemy 2.0 depends on greenlet on common platforms; 2.1 no longer does.
        pip(*target, "uninstall", "--quiet", "--yes", "greenlet")
    return Venv(spec, path)


def test_the_venv_has_the_declared_sqlalchemy_and_no_greenlet(venv: Venv) -> None:
    """The venv runs the SQLAlchemy it is meant to (the declared floor, or 2.1 or
    later) and greenlet cannot be imported in it."""
    version = venv.python("-c", "import sqlalchemy; print(sqlalchemy.__version__)").stdout.strip()
    if venv.spec.sqlalchemy is not None:
        assert version == venv.spec.sqlalchemy
    else:
        assert tuple(int(part) for part in version.split(".")[:2]) >= (2, 1), version
    greenlet = venv.python("-c", "import greenlet", check=False)
    assert greenlet.returncode != 0
    assert "No module named 'greenlet'" in greenlet.stderr


def test_the_package_imports_and_its_cli_runs_without_greenlet(venv: Venv) -> None:
    """`import sqlalchemy_replicas` loads no part of SQLAlchemy's asyncio extension,
    and `sqlalchemy-replicas --help` exits 0 listing its commands."""
    loaded = venv.python(
        "-c",
        "import sys, sqlalchemy_replicas, sqlalchemy_replicas.testing; "
        "print([m for m in sys.modules if m.startswith('sqlalchemy.ext.asyncio')])",
    )
    assert loaded.stdout.strip() == "[]"
    help_ = run([venv.bin / "sqlalchemy-replicas", "--help"])
    assert help_.stdout.startswith("usage: sqlalchemy-replicas")
    assert "demo" in help_.stdout


def test_sync_routing_on_a_real_topology(venv: Venv, request: pytest.FixtureRequest) -> None:
    """In the venv, a RoutingSession's write runs on the primary and a read after
    its commit runs on a replica that has the row: the servers report their own
    port and whether they are replicas."""
    topology: Topology = request.getfixturevalue(f"fresh_{venv.spec.topology}_topology")
    urls = [topology.primary_url, *topology.replica_urls]
    result = venv.python(
        str(PROBE),
        venv.spec.backend,
        *(url.render_as_string(hide_password=False) for url in urls),
    )
    report = json.loads(result.stdout)
    assert report["name"] == "written"
    assert report["written_on"] == topology.primary_url.port
    assert report["read_on"] in {url.port for url in topology.replica_urls}
    assert report["read_on_replica"] is True


_CATCH = """
import json, sys
import sqlalchemy_replicas as sr
try:
    {action}
except sr.exc.MissingDependency as error:
    print(json.dumps([error.module, error.extra, str(error)]))
else:
    print("null")
"""


def missing_dependency(venv: Venv, action: str, *argv: str) -> tuple[str, str, str]:
    """Run ``action`` in the venv; return the MissingDependency's module, extra, message."""
    caught = json.loads(venv.python("-c", _CATCH.format(action=action), *argv).stdout)
    assert caught is not None, f"{action} raised no MissingDependency"
    module, extra, message = caught
    return module, extra, message


def test_async_without_greenlet_names_the_asyncio_extra(venv: Venv) -> None:
    """An async URL, and router.async_sessionmaker(), raise MissingDependency naming
    greenlet and `pip install 'sqlalchemy-replicas[asyncio]'`."""
    for action in (
        "sr.ReplicaRouter(sys.argv[1])",
        "sr.ReplicaRouter('sqlite://').async_sessionmaker()",
    ):
        module, extra, message = missing_dependency(venv, action, venv.spec.async_url)
        assert (module, extra) == ("greenlet", "asyncio")
        assert "pip install 'sqlalchemy-replicas[asyncio]'" in message


def test_a_missing_driver_is_named_with_its_extra(venv: Venv) -> None:
    """A URL for the driver the venv lacks raises MissingDependency naming the
    module and its extra, not a bare ModuleNotFoundError."""
    spec = venv.spec
    module, extra, message = missing_dependency(
        venv, "sr.ReplicaRouter(sys.argv[1])", spec.missing_url
    )
    assert (module, extra) == (spec.missing_module, spec.missing_extra)
    assert f"pip install 'sqlalchemy-replicas[{spec.missing_extra}]'" in message


def test_the_demo_without_a_driver_runs_what_it_can(venv: Venv) -> None:
    """`python -m sqlalchemy_replicas demo` without psycopg exits 1 before any
    server starts (nothing on stdout); without PyMySQL (MariaDB installed) it
    runs the PostgreSQL part and ends saying MariaDB was skipped. Either way
    the missing module and its pip install are named, without a traceback."""
    mariadb_binaries()  # the suite has MariaDB: the demo would run it too
    result = venv.python("-m", "sqlalchemy_replicas", "demo", check=False)
    spec = venv.spec
    install = f"pip install 'sqlalchemy-replicas[{spec.missing_extra}]'"
    assert "Traceback" not in result.stderr
    if spec.missing_module == "psycopg":
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stdout == ""
        assert repr(spec.missing_module) in result.stderr
        assert install in result.stderr
    else:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "statements per server" in result.stdout  # the PostgreSQL part ran
        last = result.stdout.splitlines()[-1]
        assert last.startswith("== MariaDB: skipped: "), last
        assert repr(spec.missing_module) in last
        assert install in last
