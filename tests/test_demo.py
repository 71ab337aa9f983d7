"""The demo's transcript: what each step did, in the order the servers got it."""

from __future__ import annotations

import io
import logging

from sqlalchemy_replicas._demo import _Transcript
from sqlalchemy_replicas.testing.recording import ExecutedStatement


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord(
        "sqlalchemy_replicas.routing", logging.DEBUG, __file__, 1, message, (), None
    )


def test_a_wait_sent_with_its_read_is_shown_before_it() -> None:
    """StatementLog tells of a wait sent with a read after the read (the wait
    bypasses the engine's events): the transcript shows it just before that
    read, as the server got them, and a step is printed when the next begins."""
    out = io.StringIO()
    transcript = _Transcript(out)
    transcript.step("session.scalar(...)")
    transcript.emit(record("SELECT -> replica1: if it applies this scope's commits in time"))
    transcript.statement(ExecutedStatement("replica1", "SELECT count(*) FROM post"))
    transcript.wait_sent("replica1", "WITH RECURSIVE poll ...")
    transcript.statement(ExecutedStatement("replica1", "WITH RECURSIVE poll ..."))
    transcript.emit(record("replica replica1 applied this scope's commits"))
    assert out.getvalue() == "\n  >>> session.scalar(...)\n"
    transcript.step("next")
    assert out.getvalue().splitlines()[2:] == [
        "     route  SELECT -> replica1: if it applies this scope's commits in time",
        "     replica1   WITH RECURSIVE poll ...",
        "     replica1   SELECT count(*) FROM post",
        "     route  replica replica1 applied this scope's commits",
        "",
        "  >>> next",
    ]


def test_a_flush_asking_for_its_bind_per_table_shows_one_decision() -> None:
    """A flush asks for its bind once per table: one line says it."""
    out = io.StringIO()
    transcript = _Transcript(out)
    for _ in range(3):
        transcript.emit(record("flush -> primary: flush writes pending ORM changes"))
    transcript.flush_step()
    assert out.getvalue().splitlines() == [
        "     route  flush -> primary: flush writes pending ORM changes"
    ]
