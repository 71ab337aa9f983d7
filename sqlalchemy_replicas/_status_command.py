"""``sqlalchemy-replicas status``: the I/O half (the output is :mod:`.status_report`'s).

Builds a router from options or the application's settings (as
``ReplicaRouter.from_env()`` does), or imports the application's own
(``--router MODULE:ATTRIBUTE``), starts it (its lag monitor checks every
replica once: identity, lag), asks each server directly what it is (with a
short timeout, in a thread of its own, so a frozen server costs the timeout
and no more), and hands a :class:`~.status_report.StatusSnapshot` to the
pure formatting code. The direct questions connect as the router's
sessions do (:func:`~.connections.probe_engine`: each engine's
``creator``, ``connect_args`` and ``do_connect`` listeners), the
primary's through ``primary_candidates`` to wherever the primary is now.

One round right after start-up needs care: the monitor measures lag against
the primary positions it has sampled, and it has sampled only since it
started, so a replica that is behind at the first check has a lag that is
only a lower bound. The first round therefore waits, at most ``max_lag``
plus two check intervals, until each replica has either applied the
primary's position read after start-up (its lag is then exact) or been
left out by the monitor (down, or over ``max_lag``). An idle or caught-up
replica settles at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, TextIO, TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

from . import settings as _settings
from .connections import probe_engine
from .exc import ConfigurationError, describe_error
from .monitor import ReplicaStatus
from .positions import PositionBackend
from .positions._sources import source_rows
from .router import ReplicaRouter, RoutedEngine
from .status_report import (
    EXIT_CONFIG_ERROR,
    PrimaryState,
    ReplicaState,
    Role,
    StatusSnapshot,
    config_error_json,
    exit_code,
    render_json,
    render_table,
    scrub,
)
from .urls import parse_replica_urls, parse_url, sync_url

__all__ = ["DEFAULT_TIMEOUT", "DEFAULT_WATCH", "run"]

_T = TypeVar("_T")

#: Seconds each server gets to answer the command's own query (connect included).
DEFAULT_TIMEOUT = 3.0
#: Seconds between rounds for ``--watch`` without a number.
DEFAULT_WATCH = 5.0
_POLL = 0.05


@dataclasses.dataclass(frozen=True)
class _Answer:
    role: Role
    read_only: bool
    position: str | None = None


class _Servers:
    """The command's own engines (one per server, no pool) and their
    queries in flight: a server whose last query never answered is not
    asked again until it does (``--watch`` leaks no thread per round).

    Each engine connects as the router's sessions do
    (:func:`~sqlalchemy_replicas.connections.probe_engine`: the routed
    engine's ``connect_args``, ``creator`` and ``do_connect`` listeners),
    and the primary's follows ``primary_candidates`` to wherever the
    primary is now."""

    def __init__(self, router: ReplicaRouter[Any], timeout: float) -> None:
        self._router = router
        self._timeout = timeout
        self._engines: dict[str, Engine] = {}
        self._in_flight: dict[str, threading.Thread] = {}

    def ask(
        self, targets: list[RoutedEngine], backend: PositionBackend | None
    ) -> dict[str, _Answer | str]:
        """Each target's answer, or the error (text) of its failure; in parallel."""
        results: dict[str, _Answer | str] = {}
        threads = []
        for target in targets:
            if self._in_flight.get(target.name, _DONE).is_alive():
                results[target.name] = "no answer (the previous query is still waiting)"
                continue
            engine = self._engine(target)
            want_position = backend if target.name == "primary" else None

            def work(
                name: str = target.name,
                engine: Engine = engine,
                want_position: PositionBackend | None = want_position,
            ) -> None:
                try:
                    results[name] = _ask(engine, want_position)
                except Exception as error:
                    results[name] = describe_error(error)

            thread = threading.Thread(target=work, daemon=True, name=f"status-{target.name}")
            thread.start()
            self._in_flight[target.name] = thread
            threads.append((target.name, thread))
        deadline = time.monotonic() + self._timeout
        for name, thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                results[name] = f"no answer within {self._timeout:g} s"
        return results

    def _engine(self, target: RoutedEngine) -> Engine:
        engine = self._engines.get(target.name)
        if engine is None:
            router = self._router
            engine = probe_engine(
                target,
                _timeouts(sync_url(target.sync_engine.url), self._timeout),
                install_discovery=(
                    router.cluster.install_discovery if target is router.primary_target else None
                ),
                poolclass=NullPool,
                isolation_level="AUTOCOMMIT",
            )
            self._engines[target.name] = engine
        return engine

    def dispose(self) -> None:
        for engine in self._engines.values():
            engine.dispose()


_DONE = threading.Thread()  # never started: is_alive() is False


def _timeouts(url: URL, timeout: float) -> dict[str, Any]:
    seconds = max(2, math.ceil(timeout))  # libpq rounds anything under 2 s up to 2 s
    driver = url.get_driver_name()
    if driver in ("psycopg", "psycopg2"):
        return {"connect_timeout": seconds}
    if driver in ("pymysql", "mysqldb"):
        return {"connect_timeout": seconds, "read_timeout": seconds, "write_timeout": seconds}
    return {}


def _ask(engine: Engine, backend: PositionBackend | None) -> _Answer:
    """What the server says it is (and, given ``backend``, its current position)."""
    with engine.connect() as conn:
        position = None
        if backend is not None:
            current = backend.current(conn)
            position = None if current is None else backend.format(current)
        if conn.dialect.name == "postgresql":
            in_recovery = bool(conn.exec_driver_sql("SELECT pg_is_in_recovery()").scalar())
            return _Answer("replica" if in_recovery else "primary", in_recovery, position)
        read_only = bool(int(conn.exec_driver_sql("SELECT @@read_only").scalar() or 0))
        is_mariadb = bool(getattr(conn.dialect, "is_mariadb", False))
        rows = source_rows(
            conn,
            "SHOW ALL SLAVES STATUS" if is_mariadb else "SHOW REPLICA STATUS",
            "SLAVE MONITOR" if is_mariadb else "REPLICATION CLIENT",
        )
        role: Role
        if isinstance(rows, str):
            role = "unknown"
        elif rows:
            role = "replica" if read_only else "replica (writable)"
        else:
            role = "read-only" if read_only else "primary"
        return _Answer(role, read_only, position)


def _in_thread(work: Callable[[], _T], timeout: float) -> _T:
    """``work()`` with a deadline: raises TimeoutError when it has not
    returned by then (the thread is left to finish on its own)."""
    box: list[Any] = []

    def run() -> None:
        try:
            box.append((True, work()))
        except BaseException as error:
            box.append((False, error))

    thread = threading.Thread(target=run, daemon=True, name="status-start")
    thread.start()
    thread.join(timeout)
    if not box:
        raise TimeoutError(f"no answer within {timeout:g} s")
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


class _Status:
    """One router and the command's rounds over it."""

    def __init__(self, router: ReplicaRouter[Any], servers: _Servers, secrets: list[str]) -> None:
        self.router = router
        self.servers = servers
        self.secrets = secrets
        self.started = False
        self._start_error: str | None = None

    def _scrub(self, text: str | None) -> str | None:
        return None if text is None else scrub(text, self.secrets)

    def round(self) -> StatusSnapshot:
        router = self.router
        primary_target = router.primary_target
        first = not self.started
        began = time.monotonic()
        start_error = None
        if not self.started:
            timeout = self.servers._timeout
            try:
                _in_thread(router.start, timeout + 4 * max(2.0, 2 * router.lag_check_interval))
                self.started = True
            except Exception as error:
                start_error = describe_error(error)
        answers = self.servers.ask([primary_target], router.positions if self.started else None)
        primary_answer = answers["primary"]
        if isinstance(primary_answer, str):
            # The server's own answer says it best (the router's error is wrapped).
            start_error = primary_answer
        primary_ok = self.started and isinstance(primary_answer, _Answer)
        if primary_ok and first:
            assert isinstance(primary_answer, _Answer)
            self._settle(primary_answer.position, began)
        statuses = (
            router.status()
            if self.started
            else [
                ReplicaStatus(
                    r.name,
                    r.sync_engine.url.render_as_string(hide_password=True),
                    None,
                    None,
                    None,
                    "not checked: the primary is unreachable",
                )
                for r in router.replica_targets
            ]
        )
        replica_answers = self.servers.ask(list(router.replica_targets), None)
        replicas = []
        for status in statuses:
            answer = replica_answers[status.name]
            status = dataclasses.replace(status, reason=self._scrub(status.reason))
            if isinstance(answer, _Answer):
                replicas.append(ReplicaState(status, True, answer.role, answer.read_only))
            else:
                replicas.append(ReplicaState(status, False, error=self._scrub(answer)))
        # Where primary connections go now (primary_candidates: after a failover,
        # not the configured URL).
        url = router.primary_url
        if primary_ok:
            assert isinstance(primary_answer, _Answer)
            primary = PrimaryState(
                url, True, primary_answer.role, primary_answer.read_only, primary_answer.position
            )
        else:
            primary = PrimaryState(url, False, error=self._scrub(start_error or "unreachable"))
        backend = router.positions
        return StatusSnapshot(
            primary,
            tuple(replicas),
            router.max_lag,
            datetime.now(timezone.utc),
            backend=None if backend is None else _BACKENDS.get(backend.kind, backend.kind),
        )

    def _settle(self, primary_position: str | None, began: float) -> None:
        """Wait until every replica's lag is exact or it is left out (see the
        module's docstring), at most ``max_lag`` plus two check intervals."""
        router = self.router
        backend = router.positions
        if backend is None or primary_position is None:
            return
        target = backend.parse(primary_position)
        deadline = began + router.max_lag + 2 * router.lag_check_interval + 1.0

        def settled(status: ReplicaStatus) -> bool:
            if status.healthy is False:
                return True
            if status.healthy is None or status.position is None:
                return False
            return bool(backend.reached(backend.parse(status.position), target))

        while time.monotonic() < deadline:
            if all(settled(s) for s in router.status()):
                return
            time.sleep(_POLL)


_BACKENDS = {"pg": "postgresql"}


def _router_arguments(args: Any, environ: Mapping[str, str]) -> _settings.RouterArguments:
    overrides: dict[str, Any] = {}
    if args.primary is not None:
        overrides["primary"] = parse_url(args.primary, "--primary")
    replica_items = [*(args.replica or ()), *(args.replicas or ())]
    if replica_items:
        overrides["replicas"] = parse_replica_urls(",".join(replica_items), "--replica")
    if args.max_lag is not None:
        overrides["max_lag"] = args.max_lag
    return _settings.from_environ(environ, prefix=args.prefix, overrides=overrides)


def _as_sync(source: Any) -> Any:
    """A URL through the sync driver of its dialect (the command is sync)."""
    if isinstance(source, (str, URL)):
        return sync_url(make_url(source))
    return source


def _passwords(router: ReplicaRouter[Any]) -> list[str]:
    """The passwords of every URL the router may connect to (to scrub)."""
    urls = [
        *(t.sync_engine.url for t in (router.primary_target, *router.replica_targets)),
        *router.primary_candidates,
    ]
    return sorted({str(url.password) for url in urls if url.password})


def _settings_router(args: Any) -> ReplicaRouter[Any]:
    """The router of the options and the application's settings, every URL
    through the sync driver of its dialect (the command is sync)."""
    arguments = _router_arguments(args, os.environ)
    options = dict(arguments.options)
    if "primary_candidates" in options:
        options["primary_candidates"] = [_as_sync(url) for url in options["primary_candidates"]]
    replicas = arguments.replicas
    replicas = (
        {name: _as_sync(url) for name, url in replicas.items()}
        if isinstance(replicas, Mapping)
        else [_as_sync(url) for url in replicas]
    )
    return ReplicaRouter(_as_sync(arguments.primary), replicas, **options)


def _imported_router(args: Any) -> ReplicaRouter[Any]:
    """The application's own router, ``--router MODULE:ATTRIBUTE``: a
    :class:`ReplicaRouter`, or a callable that returns one when called with
    no arguments. The current directory is importable, as for ``python -m``.

    :raises ConfigurationError: for a bad reference, with another server
        option, or for a router with async engines.
    """
    for option in ("primary", "replica", "replicas", "max_lag"):
        if getattr(args, option):
            raise ConfigurationError(
                f"--router and --{option.replace('_', '-')} exclude each other: "
                "the router's own configuration is used"
            )
    if args.prefix:
        raise ConfigurationError("--router and --prefix exclude each other")
    module_name, colon, attribute = str(args.router).partition(":")
    if not colon or not module_name or not attribute:
        raise ConfigurationError(
            f"--router {args.router!r}: give MODULE:ATTRIBUTE, e.g. myapp.db:router"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
        if not isinstance(found, ReplicaRouter) and callable(found):
            found = found()
    except sa_exc.ArgumentError:
        raise  # the router's own ConfigurationError says it best
    except Exception as error:
        # Whatever the application's module raises: still a configuration
        # problem to a monitoring check (exit 3), not a traceback.
        raise ConfigurationError(
            f"--router {args.router!r}: {type(error).__name__}: {error}"
        ) from None
    if not isinstance(found, ReplicaRouter):
        raise ConfigurationError(
            f"--router {args.router!r} is {type(found).__name__}, not a ReplicaRouter "
            "(or a callable returning one)"
        )
    if found.is_async:
        raise ConfigurationError(
            f"--router {args.router!r} has async engines; give the command a router with "
            "sync engines (the same URLs through the sync drivers, the same engine options "
            "and do_connect listeners)"
        )
    return found


def run(args: Any, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run ``sqlalchemy-replicas status`` with parsed ``args``; return the exit status."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    # The table says what the monitor would log; its warnings would only
    # repeat it on stderr (and name driver errors unscrubbed).
    package_logger = logging.getLogger("sqlalchemy_replicas")
    package_logger.addHandler(logging.NullHandler())
    package_logger.propagate = False

    def config_error(message: str) -> int:
        message = scrub(message)
        if args.json:
            print(config_error_json(message), file=out, flush=True)
        print(f"sqlalchemy-replicas status: error: {message}", file=err, flush=True)
        return EXIT_CONFIG_ERROR

    try:
        router = _imported_router(args) if getattr(args, "router", None) else _settings_router(args)
    except (sa_exc.ArgumentError, sa_exc.NoSuchModuleError) as error:
        return config_error(str(error))
    except ImportError as error:
        return config_error(f"a database driver is not installed: {error}")
    secrets = _passwords(router)
    servers = _Servers(router, args.timeout)
    status = _Status(router, servers, secrets)
    code: int | None = None
    try:
        while True:
            snapshot = status.round()
            code = exit_code(snapshot)
            if args.json:
                text = render_json(snapshot) + "\n"
            else:
                text = scrub(render_table(snapshot), secrets)
                if args.watch is not None and out.isatty():
                    text = "\x1b[H\x1b[2J" + text
                elif args.watch is not None:
                    text = f"{snapshot.checked_at.isoformat(timespec='seconds')}\n{text}\n"
            out.write(text)
            out.flush()
            if args.watch is None:
                return code
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 130 if code is None else code
    finally:
        servers.dispose()
        router.dispose()


def check_seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds > 0")
    return value
