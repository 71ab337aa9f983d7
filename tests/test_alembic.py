"""The Alembic helper: migrations run on the primary only, then wait (one
deadline) for the healthy replicas and report who did not apply them; the
library's loggers survive the template's ``fileConfig``."""

from __future__ import annotations

import logging
import logging.config
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.integrations.alembic import ReplicaReport, keep_logging
from sqlalchemy_replicas.testing import StatementLog, Topology

PROJECT = Path(__file__).parent / "alembic_project"
ROOT = Path(__file__).parent.parent
#: Seconds the migration waits for replicas when one is paused.
SHORT_WAIT = 2.0


def _has_widget(url: sa.URL) -> bool:
    engine = sa.create_engine(url)
    try:
        return sa.inspect(engine).has_table("widget")
    finally:
        engine.dispose()


def _render(url: sa.URL) -> str:
    return url.render_as_string(hide_password=False)


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_alembic_upgrade_from_the_command_line_waits_for_replicas_and_names_the_laggard(
    topology: Topology, tmp_path: Path, driver: str
) -> None:
    """`alembic upgrade head` as a user runs it: the table is created on the
    primary, the replica that replays reaches it within the wait, and the
    paused one is named in a WARNING (the template's fileConfig did not
    silence the library's logger); the command still succeeds."""
    topology.pause_replay(0)
    is_async = driver == "async"
    primary = topology.async_primary_url if is_async else topology.primary_url
    replicas = topology.async_replica_urls if is_async else topology.replica_urls
    env = {
        **os.environ,
        "DATABASE_URL": _render(primary),
        "DATABASE_REPLICA_URLS": ",".join(_render(u) for u in replicas),
        "MIGRATION_WAIT": str(SHORT_WAIT),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(PROJECT / "alembic.ini"), "upgrade", "head"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "replica replica1 has not applied the migration" in done.stderr
    assert "replica2" not in done.stderr  # it applied the migration: no warning
    assert _has_widget(topology.primary_url)
    assert _has_widget(topology.replica_urls[1])
    assert not _has_widget(topology.replica_urls[0])
    topology.resume_replay(0)
    topology.wait_for_catchup()
    assert _has_widget(topology.replica_urls[0])


def test_in_process_upgrade_runs_ddl_on_the_primary_only_and_reports(
    topology: Topology,
) -> None:
    """A migration run in-process (as Flask-Migrate or a test suite does): no
    DDL reaches a replica, every replica applied it within the wait, and
    afterwards the library's loggers still log."""
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    config = Config(str(PROJECT / "alembic.ini"))
    config.attributes["router"] = router
    try:
        with StatementLog(router) as log:
            command.upgrade(config, "head")
        report = config.attributes["report"]
        assert isinstance(report, ReplicaReport)
        assert report.ok
        assert report.applied == ("replica1", "replica2")
        assert report.position is not None
        ddl = [s for s in log.statements if "CREATE TABLE" in s.sql.upper()]
        assert ddl
        assert {s.node for s in ddl} == {"primary"}
        for name in ("sqlalchemy_replicas.monitor", "sqlalchemy_replicas.routing"):
            assert not logging.getLogger(name).disabled
    finally:
        router.dispose()
    assert _has_widget(topology.replica_urls[0])


def test_keep_logging_turns_the_library_loggers_back_on_after_fileconfig(
    tmp_path: Path,
) -> None:
    """fileConfig disables every existing logger its file does not name;
    keep_logging() turns ours back on and leaves others alone."""
    other = logging.getLogger("someone.else")
    ours = logging.getLogger("sqlalchemy_replicas.monitor")
    ini = tmp_path / "logging.ini"
    ini.write_text(
        "[loggers]\nkeys = root\n[handlers]\nkeys =\n[formatters]\nkeys =\n"
        "[logger_root]\nlevel = WARNING\nhandlers =\n"
    )
    try:
        logging.config.fileConfig(ini)
        assert ours.disabled
        assert other.disabled
        keep_logging()
        assert not ours.disabled
        assert other.disabled
    finally:
        ours.disabled = other.disabled = False
