"""RoutingSession: a Session that picks a bind per statement."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.mapper import Mapper
from sqlalchemy.sql.expression import ClauseElement
from sqlalchemy.util import EMPTY_DICT

from .connections import is_read_only_violation
from .consistency import ConsistencyLevel, validate_level
from .exc import ConfigurationError
from .policy import Decision, decide
from .router import ReplicaRouter, RoutedEngine

__all__ = ["RoutingSession"]

logger = logging.getLogger("sqlalchemy_replicas.routing")

# The key under which execute() hands its choice of target to get_bind
# (SQLAlchemy passes bind_arguments to get_bind as keywords).
_TARGET_KEY: Final = "sqlalchemy_replicas_target"
_T = TypeVar("_T")


class RoutingSession(Session):
    """A :class:`~sqlalchemy.orm.Session` that sends provable reads to replicas.

    Writes, flushes, locking reads and anything not provably read-only go to
    the router's primary; once a transaction has sent a write or a lock
    there, the rest of that transaction follows, so it reads its own
    uncommitted writes. Everything inside ``begin_nested()`` runs on the
    primary too.

    Per statement, two execution options override the classifier:
    ``consistency="strong"`` sends a statement to the primary, and
    ``read_only=True`` / ``read_only=False`` declares it a read (a replica
    may serve it) or a write.

    Replica connections are read-only at the server. If a statement that
    went to a replica turns out to write, the server refuses it without
    changing anything; the session logs a warning naming the statement and
    runs it on the primary (safe, because nothing of this transaction ran
    on the primary yet, and the replica did nothing).

    It cooperates with ``super()`` throughout, so it also works as a mixin
    over another Session subclass::

        class AppSession(RoutingSession, sqlmodel.Session): ...

    :param router: the :class:`ReplicaRouter` to route through.
    :param kwargs: everything else a ``Session`` accepts. A session given an
        explicit ``bind`` (e.g. Alembic's connection) uses it unchanged.

    Routing decisions are logged at DEBUG level on the
    ``sqlalchemy_replicas.routing`` logger.
    """

    def __init__(self, *args: Any, router: ReplicaRouter, **kwargs: Any) -> None:
        if not isinstance(router, ReplicaRouter):
            raise ConfigurationError(f"router must be a ReplicaRouter, not {type(router).__name__}")
        self.router = router
        # True from the first statement that wrote or locked on the primary
        # until the outermost transaction ends.
        self._pinned_to_primary = False
        super().__init__(*args, **kwargs)

    def get_bind(
        self,
        mapper: Mapper[Any] | type | None = None,
        *,
        clause: ClauseElement | None = None,
        bind: Engine | Connection | None = None,
        **kw: Any,
    ) -> Engine | Connection:
        """Return the engine a statement runs on: a replica for a provable read,
        else the primary.

        An explicit ``bind`` argument, or a session-wide ``bind``, wins.
        """
        if bind is not None:
            return bind
        target: RoutedEngine | None = kw.pop(_TARGET_KEY, None)
        if self.bind is not None:
            return super().get_bind(mapper, clause=clause, **kw)
        if target is None:
            # Not from execute(): a flush, session.connection(), or a lookup.
            return self._apply(self._decide(clause, None, None), clause).sync_engine
        if self._pinned_to_primary:
            # An autoflush wrote after execute() chose a replica.
            return self.router.primary_target.sync_engine
        return target.sync_engine

    # -- routing ------------------------------------------------------------

    def _decide(
        self, clause: Any, level: ConsistencyLevel | None, read_only: bool | None
    ) -> Decision:
        router = self.router
        return decide(
            router.classifier.classify(clause, flushing=self._flushing),
            level=level or router.default_consistency,
            read_only=read_only,
            pinned=self._pinned_to_primary,
            in_savepoint=self.in_nested_transaction(),
            has_replicas=bool(router.replica_targets),
        )

    def _apply(self, decision: Decision, clause: Any) -> RoutedEngine:
        """Pin if the decision says so; return the target and log the choice."""
        if decision.pins:
            self._pinned_to_primary = True
        target = self.router.primary_target if decision.to_primary else self.router.next_replica()
        assert target is not None  # policy sends reads to the primary without replicas
        if logger.isEnabledFor(logging.DEBUG):
            what = "flush" if self._flushing else _describe(clause)
            logger.debug("%s -> %s: %s", what, target.name, decision.reason)
        return target

    if not TYPE_CHECKING:
        # Defined for the runtime only, so that type checkers keep seeing
        # Session's precise overloads for these three.

        def execute(
            self, statement, params=None, *, execution_options=EMPTY_DICT,
            bind_arguments=None, **kw,
        ):  # fmt: skip
            return self._execute_routed(
                super().execute, statement, params, execution_options, bind_arguments, kw
            )

        def scalars(
            self, statement, params=None, *, execution_options=EMPTY_DICT,
            bind_arguments=None, **kw,
        ):  # fmt: skip
            return self._execute_routed(
                super().scalars, statement, params, execution_options, bind_arguments, kw
            )

        def scalar(
            self, statement, params=None, *, execution_options=EMPTY_DICT,
            bind_arguments=None, **kw,
        ):  # fmt: skip
            return self._execute_routed(
                super().scalar, statement, params, execution_options, bind_arguments, kw
            )

    def _execute_routed(
        self,
        method: Callable[..., _T],
        statement: Any,
        params: Any,
        execution_options: Mapping[str, Any],
        bind_arguments: dict[str, Any] | None,
        kw: dict[str, Any],
    ) -> _T:
        """Decide where ``statement`` runs, run it there through ``method``
        (Session's own execute, scalars or scalar), and run a statement that
        a read-only replica refused on the primary instead."""
        if self.bind is not None or (bind_arguments and _TARGET_KEY in bind_arguments):
            # Explicitly bound, or an ORM-internal statement (the pre-select of
            # synchronize_session="fetch") that follows its parent's route.
            return method(
                statement, params, execution_options=execution_options,
                bind_arguments=bind_arguments, **kw,
            )  # fmt: skip
        level, read_only = _routing_options(statement, execution_options)
        decision = self._decide(statement, level, read_only)
        target = self._apply(decision, statement)
        routed = (
            {**bind_arguments, _TARGET_KEY: target} if bind_arguments else {_TARGET_KEY: target}
        )
        if decision.to_primary:
            return method(
                statement, params, execution_options=execution_options,
                bind_arguments=routed, **kw,
            )  # fmt: skip
        try:
            return method(
                statement, params, execution_options=execution_options,
                bind_arguments=routed, **kw,
            )  # fmt: skip
        except sa_exc.DBAPIError as error:
            if not is_read_only_violation(error):
                raise
            logger.warning(
                "replica %s refused a statement as a write; running it on the primary "
                "instead. Mark it with .execution_options(read_only=False) or list its "
                "function in ReplicaRouter(writing_functions=...). Statement: %s",
                target.name,
                " ".join(str(error.statement).split())[:500],
            )
            # Safe: the replica changed nothing, and nothing of this transaction
            # has run on the primary yet (else it would be pinned there).
            self._pinned_to_primary = True
            routed[_TARGET_KEY] = self.router.primary_target
            return method(
                statement, params, execution_options=execution_options,
                bind_arguments=routed, **kw,
            )  # fmt: skip


def _routing_options(
    statement: Any, execution_options: Mapping[str, Any]
) -> tuple[ConsistencyLevel | None, bool | None]:
    """The ``consistency`` and ``read_only`` options in force for one execution:
    those passed to execute() win over the statement's own."""
    statement_options = getattr(statement, "_execution_options", EMPTY_DICT)
    level = execution_options.get("consistency", statement_options.get("consistency"))
    read_only = execution_options.get("read_only", statement_options.get("read_only"))
    if level is not None:
        level = validate_level(level, argument="execution option consistency")
    if read_only is not None and not isinstance(read_only, bool):
        raise ConfigurationError(
            f"execution option read_only={read_only!r} must be True, False or None"
        )
    return level, read_only


@event.listens_for(RoutingSession, "after_transaction_end")
def _unpin_after_root_transaction(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None and isinstance(session, RoutingSession):
        session._pinned_to_primary = False


def _describe(clause: Any) -> str:
    if clause is None:
        return "no statement"
    name = str(getattr(clause, "__visit_name__", type(clause).__name__))
    return "TEXT" if name == "textclause" else name.upper()
