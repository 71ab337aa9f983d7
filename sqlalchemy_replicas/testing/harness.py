"""``run_check``: a Jepsen-style consistency check of a router under faults.

It creates the schema on the topology's primary, builds a sync and an async
router, runs client threads and asyncio tasks (:mod:`.workload`) while a
:class:`~.nemesis.Nemesis` injects faults, heals everything, waits for the
replicas to catch up, reads every server's final contents, and hands it all
to the pure :func:`~.checker.check`. It prints a report and returns a
:class:`CheckResult`.

Does I/O: servers, sessions, threads, an event loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import URL

from ..consistency import LEVELS, ConsistencyLevel
from ..router import ReplicaRouter
from .checker import DEFAULT_SLACK, FinalState, Violation, check
from .history import Fault, History, Op, ServerRecorder, server_identity
from .nemesis import FAULTS, AsyncPoolHolder, Nemesis, PoolHolder, SyncPoolHolder
from .workload import (
    DEFAULT_MIX,
    ClientSpec,
    RegisterSchema,
    Schema,
    SharedKeys,
    make_client,
    run_async_client,
    run_sync_client,
)

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from ._topology import Topology

__all__ = ["DEFAULT_LEVELS", "CheckResult", "run_check"]

#: The levels clients get, in turn (read_your_writes, the default, twice as often).
DEFAULT_LEVELS: tuple[ConsistencyLevel, ...] = (
    "read_your_writes",
    "monotonic",
    "bounded",
    "read_your_writes",
    "eventual",
    "strong",
)

#: Router options the harness uses unless ``router_options`` says otherwise.
#: Short checks and waits make faults visible within a short run; a small
#: pool with a short checkout timeout makes pool exhaustion bite.
DEFAULT_ROUTER_OPTIONS: Mapping[str, Any] = {
    "max_lag": 2.0,
    "wait_timeout": 0.3,
    "lag_check_interval": 0.2,
    "engine_options": {
        "pool_size": 4,
        "max_overflow": 2,
        "pool_timeout": 2.0,
        "pool_pre_ping": True,
    },
}


@dataclass
class CheckResult:
    """What a check found.

    :ivar violations: every broken guarantee (empty: the run passed).
    :ivar ops: every operation, in invoke order.
    :ivar faults: every fault injected, in order.
    :ivar final: the servers' contents at the end.
    :ivar nemesis_errors: errors injecting or healing faults.
    :ivar hung_clients: clients still running long after the end (a failure).
    :ivar token_errors: errors computing a causal token, by client.
    :ivar duration: seconds the workload ran.
    :ivar description: backend, clients and levels, for the report.
    :ivar phases: seconds taken after the workload's end by each step:
        ``heal`` (the nemesis stops and heals), ``clients`` (in-flight
        operations finish), ``catchup`` and ``final`` (reading every server).
    """

    violations: list[Violation]
    ops: list[Op]
    faults: list[Fault]
    final: FinalState
    nemesis_errors: list[str] = field(default_factory=list)
    hung_clients: list[str] = field(default_factory=list)
    token_errors: dict[str, list[str]] = field(default_factory=dict)
    duration: float = 0.0
    description: str = ""
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No violation, no hung client."""
        return not self.violations and not self.hung_clients

    def ops_by_kind(self) -> Counter[str]:
        """Operations per kind (reads split into ``read_own`` / ``read_other``)."""
        return Counter(_kind(op) for op in self.ops)

    def outcomes(self) -> Counter[tuple[str, str]]:
        """Operations per (kind, outcome)."""
        return Counter((_kind(op), op.outcome) for op in self.ops)

    def reads_by_server(self, *, include_strong: bool = True) -> Counter[str]:
        """Successful reads per serving node."""
        return Counter(
            op.server or "?"
            for op in self.ops
            if op.is_read and op.outcome == "ok" and (include_strong or op.level != "strong")
        )

    def replica_read_share(self, *, include_strong: bool = True) -> float:
        """The share of successful reads served by replicas (0 with no reads)."""
        counts = self.reads_by_server(include_strong=include_strong)
        total = sum(counts.values())
        return 0.0 if not total else (total - counts["primary"]) / total

    def client_errors(self) -> Counter[str]:
        """Errors raised to clients, by ``kind outcome: error type``."""
        return Counter(
            f"{_kind(op)} {op.outcome}: {(op.error or '').split(':')[0]}"
            for op in self.ops
            if op.outcome != "ok"
        )

    def read_failures_during(self, *, replica_faults_only: bool) -> int:
        """Failed reads while only replicas were faulty (or nothing was), with
        ``replica_faults_only``; else while the primary (or its pool) was."""

        def on_replica(fault: Fault) -> bool:
            return fault.target.split(":")[-1] != "primary"

        count = 0
        for op in self.ops:
            if not op.is_read or op.outcome == "ok":
                continue
            active = [f for f in self.faults if f.overlaps(op.invoke, op.complete)]
            if all(on_replica(f) for f in active) == replica_faults_only:
                count += 1
        return count

    def faults_by_kind(self) -> Counter[str]:
        """Injected faults per kind."""
        return Counter(f.kind for f in self.faults)

    def report(self, *, max_violations: int = 50) -> str:
        """The human-readable report ``run_check`` prints."""
        lines = [f"consistency check: {self.description}, {self.duration:.1f} s"]
        if self.phases:
            lines.append(
                "after the end: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
            )
        outcomes = self.outcomes()
        kinds = self.ops_by_kind()
        per_kind = []
        for kind in sorted(kinds):
            parts = [f"{outcomes[(kind, o)]} {o}" for o in ("ok", "unknown", "fail")]
            per_kind.append(f"{kind} {kinds[kind]} ({', '.join(parts)})")
        lines.append(f"operations: {len(self.ops)}: " + "; ".join(per_kind))
        faults = self.faults_by_kind()
        lines.append(
            f"faults injected: {len(self.faults)}"
            + (": " + ", ".join(f"{k} {faults[k]}" for k in FAULTS if faults[k]) if faults else "")
        )
        for error in self.nemesis_errors:
            lines.append(f"  nemesis error: {error}")
        servers = self.reads_by_server()
        lines.append(
            f"reads on replicas: {self.replica_read_share():.1%} of all, "
            f"{self.replica_read_share(include_strong=False):.1%} of non-strong; by server: "
            + ", ".join(f"{name} {servers[name]}" for name in sorted(servers))
        )
        errors = self.client_errors()
        lines.append(
            f"errors raised to clients: {sum(errors.values())} (failed reads while only "
            f"replicas were faulty: {self.read_failures_during(replica_faults_only=True)}, "
            f"while the primary was: {self.read_failures_during(replica_faults_only=False)})"
        )
        for what, count in errors.most_common():
            lines.append(f"  {count:5d}  {what}")
        for client, errs in self.token_errors.items():
            lines.append(f"  token errors of {client}: {len(errs)} (first: {errs[0]})")
        if self.hung_clients:
            lines.append(f"HUNG CLIENTS: {', '.join(self.hung_clients)}")
        lines.append(f"violations: {len(self.violations)}")
        for violation in self.violations[:max_violations]:
            lines.append(f"  {violation}")
        if len(self.violations) > max_violations:
            lines.append(f"  ... and {len(self.violations) - max_violations} more")
        return "\n".join(lines)


def _kind(op: Op) -> str:
    if op.kind == "read":
        return "read_own" if op.own else "read_other"
    return op.kind


def run_check(
    topology: Topology,
    *,
    duration: float = 20.0,
    threads: int = 4,
    tasks: int = 4,
    levels: Sequence[ConsistencyLevel] = DEFAULT_LEVELS,
    bounded_lag: float = 1.0,
    faults: Sequence[str] = FAULTS,
    fault_duration: tuple[float, float] = (0.5, 2.0),
    fault_gap: tuple[float, float] = (0.2, 1.0),
    schema: Schema | None = None,
    mix: Mapping[str, float] = DEFAULT_MIX,
    causal_scope: Literal["session", "router"] = "session",
    router_options: Mapping[str, Any] | None = None,
    slack: float = DEFAULT_SLACK,
    seed: int | None = None,
    output: Callable[[str], None] | None = print,
    catchup_timeout: float = 60.0,
) -> CheckResult:
    """Run clients against ``topology`` under faults, check the history, report.

    :param topology: a started topology (its application database empty, or
        at least without the schema's tables).
    :param duration: seconds the clients run.
    :param threads: sync clients (threads, ``router.sessionmaker()``).
    :param tasks: async clients (asyncio tasks, ``router.async_sessionmaker()``).
    :param levels: the clients' consistency levels, assigned in turn.
    :param bounded_lag: ``max_lag`` of ``bounded`` clients.
    :param faults: the fault kinds the nemesis picks from (empty: none).
    :param fault_duration: (min, max) seconds each fault lasts.
    :param fault_gap: (min, max) seconds between faults.
    :param schema: the tables (default :class:`RegisterSchema`); its ``create``
        runs on the primary first.
    :param mix: relative frequency of each operation (see
        :data:`~.workload.DEFAULT_MIX`).
    :param causal_scope: the routers' causal scope. ``"session"`` (default):
        each client's commits reach its later visits only through its token,
        as for a web client with a cookie. ``"router"``: every commit made
        through the router counts (the checker then demands that too).
    :param router_options: ``ReplicaRouter`` keyword arguments, over
        :data:`DEFAULT_ROUTER_OPTIONS` (a ``secret`` is generated).
    :param slack: staleness slack, seconds, added to the lag monitor's
        ``lag_check_interval`` for ``bounded``/``eventual`` reads.
    :param seed: seeds clients and nemesis (None: random).
    :param output: called with the report (None: print nothing).
    :param catchup_timeout: seconds the replicas may take to catch up at the end.
    """
    if threads < 0 or tasks < 0 or threads + tasks == 0:
        raise ValueError("need at least one client: threads + tasks > 0")
    schema = schema if schema is not None else RegisterSchema()
    seed = seed if seed is not None else secrets.randbelow(2**31)
    options: dict[str, Any] = {**DEFAULT_ROUTER_OPTIONS, "secret": secrets.token_hex(16)}
    options.update(router_options or {})
    options["causal_scope"] = causal_scope
    interval = float(options.get("lag_check_interval", 1.0))
    router_max_lag = float(options.get("max_lag", 5.0))

    _create_schema(topology, schema)
    servers = _identities(topology)
    history = History()
    shared = SharedKeys()
    specs = _client_specs(threads + tasks, levels, bounded_lag)
    sync_specs = [ClientSpec(f"t{i}", s.level, s.max_lag) for i, s in enumerate(specs[:threads])]
    async_specs = [ClientSpec(f"a{i}", s.level, s.max_lag) for i, s in enumerate(specs[threads:])]

    sync_router = ReplicaRouter(topology.primary_url, topology.replica_urls, **options)
    loop: asyncio.AbstractEventLoop | None = None
    loop_thread: threading.Thread | None = None
    async_router: ReplicaRouter[AsyncEngine] | None = None
    recorders: list[ServerRecorder] = []
    pools: list[PoolHolder] = []
    try:
        sync_router.start()
        recorders.append(ServerRecorder(_targets(sync_router)))
        pools += [SyncPoolHolder(f"sync:{n}", e) for n, e in _targets(sync_router)]
        if async_specs:
            loop = asyncio.new_event_loop()
            loop_thread = threading.Thread(target=loop.run_forever, name="check-loop", daemon=True)
            loop_thread.start()
            async_router = ReplicaRouter["AsyncEngine"](
                topology.async_primary_url, topology.async_replica_urls, **options
            )
            asyncio.run_coroutine_threadsafe(async_router.astart(), loop).result(timeout=60)
            recorders.append(ServerRecorder(_targets(async_router)))
            for target in (async_router.primary_target, *async_router.replica_targets):
                engine = target.engine
                assert not isinstance(engine, sa.Engine)
                pools.append(AsyncPoolHolder(f"async:{target.name}", engine, loop))

        nemesis = Nemesis(
            topology,
            history,
            faults=faults,
            pools=pools,
            duration=fault_duration,
            gap=fault_gap,
            seed=seed,
        )
        sync_clients = [
            make_client(
                s,
                seed=seed + i,
                causal_domain="sync",
                scope_kind=causal_scope,
                schema=schema,
                history=history,
                shared=shared,
                mix=mix,
            )
            for i, s in enumerate(sync_specs)
        ]
        async_clients = [
            make_client(
                s,
                seed=seed + 1000 + i,
                causal_domain="async",
                scope_kind=causal_scope,
                schema=schema,
                history=history,
                shared=shared,
                mix=mix,
            )
            for i, s in enumerate(async_specs)
        ]
        started = time.monotonic()
        deadline = started + duration
        nemesis.start()
        make = sync_router.sessionmaker()
        workers = [
            threading.Thread(
                target=run_sync_client, args=(c, make, deadline), name=c.spec.name, daemon=True
            )
            for c in sync_clients
        ]
        for worker in workers:
            worker.start()
        gathered = None
        if loop is not None and async_router is not None:
            amake = async_router.async_sessionmaker()

            async def run_tasks() -> None:
                await asyncio.gather(*(run_async_client(c, amake, deadline) for c in async_clients))

            gathered = asyncio.run_coroutine_threadsafe(run_tasks(), loop)
        # The workload runs for its duration (a schedule, not a condition).
        threading.Event().wait(duration)
        phases: dict[str, float] = {}
        mark = time.monotonic()
        nemesis.stop()
        phases["heal"], mark = time.monotonic() - mark, time.monotonic()
        # In-flight operations end soon after healing; a client still running
        # after that is stuck, which the report shows as a failure.
        hung = []
        for worker in workers:
            worker.join(timeout=max(60.0, duration))
            if worker.is_alive():
                hung.append(worker.name)
        if gathered is not None:
            try:
                gathered.result(timeout=max(60.0, duration))
            except concurrent.futures.TimeoutError:
                hung += [c.spec.name for c in async_clients]
        elapsed = time.monotonic() - started
        phases["clients"], mark = time.monotonic() - mark, time.monotonic()
        topology.wait_for_catchup(catchup_timeout)
        phases["catchup"], mark = time.monotonic() - mark, time.monotonic()
        final = _final_state(topology, schema, servers)
        phases["final"] = time.monotonic() - mark
    finally:
        for recorder in recorders:
            recorder.remove()
        sync_router.dispose()
        if loop is not None and loop_thread is not None:
            if async_router is not None:
                asyncio.run_coroutine_threadsafe(async_router.adispose(), loop).result(timeout=60)
            loop.call_soon_threadsafe(loop.stop)
            loop_thread.join(timeout=60)
            loop.close()

    ops = history.sorted_ops()
    violations = check(
        ops, final, faults=history.faults, router_max_lag=router_max_lag, slack=slack + interval
    )
    levels_used = Counter(s.level for s in specs)
    result = CheckResult(
        violations=violations,
        ops=ops,
        faults=list(history.faults),
        final=final,
        nemesis_errors=list(nemesis.errors),
        hung_clients=hung,
        token_errors={
            c.spec.name: c.token_errors for c in (*sync_clients, *async_clients) if c.token_errors
        },
        duration=elapsed,
        phases=phases,
        description=(
            f"{topology.server_version()} with {topology.replica_count} replicas, "
            f"{threads} threads + {tasks} tasks ("
            + ", ".join(f"{lv} {levels_used[lv]}" for lv in LEVELS if levels_used[lv])
            + f"), causal scope {causal_scope}, seed {seed}"
        ),
    )
    if output is not None:
        output(result.report())
    return result


def _client_specs(
    count: int, levels: Sequence[ConsistencyLevel], bounded_lag: float
) -> list[ClientSpec]:
    if not levels:
        raise ValueError("levels must not be empty")
    return [
        ClientSpec(
            f"c{i}",
            levels[i % len(levels)],
            bounded_lag if levels[i % len(levels)] == "bounded" else None,
        )
        for i in range(count)
    ]


def _targets(router: ReplicaRouter[Any]) -> list[tuple[str, sa.Engine]]:
    return [(t.name, t.sync_engine) for t in (router.primary_target, *router.replica_targets)]


def _create_schema(topology: Topology, schema: Schema) -> None:
    engine = sa.create_engine(topology.primary_url)
    try:
        with engine.begin() as connection:
            schema.create(connection)
    finally:
        engine.dispose()
    topology.wait_for_catchup()


def _server_urls(topology: Topology) -> list[tuple[str, URL]]:
    names = [f"replica{i}" for i in range(1, topology.replica_count + 1)]
    return [("primary", topology.primary_url), *zip(names, topology.replica_urls, strict=True)]


def _identities(topology: Topology) -> dict[str, str | None]:
    """Each server's identity, asked directly (not through a router)."""
    identities: dict[str, str | None] = {}
    for name, url in _server_urls(topology):
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as connection:
                raw = connection.connection.dbapi_connection
                identities[name] = server_identity(raw, engine.dialect.name)
        finally:
            engine.dispose()
    return identities


def _final_state(
    topology: Topology,
    schema: Schema,
    servers: Mapping[str, str | None],
) -> FinalState:
    """Every server's contents, read directly."""
    contents: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
    for name, url in _server_urls(topology):
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as connection:
                contents[name] = schema.dump(connection)
        finally:
            engine.dispose()
    primary, primary_counters = contents.pop("primary")
    return FinalState(
        primary=primary,
        primary_counters=primary_counters,
        replicas={name: rows for name, (rows, _) in contents.items()},
        replica_counters={name: counters for name, (_, counters) in contents.items()},
        servers=dict(servers),
        initial_counters=dict.fromkeys(schema.counters, 0),
    )
