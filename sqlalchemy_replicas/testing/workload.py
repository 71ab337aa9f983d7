"""The workload: clients that write and read through a router, and the
schema they do it on.

A client is a user of a web app. It runs *visits*: one
``causal_context(token)`` each, seeded with the token its previous visit
ended with (the cookie), under its own ``sticky()`` key and consistency
level, made of a few operations, each in a session of its own (a request).
Sync clients are threads using ``router.sessionmaker()``; async clients are
asyncio tasks using ``router.async_sessionmaker()``.

Operations: insert a new key of its own, update one of its own keys, read
one of its own keys or another client's, increment a shared counter, read
a counter. A key has exactly one writer, its client; version ``n`` of a key
is the client's ``n``-th attempted write of it, so each version names one
write (see :mod:`.checker`).

The tables are a :class:`Schema`: :class:`RegisterSchema` creates its own
two tables; plug your own tables in by implementing the protocol (seven
short methods, each given a plain sync ``Session`` or ``Connection``; async
clients call them through ``AsyncSession.run_sync``).

Does I/O: the clients' sessions.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, runtime_checkable

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from ..causal import CausalContext, causal_context
from ..consistency import ConsistencyLevel, consistency
from ..sticky import sticky
from .history import History, Op, OpKind, Outcome, ServerRecorder

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
    from sqlalchemy.orm import sessionmaker

__all__ = [
    "DEFAULT_MIX",
    "ClientSpec",
    "RegisterSchema",
    "Schema",
    "SharedKeys",
    "make_client",
    "run_async_client",
    "run_sync_client",
]

#: Relative frequency of each operation (``read_own``/``read_other`` are
#: reads of one's own / another client's key).
DEFAULT_MIX: Final[Mapping[str, float]] = {
    "insert": 1.0,
    "update": 3.0,
    "read_own": 3.0,
    "read_other": 3.0,
    "increment": 1.0,
    "read_counter": 2.0,
}


@runtime_checkable
class Schema(Protocol):
    """The tables a consistency check writes and reads: keys with an integer
    version, and counters.

    Write methods only stage their change in the session; the harness
    commits (and classifies an error at commit as an unknown outcome).
    Implement the counter methods only if :attr:`counters` is non-empty.
    """

    #: Names of the counters (rows created by :meth:`create`, starting at 0);
    #: empty: no counter operations.
    counters: Sequence[str]

    def create(self, connection: Connection) -> None:
        """Create the tables and the counter rows (run on the primary, committed)."""

    def insert(self, session: Session, key: str, version: int) -> None:
        """Add ``key`` with ``version`` (1)."""

    def update(self, session: Session, key: str, version: int) -> int | None:
        """Set ``key``'s version; return the number of rows changed if known."""

    def read(self, session: Session, key: str) -> int | None:
        """``key``'s version, or None when there is no such row. One statement:
        the server that ran the last statement is recorded as the reader."""

    def increment(self, session: Session, counter: str) -> None:
        """Add 1 to ``counter`` (on the server: ``value = value + 1``)."""

    def read_counter(self, session: Session, counter: str) -> int:
        """``counter``'s value."""

    def dump(self, connection: Connection) -> tuple[dict[str, int], dict[str, int]]:
        """Every key's version and every counter's value, read on ``connection``."""


class RegisterSchema:
    """The harness's own tables: ``sr_check_register(k, version)`` and
    ``sr_check_counter(name, value)``.

    :param prefix: the tables' name prefix.
    :param counters: how many counters to create.
    """

    def __init__(self, prefix: str = "sr_check", counters: int = 3) -> None:
        metadata = sa.MetaData()
        self.register = sa.Table(
            f"{prefix}_register",
            metadata,
            sa.Column("k", sa.String(64), primary_key=True),
            sa.Column("version", sa.Integer, nullable=False),
        )
        self.counter = sa.Table(
            f"{prefix}_counter",
            metadata,
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("value", sa.Integer, nullable=False),
        )
        self.metadata = metadata
        self.counters: Sequence[str] = tuple(f"c{i}" for i in range(counters))

    def create(self, connection: Connection) -> None:
        self.metadata.create_all(connection)
        if self.counters:
            connection.execute(
                sa.insert(self.counter), [{"name": n, "value": 0} for n in self.counters]
            )

    def insert(self, session: Session, key: str, version: int) -> None:
        session.execute(sa.insert(self.register).values(k=key, version=version))

    def update(self, session: Session, key: str, version: int) -> int | None:
        result = session.execute(
            sa.update(self.register).where(self.register.c.k == key).values(version=version)
        )
        return int(getattr(result, "rowcount", -1))

    def read(self, session: Session, key: str) -> int | None:
        return session.scalar(sa.select(self.register.c.version).where(self.register.c.k == key))

    def increment(self, session: Session, counter: str) -> None:
        session.execute(
            sa.update(self.counter)
            .where(self.counter.c.name == counter)
            .values(value=self.counter.c.value + 1)
        )

    def read_counter(self, session: Session, counter: str) -> int:
        value = session.scalar(
            sa.select(self.counter.c.value).where(self.counter.c.name == counter)
        )
        return int(value or 0)

    def dump(self, connection: Connection) -> tuple[dict[str, int], dict[str, int]]:
        rows = connection.execute(sa.select(self.register.c.k, self.register.c.version))
        counters = connection.execute(sa.select(self.counter.c.name, self.counter.c.value))
        return {row[0]: row[1] for row in rows}, {row[0]: row[1] for row in counters}


@dataclass(frozen=True)
class ClientSpec:
    """Who a client is.

    :ivar name: its name (and the prefix of its keys).
    :ivar level: the consistency level of all its operations.
    :ivar max_lag: for ``bounded``: the bound, seconds.
    :ivar sticky_key: its ``sticky()`` key.
    :ivar visit_ops: (min, max) operations per visit (one causal context).
    """

    name: str
    level: ConsistencyLevel = "read_your_writes"
    max_lag: float | None = None
    sticky_key: str = ""
    visit_ops: tuple[int, int] = (1, 4)


@dataclass
class SharedKeys:
    """Keys whose insert was acknowledged, for reading others' keys (thread-safe)."""

    keys: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, key: str) -> None:
        with self._lock:
            self.keys.append(key)

    def pick(self, rng: random.Random, not_prefix: str) -> str | None:
        """A random key of another client (None: none yet)."""
        with self._lock:
            others = [k for k in self.keys[-200:] if not k.startswith(not_prefix)]
        return rng.choice(others) if others else None


@dataclass
class _Plan:
    kind: OpKind
    key: str
    own: bool = True
    version: int | None = None


@dataclass
class _Result:
    outcome: Outcome = "fail"
    value: int | None = None
    rowcount: int | None = None
    error: str | None = None
    server: str | None = None
    identity: str | None = None


class _Client:
    """One client's state between operations (used by one thread or task)."""

    def __init__(
        self,
        spec: ClientSpec,
        *,
        schema: Schema,
        history: History,
        shared: SharedKeys,
        mix: Mapping[str, float],
        seed: int,
        causal_domain: str,
        scope_kind: Literal["session", "router"],
    ) -> None:
        self.spec = spec
        self.schema = schema
        self.history = history
        self.shared = shared
        self.rng = random.Random(seed)
        self.causal_domain = causal_domain
        self.scope_kind = scope_kind
        kinds = [k for k, w in mix.items() if w > 0]
        if not schema.counters:
            kinds = [k for k in kinds if k not in ("increment", "read_counter")]
        self._kinds = kinds
        self._weights = [mix[k] for k in kinds]
        self._own_keys: list[str] = []
        self._attempted: dict[str, int] = {}  # key -> highest version attempted
        self._next_key = 0
        #: Errors computing the causal token, by type.
        self.token_errors: list[str] = []

    # -- planning -----------------------------------------------------------------

    def plan(self) -> _Plan:
        choice = self.rng.choices(self._kinds, self._weights)[0]
        if choice in ("update", "read_own") and not self._own_keys:
            choice = "insert"
        if choice == "read_other":
            key = self.shared.pick(self.rng, f"{self.spec.name}-")
            if key is not None:
                return _Plan("read", key, own=False)
            choice = "read_own" if self._own_keys else "insert"
        if choice == "insert":
            self._next_key += 1
            return _Plan("insert", f"{self.spec.name}-{self._next_key}", version=1)
        if choice == "update":
            key = self.rng.choice(self._own_keys)
            return _Plan("update", key, version=self._attempted[key] + 1)
        if choice == "read_own":
            return _Plan("read", self.rng.choice(self._own_keys))
        counter = self.rng.choice(list(self.schema.counters))
        return _Plan("increment" if choice == "increment" else "read_counter", counter)

    def settings(self, token: str | None) -> tuple[ExitStack, CausalContext]:
        """Enter the visit's causal context, sticky key and level."""
        stack = ExitStack()
        ctx = stack.enter_context(causal_context(token))
        stack.enter_context(sticky(self.spec.sticky_key or self.spec.name))
        stack.enter_context(consistency(self.spec.level, max_lag=self.spec.max_lag))
        return stack, ctx

    def token(self, ctx: CausalContext, old: str | None) -> str | None:
        try:
            return ctx.token
        except Exception as error:
            self.token_errors.append(_describe(error))
            return old

    # -- executing (sync and async) -------------------------------------------------

    def write(self, session: Session, plan: _Plan) -> int | None:
        if plan.kind == "increment":
            self.schema.increment(session, plan.key)
            return None
        assert plan.version is not None
        if plan.kind == "insert":
            self.schema.insert(session, plan.key, plan.version)
            return None
        return self.schema.update(session, plan.key, plan.version)

    def read(self, session: Session, plan: _Plan) -> int | None:
        if plan.kind == "read":
            return self.schema.read(session, plan.key)
        return self.schema.read_counter(session, plan.key)

    def finish(
        self, plan: _Plan, scope: int, op_id: int, invoke: tuple[float, float], result: _Result
    ) -> None:
        """Record the operation and learn from its outcome."""
        if plan.version is not None:
            self._attempted[plan.key] = max(self._attempted.get(plan.key, 0), plan.version)
        if plan.kind == "insert" and result.outcome == "ok":
            self._own_keys.append(plan.key)
            self.shared.add(plan.key)
        self.history.record(
            Op(
                id=op_id,
                client=self.spec.name,
                kind=plan.kind,
                key=plan.key,
                invoke=invoke[0],
                complete=time.monotonic(),
                outcome=result.outcome,
                level=self.spec.level,
                max_lag=self.spec.max_lag,
                own=plan.own,
                version=plan.version,
                value=result.value,
                rowcount=result.rowcount,
                error=result.error,
                server=result.server,
                server_identity=result.identity,
                causal_domain=self.causal_domain,
                scope=scope,
                scope_kind=self.scope_kind,
                invoke_wall=invoke[1],
            )
        )


def _describe(error: BaseException) -> str:
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}"[:300]


def run_sync_client(client: _Client, make: sessionmaker[Any], deadline: float) -> None:
    """Run visits until ``deadline`` (``time.monotonic()``), one operation at a time."""
    token: str | None = None
    while time.monotonic() < deadline:
        scope = client.history.next_scope()
        stack, ctx = client.settings(token)
        with stack:
            for _ in range(client.rng.randint(*client.spec.visit_ops)):
                if time.monotonic() >= deadline:
                    break
                _sync_op(client, make, scope)
            token = client.token(ctx, token)


def _sync_op(client: _Client, make: sessionmaker[Any], scope: int) -> None:
    plan, op_id, invoke, result = client.plan(), client.history.next_id(), _now(), _Result()
    try:
        with make() as session:
            _perform(session, client, plan, result)
    except Exception as error:
        # A failed commit is "unknown"; a failure closing the session after an
        # acknowledged operation changes nothing of what it did.
        result.error = result.error or _describe(error)
    client.finish(plan, scope, op_id, invoke, result)


def _now() -> tuple[float, float]:
    return time.monotonic(), time.time()


def _perform(session: Session, client: _Client, plan: _Plan, result: _Result) -> None:
    """One operation on ``session`` (an async session's sync one, in its
    greenlet, for async clients), recorded in ``result`` as it goes."""
    if plan.kind in ("insert", "update", "increment"):
        try:
            result.rowcount = client.write(session, plan)
        except Exception as error:
            result.error = _describe(error)
            return
        result.outcome = "unknown"  # from here on, the commit may have landed
        session.commit()
        result.outcome = "ok"
    else:
        with ServerRecorder.reading() as served:
            result.value = client.read(session, plan)
        result.outcome = "ok"
        result.server, result.identity = served.server, served.identity


async def run_async_client(
    client: _Client, make: async_sessionmaker[AsyncSession], deadline: float
) -> None:
    """The asyncio twin of :func:`run_sync_client`."""
    token: str | None = None
    while time.monotonic() < deadline:
        scope = client.history.next_scope()
        stack, ctx = client.settings(token)
        with stack:
            for _ in range(client.rng.randint(*client.spec.visit_ops)):
                if time.monotonic() >= deadline:
                    break
                await _async_op(client, make, scope)
            # Straight from the coroutine, as a web handler sets its cookie: an
            # unknown position then travels as such (no I/O off the greenlet).
            token = client.token(ctx, token)


async def _async_op(client: _Client, make: async_sessionmaker[AsyncSession], scope: int) -> None:
    plan, op_id, invoke, result = client.plan(), client.history.next_id(), _now(), _Result()
    try:
        async with make() as session:
            await session.run_sync(_perform, client, plan, result)
    except Exception as error:
        result.error = result.error or _describe(error)
    client.finish(plan, scope, op_id, invoke, result)


def make_client(
    spec: ClientSpec,
    *,
    schema: Schema,
    history: History,
    shared: SharedKeys,
    mix: Mapping[str, float] = DEFAULT_MIX,
    seed: int = 0,
    causal_domain: str = "default",
    scope_kind: Literal["session", "router"] = "session",
) -> _Client:
    """A client's state, for :func:`run_sync_client` / :func:`run_async_client`."""
    return _Client(
        spec,
        schema=schema,
        history=history,
        shared=shared,
        mix=mix,
        seed=seed,
        causal_domain=causal_domain,
        scope_kind=scope_kind,
    )
