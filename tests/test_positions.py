"""Replication positions: pure comparisons, and capture / applied / wait on real servers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.positions import (
    MariaDBPositions,
    MySQLPositions,
    PostgresPositions,
    backend_for,
)
from sqlalchemy_replicas.positions.postgresql import format_lsn, normalize_insert_lsn, parse_lsn
from sqlalchemy_replicas.testing import StatementLog, Topology

PG = PostgresPositions()
MARIADB = MariaDBPositions()
MYSQL = MySQLPositions()
UUID_A = "3e11fa47-71ca-11e1-9e33-c80aa9429562"
UUID_B = "4e11fa47-71ca-11e1-9e33-c80aa9429563"


def test_lsns_compare_as_integers_not_strings() -> None:
    """'16/B374D848' parses to an integer; 'A/0' is after '9/FFFFFFFF'."""
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    assert PG.reached(PG.parse("A/0"), PG.parse("9/FFFFFFFF"))
    assert not PG.reached(PG.parse("9/FFFFFFFF"), PG.parse("A/0"))
    assert PG.merge(PG.parse("1/0"), PG.parse("0/FF")) == PG.parse("1/0")
    for bad in ("", "16", "16/", "G/0", "1/2/3", "123456789/0"):
        with pytest.raises(ValueError, match="not a PostgreSQL LSN"):
            PG.parse(bad)


def test_position_parsers_refuse_non_ascii_digits_and_out_of_range_values() -> None:
    """Token positions are untrusted: digits from other scripts and values beyond a
    server's ranges (MariaDB 32-bit ids and 64-bit sequence numbers, MySQL
    transaction numbers up to 2**63 - 1) raise ValueError, never reach a server."""
    assert MARIADB.parse("4294967295-4294967295-18446744073709551615") == {2**32 - 1: 2**64 - 1}
    for bad in ("4294967296-0-1", "0-4294967296-1", "0-0-18446744073709551616", "\u0663-0-1"):
        with pytest.raises(ValueError, match="MariaDB GTID"):
            MARIADB.parse(bad)
    assert MYSQL.parse(f"{UUID_A}:1-{2**63 - 1}") == {UUID_A: ((1, 2**63 - 1),)}
    for bad in (f"{UUID_A}:1-{2**63}", f"{UUID_A}:\u0661"):
        with pytest.raises(ValueError, match="not a GTID interval"):
            MYSQL.parse(bad)
    for bad in ("0/1\n0/2", "\uff10/1"):
        with pytest.raises(ValueError, match="not a PostgreSQL LSN"):
            PG.parse(bad)


def test_insert_lsn_page_header_quirk_is_undone() -> None:
    """An insert LSN just past a page (or segment) header means the page boundary."""
    block, segment = 8192, 16 * 1024 * 1024
    assert normalize_insert_lsn(5 * block + 24, block, segment) == 5 * block
    assert normalize_insert_lsn(3 * segment + 40, block, segment) == 3 * segment
    assert normalize_insert_lsn(5 * block + 40, block, segment) == 5 * block + 40
    assert normalize_insert_lsn(5 * block + 100, block, segment) == 5 * block + 100


def test_mariadb_positions_compare_per_domain_by_sequence() -> None:
    """Server ids do not order GTIDs; every target domain must be reached."""
    applied = MARIADB.parse("0-1-10,1-2-5")
    assert MARIADB.reached(applied, MARIADB.parse("0-9-10"))
    assert MARIADB.reached(applied, MARIADB.parse("0-1-3,1-1-5"))
    assert not MARIADB.reached(applied, MARIADB.parse("0-1-11"))
    assert not MARIADB.reached(applied, MARIADB.parse("2-1-1"))
    assert MARIADB.reached(applied, MARIADB.parse(""))
    merged = MARIADB.merge(MARIADB.parse("0-1-10"), MARIADB.parse("0-2-12,3-1-1"))
    assert merged == {0: 12, 3: 1}
    assert MARIADB.parse(MARIADB.format(merged)) == merged
    for bad in ("garbage", "0-1", "0-1-x", "-1-1-1"):
        with pytest.raises(ValueError, match="not a MariaDB GTID"):
            MARIADB.parse(bad)


def test_mysql_gtid_sets_compare_by_containment() -> None:
    """MySQL 8 GTID sets: reached means contained; merge is union (unit level only:
    no MySQL 8 server is available to this project's CI)."""
    applied = MYSQL.parse(f"{UUID_A.upper()}:1-100:105-110,\n{UUID_B}:1-3")
    assert MYSQL.reached(applied, MYSQL.parse(f"{UUID_A}:5-7:106"))
    assert not MYSQL.reached(applied, MYSQL.parse(f"{UUID_A}:101"))
    assert not MYSQL.reached(applied, MYSQL.parse(f"{UUID_B}:1-4"))
    merged = MYSQL.merge(MYSQL.parse(f"{UUID_A}:1-5"), MYSQL.parse(f"{UUID_A}:6-8:10"))
    assert MYSQL.format(merged) == f"{UUID_A}:1-8:10"
    assert MYSQL.parse(MYSQL.format(applied)) == applied
    for bad in ("nouuid:1-2", f"{UUID_A}", f"{UUID_A}:5-2", f"{UUID_A}:0"):
        with pytest.raises(ValueError, match="not a"):
            MYSQL.parse(bad)


@pytest.fixture
def engines(topology: Topology) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """The primary and replica 0, AUTOCOMMIT, with a table to write to."""
    primary = sa.create_engine(topology.primary_url)
    replica = sa.create_engine(topology.replica_urls[0], isolation_level="AUTOCOMMIT")
    with primary.begin() as conn:
        conn.execute(sa.text("CREATE TABLE item (id INTEGER PRIMARY KEY)"))
    topology.wait_for_catchup()
    yield primary, replica
    primary.dispose()
    replica.dispose()


def commit_row(primary: sa.Engine, item_id: int) -> object:
    backend = backend_for(primary)
    assert backend is not None
    with primary.connect() as conn:
        conn.execute(sa.text("INSERT INTO item (id) VALUES (:id)"), {"id": item_id})
        conn.commit()
        return backend.capture(conn)


def test_behind_counts_what_is_left_to_apply() -> None:
    """behind(): WAL bytes on PostgreSQL; on MariaDB and MySQL, transactions the
    applied position lacks (per domain / per source, gaps included); 0 when
    nothing is left or the replica is ahead of a stale primary sample."""
    pg, maria, mysql, uuid = PG, MARIADB, MYSQL, UUID_A
    assert pg.behind_unit == "bytes"
    assert pg.behind(pg.parse("0/3000100"), pg.parse("0/3000000")) == 0x100
    assert pg.behind(pg.parse("0/3000000"), pg.parse("0/3000100")) == 0
    assert maria.behind_unit == "transactions"
    assert maria.behind(maria.parse("0-1-10,1-2-5"), maria.parse("0-1-7")) == 3 + 5
    assert maria.behind(maria.parse("0-1-10"), maria.parse("0-1-10,1-2-5")) == 0
    assert mysql.behind_unit == "transactions"
    assert mysql.behind(mysql.parse(f"{uuid}:1-10"), mysql.parse(f"{uuid}:1-3:5-8")) == 3
    assert mysql.behind(mysql.parse(f"{uuid}:1-10"), mysql.parse(f"{uuid}:1-20")) == 0


def test_captured_position_is_applied_exactly_when_the_row_is_visible(
    topology: Topology, engines: tuple[sa.Engine, sa.Engine]
) -> None:
    """A paused replica has not reached a commit's position (and lacks its row); after
    resuming, waiting for the position makes the row visible."""
    primary, replica = engines
    backend = backend_for(primary)
    assert backend is not None
    topology.pause_replay(0)
    position = commit_row(primary, 1)
    with replica.connect() as conn:
        applied = backend.applied(conn)
        assert applied is not None
        assert not backend.reached(applied, position)
        started = time.monotonic()
        assert not backend.wait(conn, position, 0.3)
        assert 0.25 <= time.monotonic() - started < 5
        assert conn.execute(sa.text("SELECT count(*) FROM item")).scalar() == 0
        topology.resume_replay(0)
        assert backend.wait(conn, position, 10)
        assert conn.execute(sa.text("SELECT count(*) FROM item")).scalar() == 1
        applied = backend.applied(conn)
        assert applied is not None
        assert backend.reached(applied, position)


def test_wait_applying_refuses_at_once_on_a_paused_replica(
    topology: Topology, engines: tuple[sa.Engine, sa.Engine]
) -> None:
    """wait_applying(): a paused replica that lacks the position says "stopped" at
    once (not after the timeout), and "reached" for a position it has; applying, it
    reaches a new commit, or times out on a position it will not have in time."""
    primary, replica = engines
    backend = backend_for(primary)
    assert backend is not None
    old = commit_row(primary, 1)
    topology.wait_for_catchup()
    topology.pause_replay(0)
    position = commit_row(primary, 2)
    with replica.connect() as conn:
        started = time.monotonic()
        assert backend.wait_applying(conn, position, 5) == "stopped"
        assert time.monotonic() - started < 0.5
        assert backend.wait_applying(conn, old, 5) == "reached"
        topology.resume_replay(0)
        assert backend.wait_applying(conn, position, 10) == "reached"
        started = time.monotonic()
        ahead = _ahead_of(position)
        assert backend.wait_applying(conn, ahead, 0.3) == "timed_out"
        assert 0.25 <= time.monotonic() - started < 5


def _ahead_of(position: Any) -> Any:
    """A position past ``position`` that no commit has reached yet."""
    if isinstance(position, int):
        return position + 1_000_000
    return {domain: seq + 1000 for domain, seq in position.items()}


def test_positions_grow_with_commits(engines: tuple[sa.Engine, sa.Engine]) -> None:
    """A later commit's position has reached an earlier one's, not the reverse."""
    primary, _ = engines
    backend = backend_for(primary)
    assert backend is not None
    first, second = commit_row(primary, 1), commit_row(primary, 2)
    assert backend.reached(second, first)
    assert not backend.reached(first, second)
    assert backend.parse(backend.format(second)) == second


@pytest.mark.postgresql
def test_wal_that_nothing_flushes_holds_no_read_back(fresh_postgres_topology: Topology) -> None:
    """WAL written outside any commit that flushes it (a non-transactional
    logical message in a transaction that rolled back, as a read that pruned a
    page and ended in ROLLBACK leaves it) stays unflushed, so no standby can
    receive it: a new router's start position and the lag monitor's samples
    are positions the standbys can reach, so its reads go to them and they
    show no lag."""
    topology = fresh_postgres_topology
    engine = sa.create_engine(topology.primary_url)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_logical_emit_message(false, 'sr-test', 'unflushed')"))
            conn.rollback()
            lsns = "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text"
            insert, flush = conn.execute(sa.text(lsns)).one()
            conn.rollback()
    finally:
        engine.dispose()
    assert parse_lsn(insert) > parse_lsn(flush), "the test needs an unflushed tail of WAL"
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls, wait_timeout=0.5)
    try:
        router.start()
        started = time.monotonic()
        with StatementLog(router) as log, router.sessionmaker()() as session:
            for _ in range(4):
                session.execute(sa.text("SELECT 1 AS unflushed_probe"))
        nodes = [s.node for s in log.statements if "unflushed_probe" in s.sql]
        assert len(nodes) == 4
        assert all(node.startswith("replica") for node in nodes), nodes
        assert time.monotonic() - started < 0.5, "the reads waited for WAL no standby has"
        assert [s.healthy for s in router.status()] == [True, True]
    finally:
        router.dispose()


class FakeServer:
    """A SQLRunner for unit tests: a dialect with a server version, and canned
    answers to the statements it is sent (recorded, in order)."""

    def __init__(self, version: tuple[int, ...], answers: list[Any]) -> None:
        self.dialect = type("Dialect", (), {"server_version_info": version})()
        self._answers = answers
        self.sent: list[str] = []

    def exec_driver_sql(self, statement: str, parameters: Any = None, /) -> Any:
        self.sent.append(statement)
        answer = self._answers.pop(0)
        return type("Rows", (), {"one": lambda _: answer, "scalar": lambda _: answer})()


def test_wait_for_lsn_statement_and_its_answers() -> None:
    """PostgreSQL 19's WAIT FOR LSN: the LSN written in, the timeout in whole
    milliseconds rounded up and never 0 (which waits forever), NO_THROW; its
    statuses map to reached / timed_out / stopped (promoted), anything else raises.
    (No PostgreSQL 19 server is available here: unit level only.)"""
    lsn = PG.parse("16/B374D848")
    assert PG.wait_for_statement(lsn, 0.5) == (
        "WAIT FOR LSN '16/B374D848' WITH (TIMEOUT '500ms', NO_THROW)"
    )
    assert "TIMEOUT '2ms'" in PG.wait_for_statement(lsn, 0.0011)
    assert "TIMEOUT '1ms'" in PG.wait_for_statement(lsn, 0.0)
    assert PG.wait_for_result("success") == "reached"
    assert PG.wait_for_result("timeout") == "timed_out"
    assert PG.wait_for_result("not in recovery") == "stopped"
    with pytest.raises(ValueError, match="unknown WAIT FOR status"):
        PG.wait_for_result("maybe")


def test_wait_applying_uses_wait_for_lsn_on_postgresql_19_only() -> None:
    """On PostgreSQL 19 (server_version_info >= (19,)) a wait asks the replay state
    first: already applied, or replay paused, answers in that one round trip;
    otherwise WAIT FOR LSN waits. Older servers get the polling query. wait()
    sends WAIT FOR LSN alone."""
    lsn = PG.parse("0/3000148")
    caught_up = FakeServer((19, 0), [(True, False)])
    assert PG.wait_applying(caught_up, lsn, 0.5) == "reached"
    assert len(caught_up.sent) == 1
    assert "WAIT FOR" not in caught_up.sent[0]
    paused = FakeServer((19, 0), [(False, True)])
    assert PG.wait_applying(paused, lsn, 0.5) == "stopped"
    assert len(paused.sent) == 1
    behind = FakeServer((19, 0), [(False, False), "timeout"])
    assert PG.wait_applying(behind, lsn, 0.5) == "timed_out"
    assert behind.sent[1] == "WAIT FOR LSN '0/3000148' WITH (TIMEOUT '500ms', NO_THROW)"
    applying = FakeServer((19,), [(False, False), "success"])
    assert PG.wait_applying(applying, lsn, 0.5) == "reached"
    older = FakeServer((18, 1), [(False, False)])
    assert PG.wait_applying(older, lsn, 0.5) == "timed_out"
    assert older.sent[0].lstrip().startswith("WITH RECURSIVE poll")
    waiting = FakeServer((19, 0), ["success"])
    assert PG.wait(waiting, lsn, 0.5) is True
    assert waiting.sent[0].startswith("WAIT FOR LSN")


@pytest.mark.postgresql
def test_the_replay_state_asked_before_wait_for_lsn_runs_on_a_real_server(
    fresh_postgres_topology: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PostgreSQL 19 path's first question (is the position applied, is replay
    paused) is valid SQL on a real standby: applied, it answers reached; paused
    and behind, stopped; neither reaches WAIT FOR LSN, which PostgreSQL 15 lacks."""
    from sqlalchemy_replicas.positions import postgresql

    monkeypatch.setattr(postgresql, "has_wait_for", lambda server: True)
    topology = fresh_postgres_topology
    primary = sa.create_engine(topology.primary_url)
    replica = sa.create_engine(topology.replica_urls[0], isolation_level="AUTOCOMMIT")
    try:
        with primary.connect() as conn:
            applied = PG.current(conn)
        topology.wait_for_catchup()
        assert applied is not None
        with replica.connect() as conn:
            assert PG.wait_applying(conn, applied, 0.5) == "reached"
        topology.pause_replay(0)
        with replica.connect() as conn:
            assert PG.wait_applying(conn, applied + 2**32, 0.5) == "stopped"
    finally:
        primary.dispose()
        replica.dispose()
