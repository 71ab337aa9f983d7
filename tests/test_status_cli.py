"""``sqlalchemy-replicas status``: the pure report (table, JSON, exit status)
exhaustively, then the command in a subprocess against real topologies."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from sqlalchemy_replicas import cli
from sqlalchemy_replicas.monitor import ReplicaStatus
from sqlalchemy_replicas.status_report import (
    COLUMNS,
    PrimaryState,
    ReplicaState,
    StatusSnapshot,
    as_json,
    config_error_json,
    exit_code,
    render_json,
    render_table,
    replica_health,
    scrub,
    summary,
)
from sqlalchemy_replicas.testing import Topology, wait_until

ROOT = Path(__file__).resolve().parent.parent
WHEN = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
PRIMARY = PrimaryState("postgresql+psycopg://app:***@db1/app", True, "primary", False, "0/3000148")

TOP_KEYS = {
    "version",
    "status",
    "exit_code",
    "summary",
    "checked_at",
    "backend",
    "max_lag",
    "primary",
    "replicas",
}
PRIMARY_KEYS = {"name", "url", "reachable", "role", "read_only", "healthy", "position", "reason"}
REPLICA_KEYS = {
    "name",
    "url",
    "reachable",
    "role",
    "read_only",
    "health",
    "healthy",
    "lag_seconds",
    "lag_bytes",
    "lag_transactions",
    "position",
    "reason",
    "pool_full_skips",
    "zone",
}


def replica(
    name: str = "replica1",
    *,
    healthy: bool | None = True,
    lag: float | None = 0.0,
    reason: str | None = None,
    reachable: bool = True,
    role: str | None = "replica",
    error: str | None = None,
    lag_bytes: int | None = 0,
) -> ReplicaState:
    status = ReplicaStatus(
        name,
        f"postgresql+psycopg://app:***@{name}/app",
        healthy,
        lag,
        "0/3000148" if lag is not None else None,
        reason,
        lag_bytes=lag_bytes,
    )
    return ReplicaState(status, reachable, role, None if role is None else True, error)  # type: ignore[arg-type]


def snapshot(*replicas: ReplicaState, primary: PrimaryState = PRIMARY) -> StatusSnapshot:
    return StatusSnapshot(primary, tuple(replicas), 1.0, WHEN, "postgresql")


LAGGING = replica("replica1", healthy=False, lag=2.5, reason="lag 2.5s > max_lag 1.0s")
DOWN = replica(
    "replica2",
    healthy=False,
    lag=None,
    reason="unreachable: OperationalError: refused",
    reachable=False,
    role=None,
    error="OperationalError: refused",
)


# -- the pure report ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "health"),
    [
        (replica(), "healthy"),
        (replica(lag=0.4), "healthy"),
        # the monitor has not yet judged a fresh lag over max_lag
        (replica(lag=1.5), "lagging"),
        (LAGGING, "lagging"),
        # back under max_lag, not yet under 0.8 * max_lag: still no reads
        (
            replica(healthy=False, lag=0.9, reason="lag 0.9s, not yet under 0.8 * max_lag"),
            "lagging",
        ),
        (DOWN, "down"),
        # the monitor saw it down (no lag), though it answers the command now
        (replica(healthy=False, lag=None, reason="not a replica of this primary: x"), "down"),
        (replica(healthy=False, lag=None, reason="not replicating (no applied position)"), "down"),
        # the command's own query failed while the monitor still trusts it
        (replica(reachable=False, role=None, error="TimeoutError: no answer"), "down"),
        # a promoted replica says it is a primary
        (replica(role="primary"), "down"),
        (replica(healthy=None, lag=None, reason="no replication positions"), "unknown"),
    ],
)
def test_replica_health(state: ReplicaState, health: str) -> None:
    assert replica_health(state, 1.0) == health


@pytest.mark.parametrize(
    ("snap", "code", "word"),
    [
        (snapshot(), 0, "OK"),
        (snapshot(replica(), replica("replica2")), 0, "OK"),
        (snapshot(LAGGING, replica("replica2")), 1, "WARNING"),
        (snapshot(replica(), DOWN), 2, "CRITICAL"),
        (snapshot(LAGGING, DOWN), 2, "CRITICAL"),
        (snapshot(replica(healthy=None, lag=None)), 2, "CRITICAL"),
        (snapshot(replica(), primary=PrimaryState("u", False, error="refused")), 2, "CRITICAL"),
        (
            snapshot(replica(), primary=PrimaryState("u", True, "replica", True, "0/1")),
            2,
            "CRITICAL",
        ),
    ],
)
def test_exit_code_and_summary(snap: StatusSnapshot, code: int, word: str) -> None:
    assert exit_code(snap) == code
    assert summary(snap).startswith(f"{word}: ")
    document = as_json(snap)
    assert document["exit_code"] == code
    assert document["status"] == {0: "ok", 1: "lagging", 2: "down"}[code]


def test_summary_names_each_problem() -> None:
    assert summary(snapshot(replica(), replica("replica2"))) == (
        "OK: primary and 2 replicas healthy"
    )
    assert summary(snapshot(LAGGING, DOWN)) == (
        "CRITICAL: replica1 lagging (lag 2.5s > max_lag 1.0s); "
        "replica2 down (unreachable: OperationalError: refused)"
    )
    down = PrimaryState("u", False, error="OperationalError: refused")
    assert summary(snapshot(primary=down)) == (
        "CRITICAL: primary unreachable: OperationalError: refused"
    )
    assert "read-only" in summary(snapshot(primary=PrimaryState("u", True, "replica", True)))


def test_table_is_aligned_and_shows_every_server() -> None:
    text = render_table(snapshot(replica(lag=0.25, lag_bytes=120), LAGGING, DOWN))
    first, header, *rows = text.splitlines()
    assert first.startswith("CRITICAL: ")
    assert header.split() == list(COLUMNS)
    starts = [header.index(column) for column in COLUMNS]
    assert [row.split()[0] for row in rows] == ["primary", "replica1", "replica1", "replica2"]
    for row in rows:
        # each column's value starts where its heading does
        for start in starts[1:-1]:
            assert row[start - 2 : start] == "  "
            assert row[start] != " "
        # REASON, when there is one, starts under its heading too (rows are rstripped)
        assert len(row) < starts[-1] or row[starts[-1] - 2 : starts[-1] + 1].startswith("  ")
    primary, healthy, lagging, down = rows
    assert primary.split()[:3] == ["primary", "primary", "healthy"]
    assert healthy.split()[1:6] == ["replica", "healthy", "0.2s", "120", "B"]
    assert "lag 2.5s > max_lag 1.0s" in lagging
    assert lagging.split()[2] == "lagging"
    assert down.split()[1:4] == ["-", "down", "-"]
    assert "unreachable: OperationalError: refused" in down


def test_table_shows_transactions_for_mariadb_and_one_line_per_server() -> None:
    status = ReplicaStatus("r", "mariadb://r", False, 3.0, "0-1-5", "lag\n3.0s", None, 4)
    text = render_table(snapshot(ReplicaState(status, True, "replica", True)))
    assert len(text.splitlines()) == 4
    assert " 4 tx " in text
    assert "lag 3.0s" in text


def test_json_has_the_documented_schema() -> None:
    document = json.loads(render_json(snapshot(replica(), LAGGING, DOWN)))
    assert set(document) == TOP_KEYS
    assert document["version"] == 1
    assert document["checked_at"] == "2025-01-02T03:04:05+00:00"
    assert (document["backend"], document["max_lag"]) == ("postgresql", 1.0)
    assert set(document["primary"]) == PRIMARY_KEYS
    assert document["primary"]["healthy"] is True
    assert document["primary"]["reason"] is None
    assert [set(r) for r in document["replicas"]] == [REPLICA_KEYS] * 3
    healthy, lagging, down = document["replicas"]
    assert (healthy["health"], healthy["healthy"], healthy["reason"]) == ("healthy", True, None)
    assert (lagging["health"], lagging["lag_seconds"]) == ("lagging", 2.5)
    assert (down["health"], down["reachable"], down["role"]) == ("down", False, None)


def test_json_shows_each_replicas_zone() -> None:
    """Each replica's zone (the router's replica_zones) is in its JSON object,
    null for a replica given none."""
    zoned = dataclasses.replace(replica().status, zone="eu-west-1a")
    document = json.loads(render_json(snapshot(ReplicaState(zoned, True, "replica", True), DOWN)))
    assert [r["zone"] for r in document["replicas"]] == ["eu-west-1a", None]


def test_config_error_json() -> None:
    document = json.loads(config_error_json("no primary"))
    assert document == {
        "version": 1,
        "status": "config_error",
        "exit_code": 3,
        "summary": "UNKNOWN: no primary",
        "error": "no primary",
    }


@pytest.mark.parametrize(
    ("text", "secrets", "expected"),
    [
        ("postgresql://u:s3cret@h/db", (), "postgresql://u:***@h/db"),
        (
            "at mariadb+pymysql://app:p@ss:w0rd@h:3306/x",
            (),
            "at mariadb+pymysql://app:***@h:3306/x",
        ),
        ("host=h password=s3cret user=u", (), "host=h password=*** user=u"),
        ("PWD='a b c';", (), "PWD=***;"),
        ("failed for hunter22", ("hunter22",), "failed for ***"),
        # a short secret is left to the patterns: "app" is also the user and database
        ("user app on app", ("app",), "user app on app"),
        ("no secret here", ("", "hunter22"), "no secret here"),
    ],
)
def test_scrub(text: str, secrets: tuple[str, ...], expected: str) -> None:
    assert scrub(text, secrets) == expected


def test_usage_and_configuration_errors_exit_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("DATABASE_URL", "SQLALCHEMY_DATABASE_URI", "DATABASE_REPLICA_URLS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.main(["status", "--bogus"])
    assert exited.value.code == 3
    assert cli.main(["status", "--json"]) == 3
    out, err = capsys.readouterr()
    assert json.loads(out)["status"] == "config_error"
    assert "DATABASE_URL" in err
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://u:topsecret@h/db")
    monkeypatch.setenv("SQLALCHEMY_REPLICAS_MAX_LAG", "soon")
    assert cli.main(["status"]) == 3
    out, err = capsys.readouterr()
    assert "SQLALCHEMY_REPLICAS_MAX_LAG" in err
    assert "topsecret" not in out + err


# -- the command against real servers ------------------------------------------------

PG_PASSWORD = "pg-secret-in-url"  # trust authentication ignores it


def cli_env(topology: Topology, **extra: str) -> dict[str, str]:
    primary, replicas = topology.primary_url, topology.replica_urls
    if topology.backend != "mariadb":
        primary = primary.set(password=PG_PASSWORD)
        replicas = tuple(url.set(password=PG_PASSWORD) for url in replicas)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_", "SQLALCHEMY_REPLICAS_"))
    }
    env.update(
        PYTHONPATH=str(ROOT),
        DATABASE_URL=primary.render_as_string(hide_password=False),
        DATABASE_REPLICA_URLS=",".join(u.render_as_string(hide_password=False) for u in replicas),
        SQLALCHEMY_REPLICAS_LAG_CHECK_INTERVAL="0.2",
        **extra,
    )
    return env


def run_status(
    env: dict[str, str], *args: str, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sqlalchemy_replicas", "status", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=cwd,
    )


def assert_no_password(result: subprocess.CompletedProcess[str], topology: Topology) -> None:
    output = result.stdout + result.stderr
    assert PG_PASSWORD not in output
    assert "app:app@" not in output  # MariaDB's app user, whose password is "app"
    assert ":***@" in result.stdout or topology.backend == "mariadb"


def rows(table: str) -> dict[str, list[str]]:
    """The table's rows by server name (after the summary line and the header)."""
    return {line.split()[0]: line.split() for line in table.splitlines()[2:]}


def test_all_healthy_exits_0_and_lists_both_replicas(topology: Topology) -> None:
    env = cli_env(topology)
    result = run_status(env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK: primary and 2 replicas healthy")
    table = rows(result.stdout)
    assert table["primary"][1:3] == ["primary", "healthy"]
    assert table["replica1"][1:3] == ["replica", "healthy"]
    assert table["replica2"][1:3] == ["replica", "healthy"]
    assert_no_password(result, topology)

    result = run_status(env, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert set(document) == TOP_KEYS
    assert document["backend"] == ("mariadb" if topology.backend == "mariadb" else "postgresql")
    assert set(document["primary"]) == PRIMARY_KEYS
    assert document["primary"]["role"] == "primary"
    assert document["primary"]["position"]
    assert [r["name"] for r in document["replicas"]] == ["replica1", "replica2"]
    for entry in document["replicas"]:
        assert set(entry) == REPLICA_KEYS
        assert (entry["role"], entry["health"], entry["reachable"]) == ("replica", "healthy", True)
        assert entry["lag_seconds"] is not None
        assert entry["position"]
        unit = "lag_transactions" if topology.backend == "mariadb" else "lag_bytes"
        assert entry[unit] is not None
    assert_no_password(result, topology)


def test_paused_replica_over_max_lag_exits_1(topology: Topology) -> None:
    env = cli_env(topology, SQLALCHEMY_REPLICAS_MAX_LAG="1")
    topology.pause_replay(0)
    engine = sa.create_engine(topology.primary_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE status_tick (id INTEGER PRIMARY KEY)"))
            conn.execute(sa.text("INSERT INTO status_tick (id) VALUES (1)"))
    finally:
        engine.dispose()
    results: list[subprocess.CompletedProcess[str]] = []

    def lagging() -> bool:
        results.append(run_status(env))
        return results[-1].returncode == 1

    wait_until(lagging, timeout=90, what="status to exit 1 for the paused replica")
    result = results[-1]
    assert result.stdout.startswith("WARNING: replica1 lagging"), result.stdout
    table = rows(result.stdout)
    assert table["replica1"][1:3] == ["replica", "lagging"]
    assert "max_lag" in " ".join(table["replica1"])
    assert table["replica2"][1:3] == ["replica", "healthy"]
    assert_no_password(result, topology)


def test_stopped_replica_exits_2_with_the_reason(topology: Topology) -> None:
    topology.stop_replica(1)
    result = run_status(cli_env(topology))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.startswith("CRITICAL: replica2 down"), result.stdout
    table = rows(result.stdout)
    assert table["replica1"][1:3] == ["replica", "healthy"]
    assert table["replica2"][1:3] == ["-", "down"]
    assert "unreachable" in " ".join(table["replica2"])
    assert_no_password(result, topology)

    result = run_status(cli_env(topology), "--json")
    assert result.returncode == 2
    document = json.loads(result.stdout)
    down = document["replicas"][1]
    assert (down["name"], down["health"], down["reachable"]) == ("replica2", "down", False)
    assert down["reason"].startswith("unreachable")
    assert_no_password(result, topology)


def test_the_primary_row_follows_primary_candidates(topology: Topology) -> None:
    """After a failover the configured DATABASE_URL is a read-only node (here
    replica2, standing for the demoted old primary) and the primary is one of
    SQLALCHEMY_REPLICAS_PRIMARY_CANDIDATES: the command asks and shows the
    server primary connections go to now, as the router does, and is OK."""
    env = cli_env(topology)
    primary, replicas = topology.primary_url, topology.replica_urls
    if topology.backend != "mariadb":
        primary = primary.set(password=PG_PASSWORD)
        replicas = tuple(url.set(password=PG_PASSWORD) for url in replicas)
    env.update(
        DATABASE_URL=replicas[1].render_as_string(hide_password=False),
        DATABASE_REPLICA_URLS=replicas[0].render_as_string(hide_password=False),
        SQLALCHEMY_REPLICAS_PRIMARY_CANDIDATES=primary.render_as_string(hide_password=False),
    )
    result = run_status(env, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    shown = document["primary"]
    assert (shown["role"], shown["healthy"]) == ("primary", True), shown
    assert shown["url"] == primary.render_as_string(hide_password=True)
    assert document["replicas"][0]["health"] == "healthy", document["replicas"]
    assert_no_password(result, topology)


PROBE_APP = """
import os

import sqlalchemy as sa

import sqlalchemy_replicas as sr

HOW = os.environ["PROBE_HOW"]
REAL = [sa.make_url(u) for u in os.environ["PROBE_REAL_URLS"].split(",")]


def engine(index):
    # A port where nothing listens: only the application's connect path
    # (connect_args, creator or do_connect) reaches the real server.
    real = REAL[index]
    written = real.set(port=index + 1)
    if HOW == "connect_args":
        return sa.create_engine(written, connect_args={"port": real.port})
    if HOW == "creator":
        plain = sa.create_engine(real)
        cargs, cparams = plain.dialect.create_connect_args(plain.url)
        dbapi = plain.dialect.loaded_dbapi
        return sa.create_engine(written, creator=lambda: dbapi.connect(*cargs, **cparams))
    made = sa.create_engine(written)

    @sa.event.listens_for(made, "do_connect")
    def real_port(dialect, record, cargs, cparams):
        cparams["port"] = real.port

    return made


router = sr.ReplicaRouter(
    engine(0), [engine(1), engine(2)], max_lag=5.0, lag_check_interval=0.2
)
"""


@pytest.mark.parametrize("how", ["connect_args", "creator", "do_connect"])
def test_router_option_probes_connect_as_the_router_does(
    topology: Topology, tmp_path: Path, how: str
) -> None:
    """``--router app:router``: the application's engines reach the servers
    only through their own connect_args, creator or do_connect listener (the
    URLs name ports where nothing listens); the command's direct queries go
    the same way, so every server answers its role and the exit status is 0
    (a probe built from the URL alone finds nothing: the primary unreachable)."""
    (tmp_path / "probe_app.py").write_text(PROBE_APP)
    urls = [topology.primary_url, *topology.replica_urls]
    env = cli_env(
        topology,
        PROBE_HOW=how,
        PROBE_REAL_URLS=",".join(u.render_as_string(hide_password=False) for u in urls),
    )
    for name in ("DATABASE_URL", "DATABASE_REPLICA_URLS", "SQLALCHEMY_REPLICAS_LAG_CHECK_INTERVAL"):
        del env[name]
    result = run_status(env, "--router", "probe_app:router", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert (document["primary"]["role"], document["primary"]["reachable"]) == ("primary", True)
    assert [(r["role"], r["health"]) for r in document["replicas"]] == [
        ("replica", "healthy"),
        ("replica", "healthy"),
    ], document["replicas"]


def test_router_option_errors_exit_3(tmp_path: Path) -> None:
    """A --router that names nothing importable, not a router, a module that
    raises on import, or that comes with --primary, is a configuration error:
    exit 3 with the reason (no traceback)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATABASE_")}
    env["PYTHONPATH"] = str(ROOT)
    (tmp_path / "not_a_router.py").write_text("router = 42\n")
    (tmp_path / "broken_app.py").write_text("raise RuntimeError('boom at import')\n")
    cases = {
        ("--router", "no_such_module_here:router"): "no_such_module_here",
        ("--router", "not_a_router:router"): "not a ReplicaRouter",
        ("--router", "not_a_router"): "MODULE:ATTRIBUTE",
        ("--router", "broken_app:router"): "RuntimeError: boom at import",
        ("--router", "x:y", "--primary", "postgresql://h/db"): "exclude each other",
    }
    for args, reason in cases.items():
        result = run_status(env, *args, cwd=tmp_path)
        assert result.returncode == 3, (args, result.stdout + result.stderr)
        assert reason in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
