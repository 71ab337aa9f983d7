"""Server processes for local test topologies: start, await, signal, clean up.

Everything here works by pid on processes this module started itself; nothing
is ever found or killed by name.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..exc import TopologyError

_LOG_TAIL_CHARS = 3000


@dataclass(frozen=True)
class OSUser:
    """The unprivileged OS account that runs servers when we are root."""

    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that make ``subprocess`` run a command as this user."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown_tree(self, path: Path) -> None:
        """Give ``path`` and everything below it to this user."""
        os.chown(path, self.uid, self.gid)
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                os.chown(os.path.join(root, name), self.uid, self.gid, follow_symlinks=False)


def server_user(preferred: Sequence[str], explicit: str | None) -> OSUser | None:
    """The account to run servers as: None when we are not root (run as ourselves).

    :param preferred: account names to try in order (e.g. ``postgres``), then ``nobody``.
    :param explicit: an account name the caller insists on.
    """
    if os.geteuid() != 0:
        return None
    names = [explicit] if explicit else [*preferred, "nobody"]
    for name in names:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return OSUser(name, entry.pw_uid, entry.pw_gid)
    raise TopologyError(
        f"running as root, but no unprivileged OS user among {names} exists to run the "
        "database servers (they refuse to run as root); create one, e.g. "
        "'useradd --system dbtest', and pass os_user='dbtest'"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (callers retry on a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path) -> str:
    """The last few KB of a server log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return text[-_LOG_TAIL_CHARS:]


def run_tool(
    argv: Sequence[str], *, user: OSUser | None, what: str, timeout: float = 120.0
) -> None:
    """Run a server tool (initdb, pg_basebackup, ...) to completion or raise with its output."""
    try:
        result = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd="/",
            timeout=timeout,
            check=False,
            **(user.popen_kwargs() if user else {}),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TopologyError(f"{what} failed: {exc}") from exc
    if result.returncode != 0:
        output = result.stdout.decode(errors="replace")[-_LOG_TAIL_CHARS:]
        raise TopologyError(f"{what} failed with exit code {result.returncode}:\n{output}")


class ServerProcess:
    """One database server process, started and stopped by pid.

    :param name: the node's name (``primary``, ``replica1``, ...).
    :param datadir: the server's data directory.
    :param argv_for_port: builds the server's command line for a port.
    :param log_path: where the server's stdout and stderr go (appended).
    :param user: the OS user to run as, or None for ourselves.
    """

    def __init__(
        self,
        name: str,
        datadir: Path,
        argv_for_port: Callable[[int], list[str]],
        log_path: Path,
        user: OSUser | None,
    ) -> None:
        self.name = name
        self.datadir = datadir
        self.port = free_port()
        self.log_path = log_path
        self._argv_for_port = argv_for_port
        self._user = user
        self._process: subprocess.Popen[bytes] | None = None
        self._frozen = False

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs, else None."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def is_running(self) -> bool:
        """True while the server process has not exited."""
        return self._process is not None and self._process.poll() is None

    def spawn(self) -> None:
        """Start the server process (without waiting for it to accept connections)."""
        if self.is_running:
            raise TopologyError(f"{self.name} is already running (pid {self.pid})")
        with open(self.log_path, "ab") as log:
            try:
                self._process = subprocess.Popen(
                    self._argv_for_port(self.port),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd="/",
                    # Own session: a Ctrl-C in the terminal reaches the test
                    # runner, whose clean-up then stops the servers in order.
                    start_new_session=True,
                    **(self._user.popen_kwargs() if self._user else {}),
                )
            except OSError as exc:
                raise TopologyError(f"could not start {self.name}: {exc}") from exc

    def start(self, ready: Callable[[], bool], *, timeout: float, retry_port: bool) -> None:
        """Spawn the server and wait until ``ready()`` is true.

        :param ready: returns True once the server accepts connections; may raise
            (treated as not ready yet).
        :param timeout: seconds to wait for readiness.
        :param retry_port: pick a new port and retry when another process took
            the port between choosing and binding it.
        :raises TopologyError: when the server exits or is not ready in time;
            the message carries its log's tail.
        """
        for _attempt in range(5):
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.spawn()
            try:
                wait_until(
                    ready, timeout=timeout, what=f"{self.name} to accept connections", alive=self
                )
                return
            except TopologyError:
                self.signal_and_wait(signal.SIGKILL, timeout=10)
                if retry_port and _port_in_use(self.log_path, log_offset):
                    self.port = free_port()
                    continue
                raise
        raise TopologyError(
            f"{self.name}: no free port after 5 attempts:\n{log_tail(self.log_path)}"
        )

    def signal_and_wait(self, signum: int, *, timeout: float) -> None:
        """Send ``signum`` and wait for exit; SIGKILL after ``timeout`` seconds."""
        self.send_signal(signum)
        self.wait_exit(timeout=timeout)

    def freeze(self) -> None:
        """Stop every process of the server (SIGSTOP): it accepts TCP
        connections into the kernel's backlog but answers nothing, like a
        paused VM. Returns once every thread of it has stopped (a signal is
        acted on a moment after it is sent)."""
        pids = self._signal_tree(signal.SIGSTOP)
        self._frozen = True
        try:
            wait_until(
                lambda: all(_stopped(pid) for pid in pids), timeout=10, what=f"{self.name} to stop"
            )
        except TopologyError as error:
            running = [pid for pid in pids if not _stopped(pid)]
            raise TopologyError(f"{error}; still running: pids {running}") from None

    def thaw(self) -> None:
        """Undo :meth:`freeze`."""
        if self._frozen:
            self._signal_tree(signal.SIGCONT)
            self._frozen = False

    def _signal_tree(self, signum: int) -> list[int]:
        # The server and every process it forked: PostgreSQL's children each
        # start a session of their own (setsid), so no process group holds
        # them all. The server first, so that it forks no one meanwhile.
        pid = self.pid
        if pid is None:
            return []
        targets = [pid, *_descendants(pid)]
        for target in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signum)
        return targets

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the server if it still runs (thawing it first: a
        frozen server cannot act on a signal, and its frozen children would
        outlive it)."""
        self.thaw()
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    def wait_exit(self, *, timeout: float) -> None:
        """Wait for the server to exit and reap it; SIGKILL after ``timeout`` seconds."""
        process = self._process
        if process is None:
            return
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _stopped(pid: int) -> bool:
    """True when every thread of process ``pid`` is stopped, or dead: a child
    that exited as its frozen parent stopped stays a zombie until thawed."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return True
    for task in tasks:
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue  # the thread exited
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


def _descendants(pid: int) -> list[int]:
    """The pids of every process below ``pid``, read from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # The command name may hold spaces and parentheses: fields follow the last ")".
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: list[int] = []
    pending = [pid]
    while pending:
        below = children.get(pending.pop(), [])
        found.extend(below)
        pending.extend(below)
    return found


def _port_in_use(log_path: Path, offset: int) -> bool:
    try:
        with open(log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace").lower()
    except OSError:
        return False
    return "address already in use" in text or "could not bind" in text


class _Alive(Protocol):
    @property
    def is_running(self) -> bool: ...

    @property
    def name(self) -> str: ...

    @property
    def log_path(self) -> Path: ...


def wait_until(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    alive: _Alive | None = None,
) -> None:
    """Poll ``condition`` with a growing interval until it holds.

    Exceptions from ``condition`` count as "not yet". Used only where the
    server offers no way to block until the state changes.

    :param alive: a server that must stay up meanwhile; its exit fails at once.
    :raises TopologyError: on timeout or when ``alive`` exits.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    last_error: BaseException | None = None
    while True:
        if alive is not None and not alive.is_running:
            raise TopologyError(
                f"{alive.name} exited while waiting for {what}; its log ends:\n"
                f"{log_tail(alive.log_path)}"
            )
        try:
            if condition():
                return
        except Exception as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            tail = f"; {alive.name}'s log ends:\n{log_tail(alive.log_path)}" if alive else ""
            raise TopologyError(f"timed out after {timeout:.1f}s waiting for {what}{detail}{tail}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


@dataclass
class _Registry:
    """Topologies still running, stopped at interpreter exit as a last resort."""

    live: dict[int, Callable[[], None]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, key: int, stop: Callable[[], None]) -> None:
        with self.lock:
            self.live[key] = stop
        _exit_cleanly_on_sigterm()

    def discard(self, key: int) -> None:
        with self.lock:
            self.live.pop(key, None)

    def stop_all(self) -> None:
        with self.lock:
            stops = list(self.live.values())
        for stop in stops:
            stop()


REGISTRY = _Registry()
atexit.register(REGISTRY.stop_all)


def _exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (a CI timeout, ``kill``) into SystemExit, so that with-blocks,
    fixtures and the atexit hook stop the servers. Only where nobody else
    handles SIGTERM, and only from the main thread (Python's rule)."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_system_exit)


def _raise_system_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def remove_tree(path: Path) -> None:
    """Delete a topology's directory and everything in it."""
    if path.exists():
        shutil.rmtree(path)
