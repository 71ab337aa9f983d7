"""RoutingSession: a Session that picks a bind per statement."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.mapper import Mapper
from sqlalchemy.sql.expression import ClauseElement

from .classify import classify
from .exc import ConfigurationError
from .router import ReplicaRouter, RoutedEngine

__all__ = ["RoutingSession"]

logger = logging.getLogger("sqlalchemy_replicas.routing")


class RoutingSession(Session):
    """A :class:`~sqlalchemy.orm.Session` that sends reads to replicas.

    Writes, flushes, locking reads and anything not provably read-only go to
    the router's primary; once a transaction has sent something there, the
    rest of that transaction follows, so it reads its own uncommitted writes.

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
        # True from the first statement routed to the primary because it writes
        # or locks until the root transaction ends.
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
        """Return the engine ``clause`` runs on: a replica for a provable read,
        else the primary.

        An explicit ``bind`` argument, or a session-wide ``bind``, wins.
        """
        if bind is not None:
            return bind
        if self.bind is not None:
            return super().get_bind(mapper, clause=clause, **kw)
        target, reason = self._choose_target(clause)
        if logger.isEnabledFor(logging.DEBUG):
            what = "flush" if self._flushing else _describe(clause)
            logger.debug("%s -> %s: %s", what, target.name, reason)
        return target.read_engine

    def _choose_target(self, clause: ClauseElement | None) -> tuple[RoutedEngine, str]:
        primary = self.router.primary_target
        if self._pinned_to_primary:
            return primary, "this transaction already wrote or locked"
        classification = classify(clause, flushing=self._flushing)
        if not classification.is_read:
            self._pinned_to_primary = True
            return primary, classification.reason
        replica = self.router.next_replica()
        if replica is None:
            return primary, f"{classification.reason}, but no replicas are configured"
        return replica, classification.reason


@event.listens_for(RoutingSession, "after_transaction_end")
def _unpin_after_root_transaction(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None and isinstance(session, RoutingSession):
        session._pinned_to_primary = False


def _describe(clause: ClauseElement | None) -> str:
    if clause is None:
        return "no statement"
    name = str(getattr(clause, "__visit_name__", type(clause).__name__))
    return "TEXT" if name == "textclause" else name.upper()
