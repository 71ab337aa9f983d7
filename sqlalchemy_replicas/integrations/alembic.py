"""Alembic: run migrations on the primary, then wait for the replicas.

In ``env.py``::

    from alembic import context
    from sqlalchemy_replicas.integrations.alembic import run_migrations

    router = ReplicaRouter(primary_url, replica_urls)     # or from settings
    report = run_migrations(context, router, target_metadata=Base.metadata,
                            wait_for_replicas=30.0)

Migrations run on the primary only, in one transaction as Alembic's own
template does. Then every replica the lag monitor finds healthy is waited
on (one deadline for all) until it has applied the migration, so that a
deploy that starts new code afterwards finds the schema on the replicas it
reads from; the report says who did not, and why.

Alembic's template calls ``logging.config.fileConfig``, which disables every
logger that exists by then unless the ini file names it: in an application
that runs migrations in-process (Flask-Migrate, a test suite) the library's
loggers would stay silent afterwards. :func:`run_migrations` turns them back
on (:func:`keep_logging`); for ``env.py`` files that do not call it, pass
``disable_existing_loggers=False`` to ``fileConfig``.

I/O: connects to the primary and the replicas.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy.engine import Connection, Engine

from ..causal import CAPTURED_KEY

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from ..positions import PositionBackend
    from ..router import ReplicaRouter

__all__ = [
    "MigrationContext",
    "ReplicaReport",
    "keep_logging",
    "run_migrations",
    "run_migrations_async",
]

logger = logging.getLogger("sqlalchemy_replicas.alembic")


class MigrationContext(Protocol):
    """What is used of ``alembic.context`` (an ``EnvironmentContext`` proxy)."""

    def is_offline_mode(self) -> bool: ...

    def configure(self, **kwargs: Any) -> None: ...

    def begin_transaction(self) -> Any: ...

    def run_migrations(self, **kwargs: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """Which replicas applied a migration within the wait, and which did not.

    :ivar position: the primary's position after the migration (text), or
        None when the database has no replication positions.
    :ivar applied: names of the replicas that applied it.
    :ivar behind: ``(name, reason)`` of each replica that did not (not
        healthy, timed out, or failed), in configuration order.
    :ivar waited: seconds spent waiting.
    """

    position: str | None
    applied: tuple[str, ...]
    behind: tuple[tuple[str, str], ...]
    waited: float

    @property
    def ok(self) -> bool:
        """True when every replica applied the migration."""
        return not self.behind


def keep_logging() -> None:
    """Turn the library's loggers back on after ``logging.config.fileConfig``
    disabled them (it disables every existing logger its file does not name)."""
    for name, existing in logging.Logger.manager.loggerDict.items():
        if name.partition(".")[0] == "sqlalchemy_replicas" and isinstance(existing, logging.Logger):
            existing.disabled = False


def run_migrations(
    context: MigrationContext,
    router: ReplicaRouter[Engine],
    *,
    wait_for_replicas: float | None = 30.0,
    **configure_options: Any,
) -> ReplicaReport | None:
    """Run Alembic's migrations on ``router``'s primary, then wait for its replicas.

    :param context: ``alembic.context``.
    :param router: a sync router (for async ones, :func:`run_migrations_async`).
    :param wait_for_replicas: seconds to wait, in all, for the healthy replicas
        to apply the migration; None or 0: do not wait.
    :param configure_options: passed to ``context.configure`` (``target_metadata``,
        ``compare_type``, ...).
    :returns: the report, or None in offline mode (``alembic upgrade --sql``)
        or without waiting.
    """
    keep_logging()
    if context.is_offline_mode():
        _run_offline(context, router, configure_options)
        return None
    engine = router.primary
    with engine.connect() as connection:
        _run_online(connection, context, configure_options)
    if not wait_for_replicas or not router.replica_targets:
        return None
    started = time.monotonic()
    router.start()  # every replica checked once: identity and health known
    return _wait(router, started, wait_for_replicas)


async def run_migrations_async(
    context: MigrationContext,
    router: ReplicaRouter[AsyncEngine],
    *,
    wait_for_replicas: float | None = 30.0,
    **configure_options: Any,
) -> ReplicaReport | None:
    """:func:`run_migrations` for a router with async engines (an async ``env.py``)."""
    from sqlalchemy.util import greenlet_spawn

    keep_logging()
    if context.is_offline_mode():
        _run_offline(context, router, configure_options)
        return None
    async with router.primary.connect() as connection:
        await connection.run_sync(_run_online, context, configure_options)
    if not wait_for_replicas or not router.replica_targets:
        return None
    started = time.monotonic()
    await router.astart()
    return await greenlet_spawn(_wait, router, started, wait_for_replicas)


def _run_offline(
    context: MigrationContext, router: ReplicaRouter[Any], options: dict[str, Any]
) -> None:
    url = router.primary_target.sync_engine.url
    context.configure(url=url, literal_binds=True, **options)
    with context.begin_transaction():
        context.run_migrations()


def _run_online(connection: Connection, context: MigrationContext, options: dict[str, Any]) -> None:
    # The position is read afterwards on a connection of its own: this one's
    # check-in need not capture it for the router's causal scope too.
    connection.info[CAPTURED_KEY] = True
    context.configure(connection=connection, **options)
    with context.begin_transaction():
        context.run_migrations()


def _wait(router: ReplicaRouter[Any], started: float, timeout: float) -> ReplicaReport | None:
    """Wait until the replicas the monitor finds healthy (it has checked each
    once) have applied what the primary has committed now, until ``timeout``
    seconds after ``started``."""
    deadline = started + timeout
    backend = router.positions
    if backend is None:
        return None
    position = router.cluster.current_position()
    if position is None:  # nothing ever committed: nothing to apply
        return ReplicaReport(None, router.replica_names, (), time.monotonic() - started)
    healthy = {status.name: status for status in router.status()}
    applied: list[str] = []
    behind: list[tuple[str, str]] = []
    for replica in router.replica_targets:
        status = healthy[replica.name]
        if not status.healthy:
            behind.append((replica.name, f"not healthy: {status.reason}"))
            continue
        remaining = max(0.0, deadline - time.monotonic())
        reason = _wait_one(replica.sync_engine, backend, position, remaining)
        if reason is None:
            applied.append(replica.name)
        else:
            behind.append((replica.name, reason))
    report = ReplicaReport(
        None if position is None else backend.format(position),
        tuple(applied),
        tuple(behind),
        time.monotonic() - started,
    )
    _log(report, timeout)
    return report


def _wait_one(
    engine: Engine, backend: PositionBackend, position: Any, timeout: float
) -> str | None:
    """None when ``engine``'s server applied ``position`` within ``timeout``
    seconds, else why not."""
    try:
        with engine.connect() as connection:
            if backend.wait(connection, position, timeout):
                return None
    except Exception as error:  # one replica's failure is reported, not raised
        first = str(getattr(error, "orig", None) or error).strip().splitlines()
        return f"failed: {type(error).__name__}: {first[0] if first else ''}"
    return "did not apply the migration within the wait"


def _log(report: ReplicaReport, timeout: float) -> None:
    if report.applied:
        logger.info(
            "replicas %s applied the migration (position %s) in %.2f s",
            ", ".join(report.applied),
            report.position,
            report.waited,
        )
    for name, reason in report.behind:
        logger.warning(
            "replica %s has not applied the migration (position %s) after %.1f s of %g: %s",
            name,
            report.position,
            report.waited,
            timeout,
            reason,
        )
