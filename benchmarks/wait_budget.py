"""Waits under flapping and lagging replicas, for one or more checkouts side by side.

Two scenarios against one real topology (two replicas), each run by every
checkout given with ``--code`` (default: this one) in turn, in a worker
process of its own whose ``PYTHONPATH`` is that checkout: so this branch and
``main`` (e.g. ``git archive main | tar -x -C /tmp/main``) are measured on the
same servers in one run.

- **flapping**: one of the two replicas has its replay paused, the other
  resumed, swapping every third request (the pattern of issue #13). A request
  commits the user's row and reads it back in a new session (read_your_writes,
  the router scope). Reported: the share of those reads a replica served,
  stale reads (must be 0), read p50 and the slowest read (target: under
  ``wait_timeout``).
- **lag > budget**: both replicas apply every commit ``--delay`` seconds late
  (default 1.5 s, three times ``wait_timeout``), and the lag monitor has
  measured it over twice the budget (what rules waits out). The same
  write-then-read requests; reported: read p50, mean and p99, against the p50
  of the same read sent to the primary (``consistency="strong"``, in a new
  session too) in the same requests.
- **late, paced**: the same delay, but the requests start while the
  monitor measures both replicas caught up (idle before), and come
  ``--delay`` + 0.5 s apart, so each commit is applied before the next
  request (a user's requests, not a load test): what a timed-out wait
  teaches the router. A quarter of ``--requests``; reported as above, with
  the number of waits that timed out (each spent the whole budget).

    python benchmarks/wait_budget.py [--backend postgresql|mariadb] [--code DIR ...]
        [--requests N] [--delay SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

WAIT = 0.5
SCENARIOS = ("flapping", "lag", "late")


# -- the worker: runs one checkout's router; asks the driver to inject faults ---


def _ask(command: str) -> None:
    """Ask the driver (over stdout/stdin) to run ``command`` on the topology."""
    print(f"FAULT {command}", flush=True)
    if sys.stdin.readline().strip() != "ok":
        raise SystemExit("the driver did not acknowledge " + command)


def worker(
    scenario: str, primary: str, replicas: list[str], requests: int, pace: float = 0.0
) -> dict[str, Any]:
    import sqlalchemy_replicas as sr  # the checkout under test (PYTHONPATH)

    metadata = sa.MetaData()
    table = sa.Table(
        "wait_budget_row",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("value", sa.Integer, nullable=False),
    )
    router = sr.ReplicaRouter(
        primary, replicas, wait_timeout=WAIT, engine_options={"pool_pre_ping": True}
    )
    metadata.drop_all(router.primary)
    metadata.create_all(router.primary)
    router.start()
    make = router.sessionmaker()

    def request(row: int, value: int) -> tuple[bool, float, str, float, int]:
        """Commit, then read back: stale?, read seconds, target, primary read
        seconds, waits that timed out."""
        with make() as writer:
            writer.execute(sa.delete(table).where(table.c.id == row))
            writer.execute(sa.insert(table).values(id=row, value=value))
            writer.commit()
        read = sa.select(table.c.value).where(table.c.id == row)
        with make() as reader, sr.explain() as log:
            started = time.perf_counter()
            seen = reader.scalar(read)
            took = time.perf_counter() - started
        with make() as reader:  # the same read, straight to the primary
            started = time.perf_counter()
            reader.scalar(read.execution_options(consistency="strong"))
            on_primary = time.perf_counter() - started
        timed_out = sum(wait.outcome == "timed_out" for wait in log[0].waits)
        return seen != value, took, log[0].target, on_primary, timed_out

    try:
        results = []
        if scenario == "flapping":
            for n in range(requests):
                if n % 3 == 0:
                    _ask(f"flap {(n // 3) % 2}")
                results.append(request(n % 8, n))
        elif scenario == "late":
            # The table's creation applies late too: wait for it, idle, so
            # the monitor measures both replicas caught up.
            from sqlalchemy_replicas.testing import wait_until

            wait_until(
                lambda: all(
                    s.lag_seconds is not None and s.lag_seconds < 0.2 for s in router.status()
                ),
                timeout=60,
                what="both replicas measured caught up",
            )
            for n in range(requests):
                if n:
                    time.sleep(pace)  # the workload's shape: requests apart
                results.append(request(n % 8, n))
        else:
            counter = iter(range(1, 1_000_000))
            deadline = time.monotonic() + 60
            while not all(
                s.lag_seconds is not None and s.lag_seconds > 2 * WAIT for s in router.status()
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the lag monitor never measured the apply delay")
                with router.primary.begin() as conn:  # keeps the lag measurable
                    conn.execute(sa.insert(table).values(id=1000 + next(counter), value=0))
                time.sleep(0.05)  # paces the warm-up commits, not a condition
            results = [request(n % 8, n) for n in range(requests)]
    finally:
        router.dispose()
    took = sorted(r[1] for r in results)
    return {
        "reads": len(results),
        "stale": sum(r[0] for r in results),
        "replica_share": sum(r[2] != "primary" for r in results) / len(results),
        "p50_ms": statistics.median(took) * 1000,
        "mean_ms": statistics.fmean(took) * 1000,
        "p99_ms": took[min(len(took) - 1, int(len(took) * 0.99))] * 1000,
        "max_ms": took[-1] * 1000,
        "primary_p50_ms": statistics.median(r[3] for r in results) * 1000,
        "timed_out_waits": sum(r[4] for r in results),
    }


# -- the driver: owns the topology, runs a worker per checkout -----------------


def run_worker(
    topology: Any,
    code: Path,
    scenario: str,
    requests: int,
    *,
    urls: tuple[sa.URL, list[sa.URL]] | None = None,
    pace: float = 0.0,
) -> dict[str, Any]:
    """Run ``scenario`` in a worker on ``code``; the faults on ``topology``.

    :param pace: seconds between requests (the ``late`` scenario).

    :param urls: the primary's and replicas' URLs for the worker (default:
        the topology's; ``benchmarks/round_trips.py`` gives proxied ones).
    """
    here = Path(__file__).resolve()
    primary, replicas = urls or (topology.primary_url, list(topology.replica_urls))
    env = {**os.environ, "PYTHONPATH": str(code)}
    args = [
        sys.executable,
        str(here),
        "--worker",
        scenario,
        "--requests",
        str(requests),
        "--pace",
        str(pace),
        "--primary",
        primary.render_as_string(hide_password=False),
        *(
            arg
            for url in replicas
            for arg in ("--replica", url.render_as_string(hide_password=False))
        ),
    ]
    process = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=code
    )
    assert process.stdin is not None
    assert process.stdout is not None
    result: dict[str, Any] | None = None
    for line in process.stdout:
        if line.startswith("FAULT flap "):
            paused = int(line.split()[-1])
            topology.resume_replay(1 - paused)
            topology.pause_replay(paused)
            process.stdin.write("ok\n")
            process.stdin.flush()
        elif line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    if process.wait() != 0 or result is None:
        raise SystemExit(f"the {scenario} worker for {code} failed")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("postgresql", "mariadb"), default="postgresql")
    parser.add_argument("--code", type=Path, action="append", help="a checkout (repeatable)")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--delay", type=float, default=1.5, help="lag > budget: apply delay")
    parser.add_argument("--worker", choices=SCENARIOS)
    parser.add_argument("--pace", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--primary")
    parser.add_argument("--replica", action="append")
    args = parser.parse_args(argv)
    if args.worker:
        result = worker(args.worker, args.primary, args.replica, args.requests, args.pace)
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    from sqlalchemy_replicas.testing import MariaDBTopology, PostgresTopology

    codes = args.code or [Path(__file__).resolve().parent.parent]
    topology = (
        PostgresTopology(replicas=2)
        if args.backend == "postgresql"
        else MariaDBTopology(replicas=2)
    )
    with topology:
        print(f"{topology.server_version()}, wait_timeout {WAIT}s, {args.requests} requests")
        for scenario in SCENARIOS:
            for code in codes:
                topology.reset()
                if scenario in ("lag", "late"):
                    topology.set_apply_delay(0, args.delay)
                    topology.set_apply_delay(1, args.delay)
                if scenario == "late":
                    r = run_worker(
                        topology, code, scenario, args.requests // 4, pace=args.delay + 0.5
                    )
                else:
                    r = run_worker(topology, code, scenario, args.requests)
                print(
                    f"  {scenario:8} {code!s:40} on replicas {r['replica_share']:6.1%}  "
                    f"stale {r['stale']}  read p50 {r['p50_ms']:7.2f} ms  "
                    f"mean {r['mean_ms']:7.2f} ms  "
                    f"p99 {r['p99_ms']:7.2f} ms  max {r['max_ms']:7.2f} ms  "
                    f"(primary read p50 {r['primary_p50_ms']:.2f} ms)  "
                    f"timed-out waits {r['timed_out_waits']}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
