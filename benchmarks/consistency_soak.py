"""Consistency soak: a long ``run_check`` under faults, as a benchmark.

Starts a fresh local topology (PostgreSQL streaming or MariaDB GTID, two
replicas), runs half the clients as threads and half as asyncio tasks, at
every consistency level in turn, while the nemesis pauses replay, adds apply
delays, kills, freezes and restarts replicas, restarts the primary and
exhausts pools; then prints the report: operations by kind and outcome,
faults injected, share of reads served by replicas, errors raised to
clients, violations. Exits 1 when a violation is found (or a client hung).

    python benchmarks/consistency_soak.py --backend postgresql --duration 150 --clients 8
"""

from __future__ import annotations

import argparse
import sys
import time

from sqlalchemy_replicas.testing import MariaDBTopology, PostgresTopology, Topology, run_check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("postgresql", "mariadb"), default="postgresql")
    parser.add_argument("--duration", type=float, default=150.0, help="seconds of workload")
    parser.add_argument("--clients", type=int, default=8, help="half threads, half tasks")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    topology: Topology = (
        PostgresTopology(replicas=2)
        if args.backend == "postgresql"
        else MariaDBTopology(replicas=2)
    )
    started = time.monotonic()
    with topology:
        result = run_check(
            topology,
            duration=args.duration,
            threads=(args.clients + 1) // 2,
            tasks=args.clients // 2,
            seed=args.seed,
        )
    ops = len(result.ops)
    print(
        f"{args.backend}: {ops} operations ({ops / result.duration:.0f}/s), "
        f"{len(result.faults)} faults, "
        f"{result.replica_read_share():.1%} of reads on replicas "
        f"({result.replica_read_share(include_strong=False):.1%} of non-strong), "
        f"{len(result.violations)} violations; {time.monotonic() - started:.0f} s in all"
    )
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
