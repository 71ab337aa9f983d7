"""The SQL text lexer proves read-only only what certainly is."""

from __future__ import annotations

import pytest

from sqlalchemy_replicas.classify import Classifier
from sqlalchemy_replicas.sqltext import Family, check_fragment, check_statement

WRITING = Classifier().is_writing_function
FAMILIES: list[Family] = ["postgresql", "mysql", "generic"]


def read_only(sql: str, family: Family) -> bool:
    return check_statement(sql, family, WRITING).read_only


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        "  select * from t where id = :id  ",
        "SELECT 1;",
        "SELECT 1;  -- trailing comment",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r",
        "VALUES (1), (2)",
        "(SELECT 1) UNION (SELECT 2)",
        "EXPLAIN SELECT * FROM t",
        "SELECT 'insert into t values (1); delete from t' AS s",
        "SELECT 1 -- update t set x = 1\n",
        "SELECT /* delete from t */ 1",
        'SELECT "update" FROM "insert"',
        "SELECT lower(name), count(*) FROM t GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
        "SELECT substring(s FROM 1 FOR 2) FROM t",
        "SELECT replace(name, 'a', 'b') FROM t",
        "SELECT * FROM t WHERE updated_at > now() - interval '1 day'",
    ],
)
def test_single_reads_are_read_only(sql: str, family: Family) -> None:
    """Plain reads, with keywords hidden in literals, comments or quoted names, pass."""
    assert read_only(sql, family), check_statement(sql, family, WRITING)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("INSERT INTO t VALUES (1)", "INSERT statement is not a read"),
        ("update t set x = 1", "UPDATE statement is not a read"),
        ("DELETE FROM t", "DELETE statement is not a read"),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "MERGE statement"),
        ("CREATE TABLE t (id int)", "CREATE statement is not a read"),
        ("TRUNCATE t", "TRUNCATE statement"),
        ("CALL proc()", "CALL statement"),
        ("SET search_path TO x", "SET statement"),
        ("LOCK TABLE t", "LOCK statement"),
        ("", "empty SQL text"),
        ("   -- nothing\n", "empty SQL text"),
        ("SELECT 1; DELETE FROM t", "more than one statement"),
        ("SELECT 1; SELECT 2", "more than one statement"),
        ("SELECT * FROM t FOR UPDATE", "UPDATE in SQL text"),
        ("SELECT * FROM t FOR NO KEY UPDATE NOWAIT", "takes row locks"),
        ("SELECT * FROM t FOR SHARE SKIP LOCKED", "takes row locks"),
        ("SELECT * FROM t FOR KEY SHARE OF t", "takes row locks"),
        ("SELECT * FROM t LOCK IN SHARE MODE", "LOCK in SQL text"),
        ("SELECT * INTO new_table FROM t", "INTO in SQL text"),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "DELETE in SQL text"),
        ("WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i", "INSERT"),
        ("EXPLAIN ANALYZE DELETE FROM t", "DELETE in SQL text"),
        ("SELECT nextval('seq')", "nextval() writes or takes locks"),
        ("SELECT pg_catalog.setval('seq', 1)", "setval() writes"),
        ("SELECT pg_advisory_lock(1)", "pg_advisory_lock() writes"),
        ("SELECT pg_try_advisory_xact_lock(1)", "pg_try_advisory_xact_lock()"),
        ("SELECT pg_notify('c', 'x')", "pg_notify()"),
        ("SELECT txid_current()", "txid_current()"),
        ("SELECT GET_LOCK('x', 1)", "get_lock()"),
        ("SELECT RELEASE_LOCK ('x')", "release_lock()"),
        ("SELECT LAST_INSERT_ID()", "last_insert_id()"),
        ("SELECT NEXT VALUE FOR seq", "NEXT VALUE FOR uses a sequence"),
        ("SELECT 'unterminated", "unterminated quoted string"),
        ("SELECT /* unterminated", "unterminated comment"),
    ],
)
def test_writes_locks_and_doubt_are_not_read_only(sql: str, family: Family, reason: str) -> None:
    """Statements that write, lock, or that the lexer cannot be sure of, fail with a reason."""
    verdict = check_statement(sql, family, WRITING)
    assert not verdict.read_only
    assert reason.lower() in verdict.reason.lower()


def test_postgresql_dollar_quotes_and_escape_strings_hide_their_contents() -> None:
    """$tag$...$tag$ and E'...' literals are skipped as PostgreSQL reads them."""
    assert read_only("SELECT $$delete from t$$, $x$ ; insert $x$", "postgresql")
    assert read_only(r"SELECT E'it\'s; delete from t'", "postgresql")
    assert not read_only("SELECT $x$ never closed", "postgresql")
    assert read_only("SELECT $1 + $2", "postgresql")


def test_postgresql_nested_comments_are_skipped_whole() -> None:
    """PostgreSQL block comments nest; what follows the outer end is SQL again."""
    assert read_only("SELECT /* a /* b */ delete */ 1", "postgresql")
    assert not read_only("SELECT /* a /* b */ c */ 1; DELETE FROM t", "postgresql")


def test_postgresql_operators_with_at_and_hash_are_fine() -> None:
    """@> (containment) and # (xor) are operators in PostgreSQL, not variables or comments."""
    assert read_only("SELECT * FROM t WHERE tags @> ARRAY['a'] AND (a # b) = 0", "postgresql")


def test_mysql_backslash_escapes_and_hash_comments() -> None:
    """MySQL strings take backslash escapes; # starts a comment."""
    assert read_only(r"SELECT 'it\'s; delete from t'", "mysql")
    assert read_only("SELECT 1 # delete from t\n", "mysql")
    assert read_only("SELECT `update` FROM `t`", "mysql")
    assert read_only('SELECT "double quoted; delete" FROM t', "mysql")


def test_mysql_session_variables_and_executable_comments_are_not_read_only() -> None:
    """User/session variables differ per server; /*! ... */ bodies are executed."""
    for sql in (
        "SELECT @counter",
        "SELECT @@last_insert_id",
        "SELECT @x := 1",
        "SELECT /*! SQL_NO_CACHE */ 1",
        "SELECT 1 /*M!100000 , 2 */",
    ):
        assert not read_only(sql, "mysql"), sql


def test_generic_needs_both_readings_to_agree() -> None:
    """Unknown dialect: text is read-only only if it is under PostgreSQL and MySQL rules."""
    # Under PostgreSQL rules the string ends at \', then a second statement follows.
    tricky = r"SELECT 'a\'; DELETE FROM t; --'"
    assert read_only(tricky, "mysql")
    assert not read_only(tricky, "postgresql")
    assert not read_only(tricky, "generic")
    # A # comment hides '; DELETE' from MySQL but not from PostgreSQL.
    assert not read_only("SELECT 1 # ; DELETE FROM t", "generic")


def test_fragments_need_no_leading_select() -> None:
    """A fragment (a text() clause inside a Core statement) is checked for writes only."""
    assert check_fragment("price * 2 > 10", "postgresql", WRITING).read_only
    assert not check_fragment("nextval('s') > 1", "postgresql", WRITING).read_only
    assert not check_fragment("FOR UPDATE", "postgresql", WRITING).read_only
    assert not check_fragment("1); DELETE FROM t; --", "postgresql", WRITING).read_only
