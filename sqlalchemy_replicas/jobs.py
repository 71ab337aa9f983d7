"""Background jobs: carry what the enqueuing code committed into the job.

A job runs later, in another process (a Celery or RQ worker), a thread pool
or an asyncio task. Its router does not know what the web process committed
just before it enqueued the job, so its reads could go to a replica that
has not applied those commits yet. The fix is the causal token: take it
when the job is enqueued (:func:`current_token`), hand it over with the job
(an argument, a message header), and open the job's causal context from it
when it runs (:func:`job_context`)::

    token = current_token(router)                      # at enqueue time
    pool.submit(job_context(token)(send_receipt), order_id)

    def send_receipt(order_id): ...                    # reads see the order

Framework-free; :mod:`sqlalchemy_replicas.integrations.celery` does the same
through Celery's signals. No I/O of its own: :func:`current_token` may read
the primary's position once per router (as a router's first read does).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from . import token as tokens
from .causal import CausalContext, CausalScope, causal_context, current_scope
from .exc import ConfigurationError

if TYPE_CHECKING:
    from .router import ReplicaRouter

__all__ = ["TOKEN_KEY", "current_token", "job_context", "require_secret"]

logger = logging.getLogger("sqlalchemy_replicas.jobs")

_P = ParamSpec("_P")
_R = TypeVar("_R")

#: The name under which integrations carry the token with a job: a Celery
#: message header, a suggested RQ ``job.meta`` key or keyword argument.
TOKEN_KEY = "sqlalchemy_replicas_token"


def require_secret(router: ReplicaRouter[Any]) -> None:
    """Raise at once, naming the fix, when ``router`` cannot sign tokens.

    Jobs need signed tokens; failing where the job is enqueued (or the
    integration installed) beats a job that silently reads stale rows.

    :raises ConfigurationError: when ``router`` has no ``secret``.
    """
    if router.secret is None:
        raise ConfigurationError(
            f"router {router.name!r} has no secret, so the commits a job must see cannot be "
            "handed to it in a signed token; pass ReplicaRouter(..., secret=...) with the "
            "same secret and name in the processes that enqueue and that run jobs"
        )


def current_token(*routers: ReplicaRouter[Any]) -> str | None:
    """The causal token a job enqueued here must carry, or None (nothing to carry).

    It carries:

    - the enclosing ``causal_context()``'s commits and the token it was
      opened with (a web request's, from its cookie or header), for every
      router;
    - for each router given, every commit acknowledged through it in this
      process so far (its :attr:`~sqlalchemy_replicas.ReplicaRouter.process_scope`,
      whatever its ``causal_scope``), and what the primary had when the
      router started serving.

    So a job enqueued right after a commit sees that commit, with or without
    a causal context, as long as the router that committed is given (or the
    commit was made in the enclosing context). The token is what the
    enqueuing code's own reads would wait for under the router's default
    ``causal_scope="router"``, never less.

    :param routers: routers whose process-wide commits the job must see.
    :raises ConfigurationError: when a given router, or one with commits in
        the enclosing context, has no ``secret``: at enqueue time, not in
        the worker.
    """
    for router in routers:
        require_secret(router)
    context = current_scope()
    # A copy: the request's own scope (and the token it returns) stays as it was.
    scope = CausalScope() if context is None else context.copy()
    for router in routers:
        cluster = router.cluster
        process = cluster.process_scope
        # Resolve the process scope's start position once, there (as a first
        # read would), instead of asking the primary again at every enqueue.
        process.target(cluster)
        scope.include(process)
    entries = scope.entries()
    return tokens.encode(entries) if entries else None


class job_context(AbstractContextManager[CausalContext]):  # used like a function
    """Open a job's causal context from the token taken at enqueue time.

    As a context manager::

        with job_context(token):
            ...                                 # reads see the token's commits

    As a decorator of a sync or async function (each call opens its own
    context, in the thread or asyncio task that runs it)::

        pool.submit(job_context(token)(send_receipt), order_id)
        asyncio.create_task(job_context(token)(notify)(user_id))

    A missing token (None or ``""``) opens an empty context. A malformed,
    expired, forged or foreign token is ignored, counted and logged at
    WARNING by ``causal_context()``: the job then runs with only its own
    router's scope, it never fails for it.

    :param token: what :func:`current_token` returned when the job was enqueued.
    """

    def __init__(self, token: str | None) -> None:
        self.token = token
        # One entered context per thread or task would need a stack; keep it
        # simple: a job_context object is entered by one block at a time, and
        # the decorator makes a fresh one per call.
        self._open: AbstractContextManager[CausalContext] | None = None

    def __enter__(self) -> CausalContext:
        if self._open is not None:
            raise RuntimeError("this job_context is already entered; make one per job")
        opened = causal_context(self.token)
        context = opened.__enter__()
        self._open = opened
        logger.debug("job causal context opened (token: %s)", "yes" if self.token else "none")
        return context

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        opened, self._open = self._open, None
        if opened is not None:
            opened.__exit__(exc_type, exc, tb)

    def __call__(self, function: Callable[_P, _R]) -> Callable[_P, _R]:
        """Decorate a sync or async function: each call runs in the token's context."""
        token = self.token
        if inspect.iscoroutinefunction(function):
            async_function = cast(Callable[_P, Awaitable[Any]], function)

            @functools.wraps(function)
            async def run_async(*args: _P.args, **kwargs: _P.kwargs) -> Any:
                # Entered inside the coroutine: the context is the awaiting
                # task's, not the caller's that built the coroutine.
                with job_context(token):
                    return await async_function(*args, **kwargs)

            return cast(Callable[_P, _R], run_async)

        @functools.wraps(function)
        def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            with job_context(token):
                return function(*args, **kwargs)

        return run

    def __repr__(self) -> str:
        return f"job_context({'<token>' if self.token else None})"
