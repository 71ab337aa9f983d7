"""A MariaDB primary with GTID replicas, for tests."""

from __future__ import annotations

import math
import shutil
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from ..exc import TopologyError
from ._binaries import mariadb_binaries
from ._process import OSUser, ServerProcess, run_tool, wait_until
from ._topology import Topology

__all__ = ["MariaDBTopology"]

_APP_USER = "app"
_APP_PASSWORD = "app"
_DATABASE = "app"
_REPL_USER = "repl"
_REPL_PASSWORD = "repl"

# Speed over durability: these servers live for one test session.
_FAST_OPTIONS = (
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=16M",
    "--innodb-flush-log-at-trx-commit=2",
    "--sync-binlog=0",
    "--innodb-doublewrite=0",
    "--performance-schema=OFF",
)


class MariaDBTopology(Topology):
    """A MariaDB primary and ``replicas`` GTID replicas, each its own ``mariadbd``.

    Replicas use ``MASTER_USE_GTID=slave_pos`` and run with ``read_only=1``.
    Applications connect as ``app``/``app`` (privileges on the ``app``
    database only, so ``read_only`` binds it) to the database ``app``.

    :param bindir: directory of ``mariadbd`` and ``mariadb-install-db``;
        default: ``$SQLALCHEMY_REPLICAS_MARIADB_BINDIR``, then ``PATH`` and
        ``/usr/sbin``.

    Faults: replay pause is ``STOP SLAVE SQL_THREAD``, apply delay is
    ``MASTER_DELAY`` (whole seconds: fractions round up; MariaDB stamps
    events in whole seconds, so a change may apply up to a second early), a crash is SIGKILL,
    a clean stop is SIGTERM.
    """

    backend = "mariadb"
    driver_module = "pymysql"

    def __init__(
        self, replicas: int = 2, *, bindir: str | Path | None = None, **kwargs: Any
    ) -> None:
        super().__init__(replicas, **kwargs)
        self._bindir_arg = bindir
        self._binaries: tuple[Path, Path] | None = None

    # -- building ------------------------------------------------------------------

    def _locate_binaries(self) -> None:
        self._binaries = mariadb_binaries(self._bindir_arg)

    def _default_os_users(self) -> Sequence[str]:
        return ("mysql",)

    def _build(self, directory: Path, user: OSUser | None) -> None:
        assert self._binaries is not None
        mariadbd, install_db = self._binaries
        template = directory / "template"
        run_tool(
            [
                str(install_db),
                "--no-defaults",
                f"--datadir={template}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
                f"--basedir={_basedir(mariadbd)}",
            ],
            user=user,
            what="mariadb-install-db",
        )
        names = ["primary", *(f"replica{i}" for i in range(1, self.replica_count + 1))]
        servers = []
        for server_id, name in enumerate(names, start=1):
            datadir = directory / name
            # Each server gets a copy of one template: MariaDB has no per-server
            # identity file, and one install-db run is much faster than three.
            shutil.copytree(template, datadir, symlinks=True)
            (directory / f"{name}.tmp").mkdir()
            if user is not None:
                user.chown_tree(datadir)
                user.chown_tree(directory / f"{name}.tmp")
            servers.append(self._server(name, server_id, datadir, directory, user, mariadbd))
        shutil.rmtree(template)
        self._primary, *self._replicas = servers
        self._in_parallel(lambda server: self._start_server(server, retry_port=True), servers)
        self._bootstrap_primary()
        self._in_parallel(self._connect_replica, self._replicas)

    def _server(
        self,
        name: str,
        server_id: int,
        datadir: Path,
        directory: Path,
        user: OSUser | None,
        mariadbd: Path,
    ) -> ServerProcess:
        is_replica = name != "primary"

        def argv(port: int) -> list[str]:
            return [
                str(mariadbd),
                "--no-defaults",
                f"--datadir={datadir}",
                f"--tmpdir={directory / f'{name}.tmp'}",
                f"--port={port}",
                "--bind-address=127.0.0.1",
                f"--socket={self._socket(name)}",
                f"--pid-file={directory / f'{name}.pid'}",
                f"--server-id={server_id}",
                "--log-bin=binlog",
                "--binlog-format=ROW",
                "--gtid-strict-mode=1",
                "--log-slave-updates",
                "--skip-name-resolve",
                # Lets the app user create stored functions with binary logging on.
                "--log-bin-trust-function-creators=1",
                *_FAST_OPTIONS,
                *(("--read-only=1",) if is_replica else ()),
            ]

        return ServerProcess(name, datadir, argv, directory / f"{name}.log", user)

    def _socket(self, name: str) -> Path:
        return self.directory / f"{name}.sock"

    def _bootstrap_primary(self) -> None:
        # Users are created on the primary only: they replicate.
        self._execute(
            self._primary_server(),
            f"CREATE DATABASE {_DATABASE}",
            f"CREATE USER '{_APP_USER}'@'%' IDENTIFIED BY '{_APP_PASSWORD}'",
            # On the app database only: ALL ON *.* would include READ_ONLY
            # ADMIN and let the app write to read_only replicas.
            f"GRANT ALL ON {_DATABASE}.* TO '{_APP_USER}'@'%'",
            # Lets the router see what a replica replicates from (its
            # identity check); it reads status only and bypasses nothing.
            f"GRANT SLAVE MONITOR ON *.* TO '{_APP_USER}'@'%'",
            f"CREATE USER '{_REPL_USER}'@'%' IDENTIFIED BY '{_REPL_PASSWORD}'",
            f"GRANT REPLICATION SLAVE ON *.* TO '{_REPL_USER}'@'%'",
        )

    def _connect_replica(self, server: ServerProcess) -> None:
        self._execute(
            server,
            "CHANGE MASTER TO MASTER_HOST='127.0.0.1', "
            f"MASTER_PORT={self._primary_server().port}, MASTER_USER='{_REPL_USER}', "
            f"MASTER_PASSWORD='{_REPL_PASSWORD}', MASTER_USE_GTID=slave_pos, "
            "MASTER_CONNECT_RETRY=1, MASTER_HEARTBEAT_PERIOD=1",
            "START SLAVE",
        )
        self._await_replicating(server)

    # -- connections -----------------------------------------------------------

    def _url(self, port: int, *, is_async: bool) -> URL:
        driver = "mariadb+aiomysql" if is_async else "mariadb+pymysql"
        return URL.create(
            driver,
            username=_APP_USER,
            password=_APP_PASSWORD,
            host="127.0.0.1",
            port=port,
            database=_DATABASE,
        )

    def _admin(self, server: ServerProcess) -> Any:
        import pymysql

        return pymysql.connect(
            unix_socket=str(self._socket(server.name)),
            user="root",
            password="",
            autocommit=True,
            connect_timeout=5,
        )

    def _execute(self, server: ServerProcess, *statements: str) -> None:
        conn = self._admin(server)
        try:
            with conn.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement)
        finally:
            conn.close()

    def _query(self, server: ServerProcess, sql: str, params: tuple[Any, ...] = ()) -> Any:
        conn = self._admin(server)
        try:
            with conn.cursor() as cursor:
                # No params: a "%" in sql stays as written (pymysql formats with ()).
                cursor.execute(sql, params or None)
                row = cursor.fetchone()
        finally:
            conn.close()
        return None if row is None else row[0]

    def _slave_status(self, server: ServerProcess) -> dict[str, Any]:
        import pymysql.cursors

        conn = self._admin(server)
        try:
            with conn.cursor(pymysql.cursors.DictCursor) as cursor:
                cursor.execute("SHOW SLAVE STATUS")
                row = cursor.fetchone()
        finally:
            conn.close()
        if row is None:
            raise TopologyError(f"{server.name} has no replication configured")
        status: dict[str, Any] = row
        return status

    def _version(self, server: ServerProcess) -> str:
        version = str(self._query(server, "SELECT VERSION()"))
        return f"MariaDB {version.split('-')[0]}"

    def _accepts_connections(self, server: ServerProcess) -> bool:
        # PyMySQL leaks its socket when connect() fails; probe with our own
        # first so that polling a starting server leaks nothing.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self._socket(server.name)))
            except OSError:
                return False
        return bool(self._query(server, "SELECT 1") == 1)

    def _await_replicating(self, server: ServerProcess) -> None:
        def replicating() -> bool:
            status = self._slave_status(server)
            if status["Last_SQL_Errno"] or status["Last_IO_Errno"] not in (0, 2003):
                raise TopologyError(
                    f"replication on {server.name} failed: {status['Last_SQL_Error']}"
                    f"{status['Last_IO_Error']}"
                )
            return bool(
                status["Slave_IO_Running"] == "Yes" and status["Slave_SQL_Running"] == "Yes"
            )

        wait_until(
            replicating,
            timeout=self.startup_timeout,
            what=f"{server.name} to replicate from the primary",
            alive=server,
        )

    # -- faults ------------------------------------------------------------------

    def _pause(self, server: ServerProcess) -> None:
        self._execute(server, "STOP SLAVE SQL_THREAD")

    def _resume(self, server: ServerProcess) -> None:
        self._execute(server, "START SLAVE SQL_THREAD")

    def _set_delay(self, server: ServerProcess, seconds: float) -> None:
        self._execute(
            server,
            "STOP SLAVE",
            f"CHANGE MASTER TO MASTER_DELAY={math.ceil(seconds)}",
            "START SLAVE",
        )

    def set_primary_read_only(self, read_only: bool) -> None:
        """Turn the primary's ``read_only`` on (a demotion, as failover tools
        do it to the old primary) or off."""
        self._execute(self._primary_server(), f"SET GLOBAL read_only = {int(read_only)}")

    def _promote(self, server: ServerProcess) -> None:
        self._execute(server, "STOP SLAVE", "RESET SLAVE ALL", "SET GLOBAL read_only = 0")

    # -- positions -------------------------------------------------------------------

    def _primary_position(self) -> str:
        return str(self._query(self._primary_server(), "SELECT @@gtid_binlog_pos"))

    def _await_position(self, server: ServerProcess, position: str, timeout: float) -> None:
        result = self._query(server, "SELECT MASTER_GTID_WAIT(%s, %s)", (position, timeout))
        if result != 0:
            raise TopologyError(
                f"timed out after {timeout:.1f}s waiting for {server.name} to apply {position}"
            )

    def _drop_data(self) -> None:
        self._execute(
            self._primary_server(),
            f"DROP DATABASE IF EXISTS {_DATABASE}",
            f"CREATE DATABASE {_DATABASE}",
        )


def _basedir(mariadbd: Path) -> Path:
    """The installation prefix of ``mariadbd`` (``/usr`` for ``/usr/sbin/mariadbd``)."""
    return mariadbd.resolve().parent.parent
