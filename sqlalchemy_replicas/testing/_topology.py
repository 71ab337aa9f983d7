"""What every local test topology offers, whatever the database."""

from __future__ import annotations

import abc
import signal
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from sqlalchemy.engine import URL

from .._dependencies import require_module
from ..exc import ConfigurationError, TopologyError
from ._process import REGISTRY, OSUser, ServerProcess, remove_tree

__all__ = ["Topology"]

_T = TypeVar("_T", bound="Topology")


class Topology(abc.ABC):
    """A primary and its replicas, each a real server process on 127.0.0.1.

    Use it as a context manager (or call :meth:`start` and :meth:`stop`).
    :meth:`stop` stops every process it started, by pid, and deletes its
    temporary directory, also when the block raises or is interrupted; as a
    last resort, topologies still running at interpreter exit are stopped too.

    Replicas are addressed by index: ``replica_urls[i]`` is replica ``i``.

    :param replicas: how many replicas to start (0 or more).
    :param base_dir: where to create the topology's temporary directory
        (default: the system temp dir).
    :param os_user: when running as root, the unprivileged OS account that
        runs the servers (default: the backend's usual account, else
        ``nobody``). Ignored when not root.
    :param startup_timeout: seconds each server may take to come up.
    """

    #: Short name of the backend, used in directory names and messages.
    backend: str = ""
    #: The DBAPI module of the topology's URLs and its own admin connections
    #: (empty: none to check).
    driver_module: str = ""
    #: Seconds a graceful stop may take before the process is killed.
    stop_timeout: float = 30.0

    def __init__(
        self,
        replicas: int = 2,
        *,
        base_dir: str | Path | None = None,
        os_user: str | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise ConfigurationError(f"replicas must be an int >= 0, not {replicas!r}")
        if startup_timeout <= 0:
            raise ConfigurationError(f"startup_timeout must be > 0, not {startup_timeout!r}")
        self.replica_count = replicas
        self.startup_timeout = startup_timeout
        self._base_parent = Path(base_dir) if base_dir is not None else None
        self._os_user_name = os_user
        self._dir: Path | None = None
        self._primary: ServerProcess | None = None
        self._replicas: list[ServerProcess] = []
        self._paused: set[int] = set()
        self._promoted = False
        self._delays: dict[int, float] = {}
        self._lock = threading.RLock()

    # -- lifecycle ------------------------------------------------------------

    def start(self: _T) -> _T:
        """Create, start and connect all servers; return ``self``.

        :raises TopologyError: when a server fails to come up (with its log's tail).
        :raises ServerBinaryNotFound: when the server binaries are missing.
        :raises MissingDependency: when :attr:`driver_module` is not installed,
            before any server starts.
        """
        with self._lock:
            if self._dir is not None:
                raise TopologyError(f"this {self.backend} topology is already started")
            self.check_driver()
            self._locate_binaries()
            user = self._os_user()
            self._dir = Path(tempfile.mkdtemp(prefix=f"sr-{self.backend}-", dir=self._base_parent))
            REGISTRY.add(id(self), self.stop)
            try:
                if user is not None:
                    user.chown_tree(self._dir)
                self._build(self._dir, user)
            except BaseException:
                self.stop()
                raise
            return self

    def check_driver(self) -> None:
        """Raise :class:`~sqlalchemy_replicas.exc.MissingDependency`, naming the
        extra to install, when :attr:`driver_module` cannot be imported.

        :meth:`start` calls it first: without it, readiness probes would fail
        until the start-up timeout and report a server that never came up.
        """
        if self.driver_module:
            require_module(self.driver_module, type(self).__name__)

    def stop(self) -> None:
        """Stop every server this topology started and delete its directory.

        Safe to call more than once and on a topology that failed to start.
        """
        with self._lock:
            servers = [s for s in (self._primary, *self._replicas) if s is not None]
            # Signal all, then wait for all: the servers shut down in parallel
            # without threads, which are no longer available at interpreter exit.
            for server in servers:
                server.send_signal(self._graceful_signal)
            for server in servers:
                server.wait_exit(timeout=self.stop_timeout)
            self._primary = None
            self._replicas = []
            self._paused.clear()
            self._delays.clear()
            if self._dir is not None:
                remove_tree(self._dir)
                self._dir = None
            REGISTRY.discard(id(self))

    def __enter__(self: _T) -> _T:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what tests read ---------------------------------------------------------

    @property
    def directory(self) -> Path:
        """The topology's temporary directory (data dirs, sockets, logs)."""
        if self._dir is None:
            raise TopologyError(f"the {self.backend} topology is not started")
        return self._dir

    @property
    def server_pids(self) -> list[int]:
        """Pids of the server processes currently running."""
        return [
            pid
            for server in (self._primary, *self._replicas)
            if server is not None and (pid := server.pid) is not None
        ]

    @property
    def replica_names(self) -> tuple[str, ...]:
        """The replicas' names (``replica1``, ...), in index order."""
        return tuple(server.name for server in self._replica_servers())

    @property
    def primary_url(self) -> URL:
        """SQLAlchemy URL of the primary, for the sync driver."""
        return self._url(self._primary_server().port, is_async=False)

    @property
    def replica_urls(self) -> tuple[URL, ...]:
        """SQLAlchemy URLs of the replicas, for the sync driver, in index order."""
        return tuple(self._url(s.port, is_async=False) for s in self._replica_servers())

    @property
    def async_primary_url(self) -> URL:
        """SQLAlchemy URL of the primary, for the asyncio driver."""
        return self._url(self._primary_server().port, is_async=True)

    @property
    def async_replica_urls(self) -> tuple[URL, ...]:
        """SQLAlchemy URLs of the replicas, for the asyncio driver, in index order."""
        return tuple(self._url(s.port, is_async=True) for s in self._replica_servers())

    def server_version(self) -> str:
        """The primary server's product and version, e.g. ``PostgreSQL 15.19``."""
        return self._version(self._primary_server())

    def is_running(self, replica: int | None = None) -> bool:
        """Whether the primary (``replica=None``) or replica ``replica`` is up."""
        server = self._primary_server() if replica is None else self._replica(replica)
        return server.is_running

    # -- administration -----------------------------------------------------------

    def admin_execute(self, server: Literal["primary"] | int, *statements: str) -> None:
        """Run ``statements`` in order, in AUTOCOMMIT, as the server's superuser
        (PostgreSQL's bootstrap user; MariaDB's ``root``, over its socket):
        what the application's user may not do, such as creating users,
        databases or grants, or changing server settings.

        On the primary, changes replicate as usual (:meth:`wait_for_catchup`
        waits for them); on a replica they stay there (a write may break its
        replication: undo it before the test ends, :meth:`reset` does not).

        :param server: ``"primary"``, or a replica's index (as for
            ``replica_urls``).
        :raises ConfigurationError: for a replica index out of range.
        """
        target = self._admin_target(server)
        conn = self._admin(target)
        try:
            cursor = conn.cursor()
            try:
                for statement in statements:
                    cursor.execute(statement)
            finally:
                cursor.close()
        finally:
            conn.close()

    def admin_query(self, server: Literal["primary"] | int, sql: str) -> Any:
        """The first column of the first row of ``sql`` (None for no row), run
        as :meth:`admin_execute` runs statements.

        :param server: ``"primary"``, or a replica's index.
        :raises ConfigurationError: for a replica index out of range.
        """
        return self._query(self._admin_target(server), sql)

    def _admin_target(self, server: Literal["primary"] | int) -> ServerProcess:
        return self._primary_server() if server == "primary" else self._replica(server)

    # -- fault injection ---------------------------------------------------------

    def pause_replay(self, replica: int) -> None:
        """Stop applying replicated changes on a replica; it keeps receiving them."""
        with self._lock:
            self._pause(self._replica(replica))
            self._paused.add(replica)

    def resume_replay(self, replica: int) -> None:
        """Undo :meth:`pause_replay`."""
        with self._lock:
            self._resume(self._replica(replica))
            self._paused.discard(replica)

    def set_apply_delay(self, replica: int, seconds: float) -> None:
        """Make a replica apply each change ``seconds`` after it was committed; 0
        undoes it. In force for every commit made after this returns (on
        PostgreSQL the standby restarts for that, so pooled connections to it
        break: use ``pool_pre_ping``). A paused replica stays paused."""
        if seconds < 0:
            raise ConfigurationError(f"seconds must be >= 0, not {seconds!r}")
        with self._lock:
            if self._delays.get(replica, 0) == seconds:
                return
            server = self._replica(replica)
            self._set_delay(server, seconds)
            self._delays[replica] = seconds
            if replica in self._paused:
                # Changing the delay restarted replay (or the whole replica).
                self._pause(server)

    def stop_replica(self, replica: int) -> None:
        """Shut a replica down cleanly."""
        self._replica(replica).signal_and_wait(self._graceful_signal, timeout=self.stop_timeout)

    def kill_replica(self, replica: int) -> None:
        """Crash a replica: no clean shutdown, open connections break."""
        self._replica(replica).signal_and_wait(self._crash_signal, timeout=self.stop_timeout)

    def freeze_replica(self, replica: int) -> None:
        """Freeze a replica (SIGSTOP): connections open but nothing answers, as
        with a paused VM or a black-holed host."""
        self._replica(replica).freeze()

    def thaw_replica(self, replica: int) -> None:
        """Undo :meth:`freeze_replica`."""
        self._replica(replica).thaw()

    def start_replica(self, replica: int, *, await_replicating: bool = True) -> None:
        """Start a stopped or killed replica again on its old port; wait until it
        replicates, or with ``await_replicating=False`` (the primary is down,
        say) only until it accepts connections."""
        with self._lock:
            server = self._replica(replica)
            self._start_server(server, retry_port=False)
            self._paused.discard(replica)
            if await_replicating:
                self._await_replicating(server)

    def stop_primary(self) -> None:
        """Shut the primary down cleanly."""
        self._primary_server().signal_and_wait(self._graceful_signal, timeout=self.stop_timeout)

    def kill_primary(self) -> None:
        """Crash the primary: no clean shutdown, open connections break."""
        self._primary_server().signal_and_wait(self._crash_signal, timeout=self.stop_timeout)

    def start_primary(self) -> None:
        """Start a stopped or killed primary again on its old port."""
        with self._lock:
            self._start_server(self._primary_server(), retry_port=False)

    def promote_replica(self, replica: int) -> None:
        """Make a replica a primary that accepts writes (a failover); the old
        primary keeps running until stopped. The other replicas still follow
        the old primary. There is no way back: :meth:`reset` refuses a
        topology after this, so give a failover test a topology of its own."""
        with self._lock:
            self._promote(self._replica(replica))
            self._promoted = True

    def wait_for_catchup(self, timeout: float = 30.0) -> None:
        """Wait until every running, unpaused replica has applied all the
        primary has committed so far.

        :raises TopologyError: when one has not caught up within ``timeout``.
        """
        target = self._primary_position()
        for index, server in enumerate(self._replica_servers()):
            if server.is_running and index not in self._paused:
                self._await_position(server, target, timeout)

    def reset(self) -> None:
        """Undo all fault injection and drop all data, then wait for catch-up.

        Starts stopped servers, thaws frozen ones, resumes paused replicas,
        removes apply delays, and empties the application database on the
        primary (replicated).
        """
        with self._lock:
            if self._promoted:
                raise TopologyError(
                    "a replica of this topology was promoted (promote_replica); it cannot "
                    "be reset: start a new topology"
                )
            if not self._primary_server().is_running:
                self.start_primary()
            for index, server in enumerate(self._replica_servers()):
                server.thaw()
                if not server.is_running:
                    self.start_replica(index)
                self.set_apply_delay(index, 0)
                self._resume(server)
            self._paused.clear()
            self._drop_data()
            self.wait_for_catchup()

    # -- for backends ---------------------------------------------------------------

    #: How the servers are shut down cleanly / crashed.
    _graceful_signal: int = signal.SIGTERM
    _crash_signal: int = signal.SIGKILL

    @abc.abstractmethod
    def _locate_binaries(self) -> None:
        """Find the server binaries or raise ServerBinaryNotFound."""

    @abc.abstractmethod
    def _default_os_users(self) -> Sequence[str]:
        """OS accounts to run the servers as when root, in order of preference."""

    @abc.abstractmethod
    def _build(self, directory: Path, user: OSUser | None) -> None:
        """Create and start all servers and replication under ``directory``."""

    @abc.abstractmethod
    def _url(self, port: int, *, is_async: bool) -> URL:
        """The application URL for a server on ``port``."""

    @abc.abstractmethod
    def _admin(self, server: ServerProcess) -> Any:
        """A new DBAPI connection to ``server`` as its superuser, AUTOCOMMIT."""

    @abc.abstractmethod
    def _query(self, server: ServerProcess, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """The first column of the first row of ``sql`` on ``server`` (None for no row)."""

    @abc.abstractmethod
    def _version(self, server: ServerProcess) -> str:
        """``server``'s product name and version."""

    @abc.abstractmethod
    def _accepts_connections(self, server: ServerProcess) -> bool:
        """True once ``server`` accepts an admin connection."""

    @abc.abstractmethod
    def _await_replicating(self, server: ServerProcess) -> None:
        """Wait until a (re)started replica is connected to the primary."""

    @abc.abstractmethod
    def _pause(self, server: ServerProcess) -> None: ...

    @abc.abstractmethod
    def _resume(self, server: ServerProcess) -> None: ...

    @abc.abstractmethod
    def _set_delay(self, server: ServerProcess, seconds: float) -> None: ...

    @abc.abstractmethod
    def _promote(self, server: ServerProcess) -> None: ...

    @abc.abstractmethod
    def _primary_position(self) -> str:
        """The primary's current replication position, in its own notation."""

    @abc.abstractmethod
    def _await_position(self, server: ServerProcess, position: str, timeout: float) -> None:
        """Wait until replica ``server`` has applied ``position``."""

    @abc.abstractmethod
    def _drop_data(self) -> None:
        """Empty the application database on the primary."""

    # -- helpers for backends -----------------------------------------------------

    def _os_user(self) -> OSUser | None:
        from ._process import server_user

        return server_user(self._default_os_users(), self._os_user_name)

    def _primary_server(self) -> ServerProcess:
        if self._primary is None:
            raise TopologyError(f"the {self.backend} topology is not started")
        return self._primary

    def _replica_servers(self) -> list[ServerProcess]:
        self._primary_server()
        return self._replicas

    def _replica(self, index: int) -> ServerProcess:
        replicas = self._replica_servers()
        if (
            isinstance(index, bool)
            or not isinstance(index, int)
            or not (0 <= index < len(replicas))
        ):
            raise ConfigurationError(
                f"replica index {index!r} is out of range; this topology has "
                f"{len(replicas)} replicas (indexes 0 to {len(replicas) - 1})"
            )
        return replicas[index]

    def _start_server(self, server: ServerProcess, *, retry_port: bool) -> None:
        """Start ``server`` and wait until it accepts connections."""
        server.start(
            lambda: self._accepts_connections(server),
            timeout=self.startup_timeout,
            retry_port=retry_port,
        )

    @staticmethod
    def _in_parallel(
        job: Callable[[ServerProcess], None], servers: Sequence[ServerProcess]
    ) -> None:
        """Run ``job`` for each server in threads; re-raise the first failure after all end."""
        if not servers:
            return
        with ThreadPoolExecutor(max_workers=len(servers)) as pool:
            futures = [pool.submit(job, server) for server in servers]
        for future in futures:
            future.result()
