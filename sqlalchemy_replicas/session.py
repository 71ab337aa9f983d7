"""RoutingSession: a Session that picks a bind per statement."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, ClassVar, Final, Literal, TypeAlias, TypeGuard, TypeVar

from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.mapper import Mapper
from sqlalchemy.sql.expression import ClauseElement
from sqlalchemy.util import EMPTY_DICT

from .breaker import is_disconnect
from .causal import CAPTURED_KEY, CausalScope, current_scope
from .cluster import Cluster
from .connections import is_read_only_violation, is_recovery_conflict, is_schema_behind
from .consistency import (
    CausalScopeKind,
    ConsistencyLevel,
    current_consistency,
    default_consistency,
    validate_causal_scope,
    validate_level,
)
from .exc import ConfigurationError
from .explain import ExplainEntry, ExplainLog, ExplainRerun, ExplainWait, active_logs, short_sql
from .pipelining import (
    DeferredOutcome,
    WaitNotReached,
    can_defer_wait,
    defer_wait,
    forget_deferred_wait,
)
from .plan import (
    NO_FREE_CONNECTION,
    NOTHING_TO_WAIT_FOR,
    POSITION_UNKNOWN,
    Plan,
    Step,
    carry_out,
    plan_read,
)
from .policy import Decision, decide
from .pools import PoolFull, nowait_checkout, pool_is_full
from .rules import info_rules_declared
from .stats import Reason, ReasonCode, RerunCause, WaitOutcome
from .sticky import current_sticky_key
from .targets import RoutedEngine

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    # The public type of ``session.router`` only: the router builds sessions
    # (it imports this module), sessions use its shared state (``Cluster``).
    from .router import ReplicaRouter

__all__ = ["RouterProvider", "RoutingSession"]

RouterProvider: TypeAlias = "Callable[[], ReplicaRouter[Any]]"
"""A zero-argument callable that returns the router a new session routes
through; ``RoutingSession(router=...)`` accepts one in place of a router."""

logger = logging.getLogger("sqlalchemy_replicas.routing")

# The key under which execute() hands its choice of target to get_bind
# (SQLAlchemy passes bind_arguments to get_bind as keywords).
_TARGET_KEY: Final = "sqlalchemy_replicas_target"
#: In place of nowait_checkout where the transaction holds a connection already.
_NO_CHECKOUT: Final = nullcontext()
#: What the log says of a read whose wait travels with it, until the wait ends.
_WAIT_WITH_READ: Final = "if it applies this scope's commits in time (the wait goes with the read)"
_MONOTONIC_FULL: Final = Reason(
    "pool_full", "monotonic: the replica this scope reads from has no free connection"
)
_MONOTONIC_UNKNOWN: Final = Reason(
    "position_unknown", "monotonic: the replica left cannot tell its position"
)
_RECOVERY_CONFLICT: Final = Reason(
    "recovery_conflict", "the replica cancelled the read (conflict with recovery)"
)
_SCHEMA_BEHIND: Final = Reason(
    "schema_behind", "the replica lacks an object the read names (a migration not applied yet?)"
)
_REFUSED_WRITE: Final = Reason("refused_write", "the read-only replica refused it as a write")
_T = TypeVar("_T")

# What an engine chosen by a wrapped session class's get_bind is to the router.
_ROUTED: Final = "routed"  # the router's database: the router routes
_FOREIGN: Final = "foreign"  # another database: statements run there, unrouted
_AMBIGUOUS: Final = "ambiguous"  # the wrapped default, not recognisably the router's
_DEFAULT_PORTS: Final = {"postgresql": 5432, "mysql": 3306}
# URL query keys that say where the server is (the rest are driver options,
# such as the charset Flask-SQLAlchemy adds to MySQL URLs).
_ADDRESS_QUERY_KEYS: Final = frozenset({"host", "hostaddr", "port", "unix_socket"})


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

    When such a class (after ``RoutingSession`` in the MRO) has its own
    ``get_bind``, e.g. Flask-SQLAlchemy's ``__bind_key__`` binds, it is asked
    first: a statement or flush it sends to another database runs there,
    unrouted; one it sends to the router's database (the router's engines,
    or an engine with the same server and database in its URL) is routed.
    While it is asked, the session's ``bind`` is the router's primary, so a
    ``get_bind`` that falls back to ``Session.get_bind`` chooses the router.
    If its default engine (the choice for no mapper and no clause) is not
    recognisably the router's primary, statements it sends there raise
    :class:`~sqlalchemy_replicas.exc.ConfigurationError` rather than
    guessing where to write.

    :param router: the :class:`ReplicaRouter` to route through, or a
        zero-argument callable returning it (a :data:`RouterProvider`),
        called once when the session is created: a session maker made before
        the router exists (at import time, as Flask-SQLAlchemy makes its
        own) then binds each session to the router of the moment, e.g.
        ``sqlalchemy_replicas.integrations.flask.current_router`` for the
        current Flask app's.
    :param consistency: this session's default consistency level (default:
        the router's); ``consistency()`` blocks and statement options win.
    :param causal_scope: whose commits this session's ``read_your_writes``
        and ``monotonic`` reads must see (default: the router's
        ``causal_scope``): ``"router"``, every commit made through the
        router; ``"session"``, this session's own, plus the enclosing
        ``causal_context()`` and its token.
    :param kwargs: everything else a ``Session`` accepts. A session given an
        explicit ``bind`` (e.g. Alembic's connection) uses it unchanged.

    Routing decisions are logged at DEBUG level on the
    ``sqlalchemy_replicas.routing`` logger.
    """

    #: The first class after RoutingSession in the MRO that defines get_bind
    #: other than Session, whose choice of engine RoutingSession respects.
    _wrapped_get_bind: ClassVar[type[Session] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Once per class (sessionmaker makes one too), not per statement.
        mro = cls.__mro__
        for klass in mro[mro.index(RoutingSession) + 1 :]:
            if "get_bind" in vars(klass):
                cls._wrapped_get_bind = None if klass is Session else klass
                break

    def __init__(
        self,
        *args: Any,
        router: ReplicaRouter[Engine | AsyncEngine] | RouterProvider,
        consistency: ConsistencyLevel | None = None,
        causal_scope: CausalScopeKind | None = None,
        **kwargs: Any,
    ) -> None:
        if not _is_router(router) and callable(router):
            # Resolved now, once per session: a session maker made before the
            # application is configured (Flask-SQLAlchemy's, at import time)
            # gets each application's router when a session is created.
            provided = router()
            if not _is_router(provided):
                raise ConfigurationError(
                    f"the router provider {router!r} returned {type(provided).__name__}, "
                    "not a ReplicaRouter"
                )
            router = provided
        if not _is_router(router):
            raise ConfigurationError(
                "router must be a ReplicaRouter or a callable that returns one, not "
                f"{type(router).__name__}"
            )
        if kwargs.get("binds"):
            # Routing would send those mappers' statements to the router's
            # servers instead: data written to the wrong database.
            raise ConfigurationError(
                "RoutingSession does not support binds=: it routes every statement "
                "between the router's primary and replicas. For tables that live in "
                "another database, combine it with a Session class whose own get_bind "
                "chooses their engine, after RoutingSession in the bases (as with "
                "Flask-SQLAlchemy's __bind_key__), or use a separate plain Session"
            )
        self.router: ReplicaRouter[Engine | AsyncEngine] = router
        # The state shared with the router's other sessions and its monitor.
        self._cluster: Cluster = router.cluster
        self.default_consistency: ConsistencyLevel | None = (
            None if consistency is None else validate_level(consistency, argument="consistency")
        )
        self.causal_scope: CausalScopeKind = (
            router.causal_scope
            if causal_scope is None
            else validate_causal_scope(causal_scope, argument="causal_scope")
        )
        # True from the first statement that wrote or locked on the primary
        # until the outermost transaction ends.
        self._pinned_to_primary = False
        # This session's own commits, whatever causal_context() it runs in.
        self._scope = CausalScope()
        # The primary connection of the current transaction: MariaDB's
        # @@last_gtid must be read on the connection that committed.
        self._primary_connection: Connection | None = None
        # What each engine the wrapped get_bind chose is (_ROUTED, _FOREIGN
        # or _AMBIGUOUS). Per session: cheap to rebuild, and never stale if
        # the application replaces its engines.
        self._bind_kinds: dict[Engine, str] = {}
        # Why the last statement went where it went (for explain()), and the
        # causal waits of the statement being explained.
        self._reason: Reason = NOTHING_TO_WAIT_FOR
        self._explain_waits: list[ExplainWait] = []
        # The replica connection a read's wait was attached to, to travel
        # with the read (dropped if the read does not run there); and
        # whether the read being planned may do so: not a monotonic one,
        # whose plan goes on from a failed wait itself (_replica_for).
        self._deferred_wait_on: Connection | None = None
        self._may_defer_wait = False
        # The read's decision, to count when that wait reaches its position
        # ("pending" from the deferral until _route knows it).
        self._deferred_decision: tuple[ReasonCode, ConsistencyLevel] | Literal["pending"] | None = (
            None
        )
        # True once the current flush has been routed (to the primary, which
        # it pins): SQLAlchemy asks get_bind more than once per flush.
        self._flush_routed = False
        super().__init__(*args, **kwargs)

    def flush(self, objects: Sequence[Any] | None = None) -> None:
        """Flush as ``Session.flush`` does; its route is decided (and counted,
        and explained) once."""
        self._flush_routed = False
        super().flush(objects)

    def get_bind(
        self,
        mapper: Mapper[Any] | type | None = None,
        # Positional as well as keyword (Session's are keyword-only), as in
        # Flask-SQLAlchemy's get_bind: a class that combines both must
        # satisfy both for type checkers.
        clause: ClauseElement | None = None,
        bind: Engine | Connection | None = None,
        **kw: Any,
    ) -> Engine | Connection:
        """Return the engine a statement runs on: a replica for a provable read,
        else the primary.

        An explicit ``bind`` argument, or a session-wide ``bind``, wins; then
        another database that a wrapped session class's ``get_bind`` chooses.
        """
        if bind is not None:
            return bind
        target: RoutedEngine | None = kw.pop(_TARGET_KEY, None)
        if self.bind is not None:
            return super().get_bind(mapper, clause=clause, **kw)
        if target is None:
            # Not from execute(): a flush, session.connection(), or a lookup.
            # (execute() asked the wrapped get_bind already, and passes a
            # foreign database as ``bind``.)
            if self._wrapped_get_bind is not None:
                foreign = self._foreign_bind(mapper, clause, kw)
                if foreign is not None:
                    return foreign
            if self._flushing:
                if self._flush_routed and self._pinned_to_primary:
                    return self._cluster.primary_target.sync_engine  # decided already
                self._flush_routed = True
            # No waiting here: get_bind must stay quick and free of I/O.
            level = self._level(None, None if self._flushing else clause)
            decision = self._decide(clause, level, None)
            logs = active_logs()
            if logs:
                self._explain_waits = []
            chosen = self._route(decision, clause, level, wait=False)
            if logs:
                what = "flush" if self._flushing else _describe(clause)
                self._explain(logs, what, chosen, level, ())
            return chosen.sync_engine
        if self._pinned_to_primary:
            # An autoflush wrote after execute() chose a replica.
            return self._cluster.primary_target.sync_engine
        return target.sync_engine

    # -- another database, chosen by a wrapped get_bind -------------------------

    def _foreign_bind(
        self, mapper: Any, clause: Any, kw: Mapping[str, Any]
    ) -> Engine | Connection | None:
        """The engine (or connection) the wrapped class's ``get_bind`` chooses
        for ``mapper`` / ``clause`` when it is another database than the
        router's, else None: the router routes.

        :raises ConfigurationError: the choice is the wrapped class's default
            engine, which is not recognisably the router's primary.
        """
        choice = self._ask_wrapped(mapper, clause, kw)
        engine = choice.engine if isinstance(choice, Connection) else choice
        kind = self._bind_kinds.get(engine)
        if kind is None:
            kind = self._bind_kinds[engine] = self._bind_kind(engine)
        if kind == _ROUTED:
            return None
        if kind == _FOREIGN:
            return choice
        raise self._ambiguous_bind(engine, mapper, clause)

    def _ask_wrapped(self, mapper: Any, clause: Any, kw: Mapping[str, Any]) -> Engine | Connection:
        """What the wrapped class's ``get_bind`` returns.

        While it is asked, the session's bind is the router's primary: a
        ``get_bind`` that falls back to ``Session.get_bind`` (which would
        raise, this session having no bind of its own) then names the
        router's database, with no exception raised and caught per statement.
        """
        self.bind = self._cluster.primary_target.sync_engine
        try:
            return super().get_bind(mapper, clause=clause, **kw)
        finally:
            self.bind = None

    def _bind_kind(self, engine: Engine) -> str:
        """Whether ``engine`` is the router's database, another one, or cannot tell.

        The router's database: one of its engines, or an engine whose URL
        names the same server and database as one of them (Flask-SQLAlchemy
        builds its own engines from the primary's URL). Anything else is
        another database, except the wrapped class's default engine: that
        is meant to be the router's, and writing there as if it were another
        database would be as wrong as routing a table of another database.
        """
        cluster = self._cluster
        targets = (cluster.primary_target, *cluster.replica_targets)
        if any(engine is target.sync_engine for target in targets):
            return _ROUTED
        address = _database_address(engine.url)
        if any(address == _database_address(target.sync_engine.url) for target in targets):
            return _ROUTED
        default = self._ask_wrapped(None, None, EMPTY_DICT)
        if engine is (default.engine if isinstance(default, Connection) else default):
            return _AMBIGUOUS
        return _FOREIGN

    def _ambiguous_bind(self, engine: Engine, mapper: Any, clause: Any) -> ConfigurationError:
        wrapped = self._wrapped_get_bind
        assert wrapped is not None
        if mapper is not None:
            inspected = sa_inspect(mapper, raiseerr=False)
            what = f"model {getattr(getattr(inspected, 'class_', mapper), '__name__', mapper)}"
        elif clause is not None:
            what = f"this {_describe(clause)} statement"
        else:
            what = "statements without a model (session.connection())"
        primary = self._cluster.primary_target.sync_engine
        return ConfigurationError(
            f"{wrapped.__qualname__}.get_bind sends {what} to its default engine "
            f"{engine.url.render_as_string(hide_password=True)}, which is not the router's "
            f"primary {primary.url.render_as_string(hide_password=True)}: RoutingSession "
            "cannot tell whether that is the routed database or another one, and does not "
            "guess where data is written. Give the default engine the primary's URL (with "
            "Flask-SQLAlchemy: SQLALCHEMY_DATABASE_URI), or give a model of another "
            "database a bind of its own (__bind_key__)"
        )

    # -- routing ------------------------------------------------------------

    def _level(
        self, statement_level: ConsistencyLevel | None, statement: Any = None
    ) -> ConsistencyLevel:
        """The level in force: statement > innermost consistency() > the rules
        of the tables ``statement`` reads > session's own default > innermost
        default_consistency() > router."""
        if statement_level is not None:
            return statement_level
        setting = current_consistency()
        if setting is not None:
            return setting.level
        level = (
            self.default_consistency
            or default_consistency.current()
            or self.router.default_consistency
        )
        rules = self.router.table_rules
        if statement is None or not (rules.explicit or info_rules_declared()):
            return level  # no rule anywhere: nothing to look up
        return rules.level(statement, level)

    def _decide(self, clause: Any, level: ConsistencyLevel, read_only: bool | None) -> Decision:
        router = self.router
        cluster = self._cluster
        return decide(
            router.classifier.classify(clause, flushing=self._flushing),
            level=level,
            read_only=read_only,
            pinned=self._pinned_to_primary,
            in_savepoint=self.in_nested_transaction(),
            has_replicas=bool(cluster.replica_targets),
        )

    def _route(
        self,
        decision: Decision,
        clause: Any,
        level: ConsistencyLevel,
        *,
        wait: bool,
        deadline: float | None = None,
        avoid: Collection[RoutedEngine] = (),
    ) -> RoutedEngine:
        """Pin if the decision says so; pick the target, log the choice.

        A read that may go to a replica follows a plan
        (:func:`~sqlalchemy_replicas.plan.plan_read`) made from a snapshot
        of the replicas: see :meth:`_replica_for`.

        :param wait: whether the read may wait for a replica to catch up
            (not from get_bind, which must stay free of I/O).
        :param deadline: when (``time.monotonic()``) the read's waits must
            be over; default ``wait_timeout`` from now. A read run again
            elsewhere after a replica failed keeps its first deadline.
        :param avoid: replicas not to use (their checkout just failed).
        """
        if decision.pins:
            self._pinned_to_primary = True
        cluster = self._cluster
        reason = decision.reason
        target: RoutedEngine
        if decision.to_primary:
            target = cluster.primary_target
        else:
            if deadline is None:
                deadline = time.monotonic() + cluster.wait_timeout
            target, reason = self._replica_for(
                level, reason, deadline=deadline if wait else None, avoid=avoid
            )
        self._reason = reason
        pending = self._deferred_decision == "pending"
        if pending:  # this read's wait travels with it:
            self._deferred_decision = (reason.code, level)  # counted once it reached
        else:
            cluster.stats_recorder.decision(target is cluster.primary_target, reason.code, level)
        if logger.isEnabledFor(logging.DEBUG):
            what = "flush" if self._flushing else _describe(clause)
            # A wait sent with the read has no outcome yet (_settle_deferred tells it).
            logger.debug(
                "%s -> %s: %s", what, target.name, _WAIT_WITH_READ if pending else reason.text
            )
        return target

    def _replica_for(
        self,
        level: ConsistencyLevel,
        default_reason: Reason,
        *,
        deadline: float | None,
        avoid: Collection[RoutedEngine],
    ) -> tuple[RoutedEngine, Reason]:
        """Plan a read that may go to a replica, and carry the plan out.

        eventual: any replica the monitor lets serve; bounded: one measured
        within the lag bound in force. read_your_writes: one known to have
        applied the scope's commits, else one that applies them within the
        read's single wait budget, else the primary. Monotonic reads also
        stay on one replica: leaving it (it cannot serve the scope's commits
        in time), the next replica must first reach what it had applied; a
        read on the primary raises the bar to the primary's position after
        the read. When that replica has no free connection, the read goes to
        the primary (the one server surely as new), and the scope stays with
        the replica.

        :param deadline: when the read's waits must be over; None: no wait.
        """
        cluster = self._cluster
        position: Any | None = None
        unknown = False
        bound: float | None = None
        stay: str | None = None
        scope: CausalScope | None = None
        if level in ("read_your_writes", "monotonic"):
            position, unknown = self._causal_target()
            if unknown:  # only the primary is sure to have that commit
                return cluster.primary_target, POSITION_UNKNOWN
            if level == "monotonic":
                scope = current_scope() or self._scope
                stay = scope.monotonic_replica(cluster)
        elif level == "bounded":
            setting = current_consistency()
            bound = (
                setting.max_lag
                if setting is not None and setting.max_lag is not None
                else cluster.max_lag
            )
        states = cluster.replica_snapshot(current_sticky_key())
        backend = cluster.positions if scope is not None or position is not None else None
        # Only execute() waits (get_bind gives no deadline): the read follows.
        self._may_defer_wait = scope is None
        budget = 0.0 if deadline is None else Plan.time_left(deadline, time.monotonic())
        plan = plan_read(
            level,
            states,
            reached=None if backend is None else backend.reached,
            position=position,
            budget=budget,
            bound=bound,
            stay=stay,
            default_reason=default_reason,
        )
        target, reason, full = self._follow(plan, deadline, avoid)
        if scope is None:
            return target, reason
        primary = cluster.primary_target
        if plan.forget_stay:
            # Another replica may be behind what the scope read there; the
            # primary is not, and reading there raises the floor for the next.
            scope.stay_on(cluster, None)
            return primary, reason
        if plan.stay and stay is not None:
            if target is not primary:
                return target, reason
            stay_target = cluster.replica_target(stay)
            if full or stay_target in avoid:
                return primary, _MONOTONIC_FULL
            # Leaving it: the next replica must first reach what it had applied.
            try:
                floor = self._applied_on(stay_target)
            except PoolFull:  # its last free connection went to another thread
                self._note_pool_full(stay_target)
                return primary, _MONOTONIC_FULL
            if floor is None:
                scope.stay_on(cluster, None)
                return primary, _MONOTONIC_UNKNOWN
            scope.add(cluster, floor)
            position, _ = self._causal_target()
            plan = plan_read(
                "read_your_writes",
                [state for state in states if state.name != stay_target.name],
                reached=backend.reached if backend is not None else None,
                position=position,
                budget=0.0 if deadline is None else Plan.time_left(deadline, time.monotonic()),
            )
            target, reason, full = self._follow(plan, deadline, avoid)
        scope.stay_on(cluster, None if target is primary else target.name)
        return target, Reason(reason.code, f"monotonic: {reason.text}")

    def _follow(
        self, plan: Plan, deadline: float | None, avoid: Collection[RoutedEngine]
    ) -> tuple[RoutedEngine, Reason, bool]:
        """Carry ``plan`` out (:func:`~sqlalchemy_replicas.plan.carry_out`): a
        replica in ``avoid`` or without a free connection, or a wait that is
        refused, fails or times out, moves on to the next step. Returns the
        target, the reason, and whether a replica was passed over for a full
        pool (then a read ending on the primary says so)."""
        cluster = self._cluster
        steps = plan.steps
        if steps and steps[0].wait_for is None and not avoid:
            # The common case, without carry_out's loop: the first step needs
            # no wait, so it serves the read when a connection is at hand
            # (else the loop below takes it from the start, counting the skip).
            first = steps[0]
            replica = cluster.replica_target(first.replica)
            if self._connection_at_hand(replica.sync_engine):
                return replica, first.reason, False
        full = False

        def take(step: Step, timeout: float) -> bool:
            nonlocal full
            replica = cluster.replica_target(step.replica)
            if replica in avoid:
                return False
            if self._pool_full(replica):
                full = True
                return False
            if step.wait_for is None:
                return True
            try:
                return self._wait_on(replica, step.wait_for, timeout)
            except PoolFull:  # its last free connection went to another thread
                self._note_pool_full(replica)
                full = True
                return False

        taken = carry_out(plan, deadline, time.monotonic, take)
        if taken is not None:
            return cluster.replica_target(taken.replica), taken.reason, full
        if full:
            return cluster.primary_target, NO_FREE_CONNECTION, full
        return cluster.primary_target, plan.fallback, full

    def _causal_target(self) -> tuple[Any | None, bool]:
        """The position reads must see, and whether only the primary will do.

        The position covers this session's commits, the router's (every
        commit made through it) unless the session's causal scope is
        ``"session"``, and the enclosing causal_context's with its token's.
        """
        cluster = self._cluster
        position, unknown = self._scope.target(cluster)
        others = [cluster.process_scope] if self.causal_scope == "router" else []
        context = current_scope()
        if context is not None:
            others.append(context)
        for scope in others:
            other_position, other_unknown = scope.target(cluster)
            unknown = unknown or other_unknown
            if other_position is not None:
                backend = cluster.positions
                assert backend is not None
                position = (
                    other_position if position is None else backend.merge(position, other_position)
                )
        return position, unknown

    def _applied_on(self, replica: RoutedEngine) -> Any | None:
        """The position ``replica`` has applied, or None when it cannot tell.

        :raises PoolFull: when its pool has no free connection.
        """
        backend = self._cluster.positions
        assert backend is not None
        try:
            return backend.applied(self._replica_connection(replica))
        except sa_exc.DBAPIError as error:
            logger.warning("reading the position of replica %s failed: %s", replica.name, error)
            self._replica_failed(replica, error)
            return None

    def _raise_floor_after_primary_read(self) -> None:
        """A monotonic read on the primary saw everything committed up to now:
        later reads in the scope must see as much."""
        cluster = self._cluster
        backend = cluster.positions
        if backend is None or not cluster.replica_targets:
            return
        scope = current_scope() or self._scope
        try:
            connection = self.connection(
                bind_arguments={"bind": cluster.primary_target.sync_engine}
            )
            position = backend.current(connection)
        except (sa_exc.DBAPIError, ValueError) as error:  # ValueError: it answered none
            logger.warning("reading the primary's position failed: %s", error)
            scope.mark_unknown(cluster)
            return
        if position is not None:
            scope.add(cluster, position)

    def _wait_on(self, replica: RoutedEngine, position: Any, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``replica`` to apply ``position``,
        on the session's own connection to it (the read that follows runs
        there). A replica that is not applying at all (replay paused) refuses
        at once, leaving the rest of the read's budget to the next replica.
        A wait that does not reach the position is remembered until the
        replica is seen to apply commits again (see ``Cluster.wait_failure``).

        Where the driver can (see :mod:`~sqlalchemy_replicas.pipelining`), a
        read's wait is not sent now but ahead of the read, in its round trip:
        this returns True, and the read raises ``WaitNotReached`` if it failed.

        :raises PoolFull: when its pool has no free connection.
        """
        backend = self._cluster.positions
        assert backend is not None
        started = time.perf_counter()
        try:
            connection = self._replica_connection(replica)
            if self._may_defer_wait and can_defer_wait(connection):
                defer_wait(
                    connection,
                    position,
                    timeout,
                    lambda outcome, seconds: self._settle_deferred(
                        replica, position, outcome, seconds
                    ),
                )
                self._deferred_wait_on = connection
                self._deferred_decision = "pending"
                return True
            result: DeferredOutcome = backend.wait_applying(connection, position, timeout)
        except sa_exc.DBAPIError as error:
            logger.warning("waiting on replica %s failed: %s", replica.name, error)
            result = "gone" if self._replica_failed(replica, error) else "failed"
        return self._waited(replica, position, result, time.perf_counter() - started)

    def _settle_deferred(
        self, replica: RoutedEngine, position: Any, outcome: DeferredOutcome, seconds: float
    ) -> None:
        """A wait sent with the read ended (see :meth:`_wait_on`): record it,
        and count the read's decision if it runs on ``replica``."""
        self._deferred_wait_on = None
        decision, self._deferred_decision = self._deferred_decision, None
        if self._waited(replica, position, outcome, seconds):
            if isinstance(decision, tuple):
                self._cluster.stats_recorder.decision(False, *decision)
            logger.debug(
                "replica %s applied this scope's commits (waited %.1f ms): the read sent "
                "with the wait stands",
                replica.name,
                seconds * 1000,
            )
        else:
            logger.debug(
                "replica %s did not apply this scope's commits (%s after %.1f ms): the read "
                "sent with the wait is discarded",
                replica.name,
                outcome,
                seconds * 1000,
            )

    def _waited(
        self, replica: RoutedEngine, position: Any, result: DeferredOutcome, seconds: float
    ) -> bool:
        """Count and remember how a wait on ``replica`` ended; whether it reached ``position``."""
        cluster = self._cluster
        backend = cluster.positions
        assert backend is not None
        # A refusal (not applying) counts with the failures: the replica
        # could not serve, and no time was spent waiting.
        outcome: WaitOutcome = (
            "reached" if result == "reached" else "timed_out" if result == "timed_out" else "failed"
        )
        if result == "stopped":
            logger.debug("replica %s is not applying (replay paused)", replica.name)
        cluster.stats_recorder.wait(outcome, seconds)
        if active_logs():
            self._explain_waits.append(
                ExplainWait(replica.name, backend.format(position), seconds, outcome)
            )
        if result == "gone":
            return False
        if result == "reached":
            cluster.note_applied(replica.name, position)
            return True
        cluster.note_wait_failed(replica.name, stopped=result == "stopped")
        return False

    def _replica_connection(self, replica: RoutedEngine) -> Connection:
        """The transaction's connection to ``replica``, checked out now if it
        has none, without waiting for one to come back to the pool.

        :raises PoolFull: when its pool has no free connection.
        """
        with nowait_checkout(replica.sync_engine):
            return self.connection(bind_arguments={"bind": replica.sync_engine})

    def _pool_full(self, replica: RoutedEngine) -> bool:
        """True, counted and logged, when a read on ``replica`` would wait for
        a connection: this transaction holds none to it and its pool has none
        free. The caller then routes the read elsewhere."""
        if self._connection_at_hand(replica.sync_engine):
            return False
        self._note_pool_full(replica)
        return True

    def _connection_at_hand(self, engine: Engine) -> bool:
        """Whether a read on ``engine`` needs no wait for a connection: this
        transaction holds one to it (asked first: a session reading more than
        once does), or its pool has one free or may open one."""
        return self._holds_connection(engine) or not pool_is_full(engine.pool)

    def _note_pool_full(self, replica: RoutedEngine) -> None:
        """Count (in ``cluster.status()``) and log a read passing ``replica`` by."""
        self._cluster.note_pool_full(replica)
        logger.debug("replica %s has no free connection; the read goes elsewhere", replica.name)

    def _holds_connection(self, engine: Engine) -> bool:
        """Whether the current transaction has a connection to ``engine``
        (SQLAlchemy offers no public way to ask without opening one)."""
        transaction = self._transaction
        while transaction is not None:
            if engine in transaction._connections:
                return True
            transaction = transaction._parent
        return False

    def _replica_failed(self, replica: RoutedEngine, error: BaseException) -> bool:
        """When ``error`` says ``replica`` is gone (not that a statement was
        bad): mark it down and drop this session's connection to it, so that
        the session can go on elsewhere. Returns whether it was gone."""
        if not is_disconnect(error):
            return False
        self._cluster.mark_down(replica, error)
        self._forget_connection(replica.sync_engine)
        return True

    def _forget_connection(self, engine: Engine) -> None:
        """Release the transaction's connection to ``engine``.

        Safe for replica connections only: they are AUTOCOMMIT, so nothing
        of the transaction lives on them. SQLAlchemy has no public way to
        release one connection of a transaction (reusing an invalidated one
        raises PendingRollbackError), hence the private ``_connections``.
        """
        transaction = self._transaction
        while transaction is not None:
            connections = transaction._connections
            entry = connections.pop(engine, None)
            if entry is not None:
                connection, engine_transaction, _, autoclose = entry
                connections.pop(connection, None)
                if transaction._parent is None:
                    engine_transaction.close()
                    if autoclose:
                        connection.close()
            transaction = transaction._parent

    def _record_commit(self, connection: Connection) -> None:
        """Capture the position of the commit just made on ``connection``."""
        cluster = self._cluster
        if not cluster.replica_targets:
            return  # every read goes to the primary anyway
        if cluster.record_commit(connection, [self._scope, *cluster.commit_scopes()]):
            connection.info[CAPTURED_KEY] = True

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
        try:
            return self._run_routed(
                method, statement, params, execution_options, bind_arguments, kw
            )
        finally:
            if self._deferred_wait_on is not None:  # a wait the read did not take
                forget_deferred_wait(self._deferred_wait_on)
                self._deferred_wait_on = None
            decision, self._deferred_decision = self._deferred_decision, None
            if isinstance(decision, tuple):  # routed there all the same
                self._cluster.stats_recorder.decision(False, *decision)

    def _run_routed(
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
        if self._wrapped_get_bind is not None:
            foreign = self._foreign_bind(*_bind_question(statement, bind_arguments))
            if foreign is not None:
                # Another database: no replicas, no positions, no pin; the
                # errors there are not a replica's.
                return method(
                    statement, params, execution_options=execution_options,
                    bind_arguments={**(bind_arguments or EMPTY_DICT), "bind": foreign}, **kw,
                )  # fmt: skip
        statement_level, read_only = _routing_options(statement, execution_options)
        level = self._level(statement_level, statement)
        decision = self._decide(statement, level, read_only)
        logs = active_logs()
        if logs:
            self._explain_waits = []
        # One deadline for the read's waits, reruns elsewhere included.
        deadline = time.monotonic() + self._cluster.wait_timeout
        target = self._route(decision, statement, level, wait=True, deadline=deadline)
        routed = (
            {**bind_arguments, _TARGET_KEY: target} if bind_arguments else {_TARGET_KEY: target}
        )
        reruns: list[ExplainRerun] | None = None
        if target is not self._cluster.primary_target:
            # Each failure marks a replica down, or (its pool full) leaves it out
            # of this statement's route, so the route ends on the primary.
            avoid: list[RoutedEngine] = []
            reruns = []
            for _ in range(len(self._cluster.replica_targets)):
                try:
                    # The pre-check in _route saw a free connection, but another
                    # thread may have taken it since: never wait for it. (No
                    # checkout at all when the transaction holds one there.)
                    engine = target.sync_engine
                    with (
                        _NO_CHECKOUT if self._holds_connection(engine) else nowait_checkout(engine)
                    ):
                        result = method(
                            statement, params, execution_options=execution_options,
                            bind_arguments=routed, **kw,
                        )  # fmt: skip
                except PoolFull:
                    self._note_pool_full(target)
                    self._note_rerun(reruns, target, "pool_full", "its pool had no free connection")
                    avoid.append(target)
                except WaitNotReached:
                    # The wait sent with the read failed (counted, remembered):
                    # its rows are discarded, the plan's next step serves.
                    avoid.append(target)
                except sa_exc.DBAPIError as error:
                    if is_read_only_violation(error):
                        self._rerun_on_primary(reruns, target, _REFUSED_WRITE, level)
                        result = self._rerun_refused_write(
                            method, statement, params, execution_options, routed, kw, target, error
                        )
                        if logs:
                            self._explain(
                                logs, statement, self._cluster.primary_target, level, reruns
                            )
                        return result
                    if is_recovery_conflict(error):
                        # The replica is fine; replay needed what this read held.
                        logger.warning(
                            "replica %s cancelled a read (conflict with recovery); running "
                            "it on the primary",
                            target.name,
                        )
                        target = self._rerun_on_primary(reruns, target, _RECOVERY_CONFLICT, level)
                        routed[_TARGET_KEY] = target
                        break
                    if is_schema_behind(error):
                        # Most likely a migration the replica has not applied
                        # yet. If the primary has no such object either, its
                        # own error is what the caller sees.
                        logger.warning(
                            "replica %s lacks an object this read names (a migration it has "
                            "not applied yet?); running it on the primary: %s",
                            target.name,
                            _first_line(error.orig),
                        )
                        target = self._rerun_on_primary(reruns, target, _SCHEMA_BEHIND, level)
                        routed[_TARGET_KEY] = target
                        break
                    if not self._replica_failed(target, error):
                        raise
                    logger.warning(
                        "replica %s went away during a read; running the read elsewhere",
                        target.name,
                    )
                    self._note_rerun(
                        reruns, target, "replica_failed", f"went away: {_first_line(error.orig)}"
                    )
                else:
                    if logs:
                        self._explain(logs, statement, target, level, reruns)
                    return result
                # Nothing was returned yet, and replica reads hold no transaction
                # state: the read can run again wherever the policy now says.
                target = self._route(
                    decision, statement, level, wait=True, deadline=deadline, avoid=avoid
                )
                routed[_TARGET_KEY] = target
                if target is self._cluster.primary_target:
                    break
        result = method(
            statement, params, execution_options=execution_options,
            bind_arguments=routed, **kw,
        )  # fmt: skip
        if target is self._cluster.primary_target and level == "monotonic" and not decision.pins:
            self._raise_floor_after_primary_read()
        if logs:
            self._explain(logs, statement, target, level, reruns or ())
        return result

    # -- explain() and stats ------------------------------------------------------

    def _note_rerun(
        self, reruns: list[ExplainRerun], replica: RoutedEngine, cause: RerunCause, detail: str
    ) -> None:
        """Count a statement leaving ``replica`` to run again elsewhere."""
        self._cluster.stats_recorder.rerun(cause)
        reruns.append(ExplainRerun(replica.name, cause, detail))

    def _rerun_on_primary(
        self,
        reruns: list[ExplainRerun],
        replica: RoutedEngine,
        reason: Reason,
        level: ConsistencyLevel,
    ) -> RoutedEngine:
        """Count a statement leaving ``replica`` for the primary, for ``reason``
        (a rerun, and a decision to the primary); return the primary."""
        cluster = self._cluster
        cause: RerunCause = reason.code  # type: ignore[assignment]
        self._note_rerun(reruns, replica, cause, reason.text)
        cluster.stats_recorder.decision(True, reason.code, level)
        self._reason = reason
        return cluster.primary_target

    def _explain(
        self,
        logs: tuple[ExplainLog, ...],
        statement: Any,
        target: RoutedEngine,
        level: ConsistencyLevel,
        reruns: Collection[ExplainRerun],
    ) -> None:
        """Append the statement just routed to every active explain() log."""
        reason = self._reason
        text = (
            statement
            if isinstance(statement, str)
            else short_sql(statement, target.sync_engine.dialect)
        )
        entry = ExplainEntry(
            text,
            target.name,
            reason.code,
            reason.text,
            level,
            tuple(self._explain_waits),
            tuple(reruns),
        )
        self._explain_waits = []
        for log in logs:
            log.append(entry)

    def _rerun_refused_write(
        self,
        method: Callable[..., _T],
        statement: Any,
        params: Any,
        execution_options: Mapping[str, Any],
        routed: dict[str, Any],
        kw: dict[str, Any],
        target: RoutedEngine,
        error: sa_exc.DBAPIError,
    ) -> _T:
        """A read-only replica refused ``statement`` as a write: run it on the primary."""
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
        routed[_TARGET_KEY] = self._cluster.primary_target
        return method(
            statement, params, execution_options=execution_options,
            bind_arguments=routed, **kw,
        )  # fmt: skip


def _is_router(candidate: object) -> TypeGuard[ReplicaRouter[Engine | AsyncEngine]]:
    """Whether ``candidate`` is a ReplicaRouter, told by the shared state every
    router holds (this module does not import the router's)."""
    return isinstance(getattr(candidate, "cluster", None), Cluster)


def _bind_question(
    statement: Any, bind_arguments: Mapping[str, Any] | None
) -> tuple[Any, Any, dict[str, Any]]:
    """The mapper, clause and other keywords Session.execute will pass to
    get_bind for ``statement``, as SQLAlchemy derives them: an ORM
    statement's mapper is its subject's, and its clause is itself."""
    kw = dict(bind_arguments or EMPTY_DICT)
    mapper = kw.pop("mapper", None)
    clause = kw.pop("clause", None)
    attrs = getattr(statement, "_propagate_attrs", EMPTY_DICT)
    if attrs.get("compile_state_plugin") == "orm":
        subject = attrs.get("plugin_subject")
        if subject is not None:
            mapper = subject.mapper
        clause = statement
    elif clause is None:
        clause = statement
    return mapper, clause, kw


def _database_address(url: URL) -> tuple[Any, ...]:
    """What in ``url`` names a server and a database: not the driver, the
    user, the password or driver options."""
    backend = url.get_backend_name()
    if backend == "mariadb":
        backend = "mysql"  # one server, two dialect names
    query = tuple(sorted((k, v) for k, v in url.query.items() if k in _ADDRESS_QUERY_KEYS))
    host = url.host.lower() if url.host else url.host
    return backend, host, url.port or _DEFAULT_PORTS.get(backend), url.database, query


def _routing_options(
    statement: Any, execution_options: Mapping[str, Any]
) -> tuple[ConsistencyLevel | None, bool | None]:
    """The ``consistency`` and ``read_only`` options in force for one execution:
    those passed to execute() win over the statement's own."""
    statement_options = getattr(statement, "_execution_options", EMPTY_DICT)
    if not execution_options and not statement_options:
        return None, None  # the common case
    level = execution_options.get("consistency", statement_options.get("consistency"))
    read_only = execution_options.get("read_only", statement_options.get("read_only"))
    if level is not None:
        level = validate_level(level, argument="execution option consistency")
    if read_only is not None and not isinstance(read_only, bool):
        raise ConfigurationError(
            f"execution option read_only={read_only!r} must be True, False or None"
        )
    return level, read_only


@event.listens_for(RoutingSession, "after_begin")
def _remember_primary_connection(
    session: Session, transaction: SessionTransaction, connection: Connection
) -> None:
    if (
        isinstance(session, RoutingSession)
        and connection.engine is session._cluster.primary_target.sync_engine
    ):
        session._primary_connection = connection


@event.listens_for(RoutingSession, "after_commit")
def _capture_commit_position(session: Session) -> None:
    # Also fired when a savepoint is released: only the outermost commit counts.
    if not isinstance(session, RoutingSession) or session.in_nested_transaction():
        return
    connection = session._primary_connection
    if connection is None:
        return
    if session._pinned_to_primary:
        session._record_commit(connection)
    else:
        # Nothing of this transaction wrote (every write pins): the pool's
        # check-in has no position to read either.
        connection.info[CAPTURED_KEY] = True


@event.listens_for(RoutingSession, "after_transaction_end")
def _unpin_after_root_transaction(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None and isinstance(session, RoutingSession):
        session._pinned_to_primary = False
        session._primary_connection = None


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _describe(clause: Any) -> str:
    if clause is None:
        return "no statement"
    name = str(getattr(clause, "__visit_name__", type(clause).__name__))
    return "TEXT" if name == "textclause" else name.upper()
