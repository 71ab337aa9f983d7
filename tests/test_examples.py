"""The examples run and say what their docs promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.postgresql
def test_quickstart_reads_its_own_write() -> None:
    """quickstart.py: after its own commit, in a causal context, the read sees it."""
    assert "notes seen after our own commit: 1" in run_example("quickstart.py")


@pytest.mark.postgresql
def test_web_request_carries_the_write_to_another_server() -> None:
    """web_request.py: with the cookie the other server reads the update; without it,
    its lagging replica serves the old state."""
    output = run_example("web_request.py")
    assert "with the cookie: 'updated just now'" in output
    assert "without the cookie (stale allowed):   None" in output


@pytest.mark.postgresql
def test_the_plugin_example_passes_for_a_user() -> None:
    """examples/test_my_app.py, run as a user would with pytest, passes."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_my_app.py"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=EXAMPLES,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout


@pytest.mark.postgresql
def test_failover_example_serves_every_read_and_follows_the_primary() -> None:
    """failover.py: no read fails while a replica is dead, the dead one is reported
    and readmitted, and a write after the failover reaches the promoted replica."""
    output = run_example("failover.py")
    assert "reads served while replica1 was down: 20 of 20" in output
    # "disconnected: ..." or, if the lag monitor noticed first, "unreachable: ..."
    assert "replica1: healthy=False reason=" in output
    assert "replica1 restarted and readmitted" in output
    assert "write after failover: coffee" in output
    assert "primary moved: True" in output


@pytest.mark.postgresql
def test_celery_example_task_reads_the_order_only_with_the_integration() -> None:
    """celery_app.py: with the integration installed the task reads the order the
    request committed; uninstalled, it reads the replica that has not applied it."""
    output = run_example("celery_app.py")
    assert "task read with the integration: 'paid'" in output
    assert "task read without it (stale):   None" in output
