"""Celery: every task sees what the code that sent it had committed.

::

    from sqlalchemy_replicas.integrations import celery as sr_celery

    sr_celery.install(router)      # in the web process and in the worker

When a task is published (``before_task_publish``), the current causal token
(:func:`sqlalchemy_replicas.jobs.current_token` for the routers given) goes
into the message header :data:`HEADER`. When a worker runs the task
(``task_prerun``), a ``causal_context`` is opened from that header, and closed
again by ``task_postrun``, which Celery sends from a ``finally`` block, after
successes, failures and retries alike. The routers in the worker need the
same ``name`` and ``secret`` as in the web process.

Tasks run eagerly (``task.apply()``, ``task_always_eager``) are not
published: they run in the caller's own causal context, as a function call.

I/O: none of its own; publishing may read each router's primary position
once (see :func:`~sqlalchemy_replicas.jobs.current_token`).
"""

from __future__ import annotations

import itertools
import logging
from contextlib import AbstractContextManager
from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .._dependencies import require_module
from ..causal import CausalContext, causal_context
from ..exc import ConfigurationError
from ..jobs import TOKEN_KEY, current_token, require_secret

require_module("celery", "sqlalchemy_replicas.integrations.celery")

from celery import signals  # noqa: E402  (after the check that names the extra)

if TYPE_CHECKING:
    from ..router import ReplicaRouter

__all__ = ["HEADER", "CeleryIntegration", "install", "installed", "uninstall"]

logger = logging.getLogger("sqlalchemy_replicas.integrations.celery")

#: The task message header that carries the causal token.
HEADER = TOKEN_KEY

# The causal context a worker opened for the task running here (task id, the
# open context). A ContextVar, so each pool thread, greenlet or prefork child
# has its own; prerun closes a leftover one (a postrun that never came) so no
# task ever runs in another task's scope.
_running: ContextVar[tuple[str, AbstractContextManager[CausalContext]] | None] = ContextVar(
    "sqlalchemy_replicas.celery.running", default=None
)

_uids = itertools.count()


class CeleryIntegration:
    """Carry causal tokens with Celery tasks, through Celery's signals.

    Signals are process-wide in Celery: once installed, every task published
    from this process carries the header and every task a worker in this
    process runs opens its context. :meth:`install` is idempotent and
    :meth:`uninstall` removes every handler (tests use it as a context
    manager).

    :param routers: routers whose process-wide commits a task must see (see
        :func:`~sqlalchemy_replicas.jobs.current_token`); typically the app's one
        router. Each must have a ``secret``.
    :param header: the message header's name (default :data:`HEADER`); the same
        in the web process and the worker.
    :raises ConfigurationError: when a router has no ``secret``, or ``header``
        is empty.
    """

    def __init__(self, *routers: ReplicaRouter[Any], header: str = HEADER) -> None:
        for router in routers:
            require_secret(router)
        if not isinstance(header, str) or not header:
            raise ConfigurationError(f"header must be a non-empty str, not {header!r}")
        self.routers = routers
        self.header = header
        self._uid = f"sqlalchemy_replicas.celery.{next(_uids)}"
        self._installed = False

    @property
    def installed(self) -> bool:
        """Whether the signal handlers are connected."""
        return self._installed

    def install(self) -> CeleryIntegration:
        """Connect the signal handlers (again: no effect). Returns ``self``."""
        if not self._installed:
            # Strong references: a handler must live as long as it is installed,
            # even when nobody keeps the integration object.
            signals.before_task_publish.connect(
                self._before_publish, weak=False, dispatch_uid=self._uid
            )
            signals.task_prerun.connect(self._prerun, weak=False, dispatch_uid=self._uid)
            signals.task_postrun.connect(self._postrun, weak=False, dispatch_uid=self._uid)
            self._installed = True
        return self

    def uninstall(self) -> None:
        """Disconnect the signal handlers (not installed: no effect)."""
        if self._installed:
            signals.before_task_publish.disconnect(dispatch_uid=self._uid)
            signals.task_prerun.disconnect(dispatch_uid=self._uid)
            signals.task_postrun.disconnect(dispatch_uid=self._uid)
            self._installed = False

    def __enter__(self) -> CeleryIntegration:
        return self.install()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()

    # -- signal handlers: Celery logs what they raise and goes on ---------------

    def _before_publish(self, headers: dict[str, Any] | None = None, **_: Any) -> None:
        """Put the current token into the message headers (protocol 2)."""
        if headers is None:  # task protocol 1: no headers to carry it in
            return
        try:
            token = current_token(*self.routers)
        except ConfigurationError as error:
            # Celery swallows a handler's exception: say it loudly, once per
            # task, and send the task without a token rather than a broken one.
            logger.error("task %s sent without a causal token: %s", headers.get("task"), error)
            return
        if token is not None:
            headers[self.header] = token

    def _prerun(self, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        """Open the task's causal context from its header (a fresh one without)."""
        request = getattr(task, "request", None)
        if request is None or task_id is None or getattr(request, "is_eager", False):
            return
        _close_running()
        token = getattr(request, self.header, None)
        if token is None:  # custom headers are also request attributes; be lenient
            token = (getattr(request, "headers", None) or {}).get(self.header)
        opened = causal_context(token)
        opened.__enter__()
        _running.set((task_id, opened))

    def _postrun(self, task_id: str | None = None, **_: Any) -> None:
        """Close the context the task's prerun opened (after success or failure)."""
        running = _running.get()
        if running is not None and running[0] == task_id:
            _close_running()

    def __repr__(self) -> str:
        names = ", ".join(repr(r.name) for r in self.routers)
        state = "installed" if self._installed else "not installed"
        return f"CeleryIntegration({names}; header={self.header!r}; {state})"


def _close_running() -> None:
    """Close the causal context a task's prerun opened here, if still open."""
    running = _running.get()
    if running is None:
        return
    _running.set(None)
    try:
        running[1].__exit__(None, None, None)
    except ValueError:
        # Opened in another context (a pool that moved the task between
        # threads): the scope variable there is not ours to reset.
        logger.warning("could not close the causal context of task %s here", running[0])


_default: CeleryIntegration | None = None


def install(*routers: ReplicaRouter[Any], header: str = HEADER) -> CeleryIntegration:
    """Install the process's Celery integration for ``routers``.

    Call it in the web process and in the worker (a ``worker_process_init``
    handler or the module that defines the Celery app). Installing again
    replaces the earlier one, so handlers never pile up.

    :raises ConfigurationError: when a router has no ``secret``.
    """
    global _default
    integration = CeleryIntegration(*routers, header=header)
    uninstall()
    _default = integration.install()
    return integration


def uninstall() -> None:
    """Remove what :func:`install` installed (nothing installed: no effect)."""
    global _default
    if _default is not None:
        _default.uninstall()
        _default = None


def installed() -> CeleryIntegration | None:
    """The integration :func:`install` installed, or None."""
    return _default
