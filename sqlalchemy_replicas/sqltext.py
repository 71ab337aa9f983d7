"""A conservative lexer that proves raw SQL text read-only, or does not.

Pure code, no I/O. It answers one question about a string of SQL: is it
certainly a single statement that neither writes nor locks? Any doubt is a
"no", and the statement then runs on the primary. It is not a parser: it
tokenizes (skipping comments and string literals, which may contain any
words) and looks for what makes a statement unsafe on a replica.

Dialect families differ in what a comment or a string is: ``#`` starts a
comment in MySQL but is an operator in PostgreSQL; a backslash escapes a
quote in MySQL strings but not in PostgreSQL's standard strings. The
``generic`` family (used when the dialect is unknown) checks the text under
both readings and proves it read-only only when both agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["Family", "Verdict", "check_fragment", "check_statement"]

Family = Literal["postgresql", "mysql", "generic"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """The lexer's answer: ``read_only`` and, when not, the reason why."""

    read_only: bool
    reason: str


READ_ONLY: Final = Verdict(True, "read-only SQL text")

# Words that, anywhere outside literals and comments, mean a statement may
# write or lock: DML (also inside CTEs), SELECT ... INTO, LOCK IN SHARE MODE.
_WRITE_WORDS: Final = frozenset({"insert", "update", "delete", "merge", "upsert", "into", "lock"})

# Statements a replica can serve, by their first word. EXPLAIN passes only
# because the rest of the text is checked too (EXPLAIN ANALYZE DELETE ...).
_READ_STATEMENTS: Final = frozenset(
    {"select", "with", "values", "table", "show", "explain", "describe", "desc"}
)

_IDENT_START = re.compile(r"[A-Za-z_\x80-\uffff]")
_WORD = re.compile(r"[A-Za-z_\x80-\uffff][A-Za-z0-9_$\x80-\uffff]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\uffff][A-Za-z0-9_\x80-\uffff]*)?\$")
_NUMBER_OR_PARAM = re.compile(r"\$?[0-9][0-9A-Za-z_.]*")


class _Unsafe(Exception):
    """Raised inside the tokenizer when the text cannot be proven safe."""


def _tokens(sql: str, family: Literal["postgresql", "mysql"]) -> Iterator[str]:
    """Yield significant tokens, lower-cased words and single punctuation.

    Comments and literals are skipped; quoted identifiers come out as ``"id"``.
    Raises :class:`_Unsafe` for text it will not reason about.
    """
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch.isspace():
            i += 1
        elif sql.startswith("--", i) or (ch == "#" and family == "mysql"):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif sql.startswith("/*", i):
            if family == "mysql" and sql.startswith(("/*!", "/*M!"), i):
                # MySQL runs the body of an executable comment as SQL.
                raise _Unsafe("executable comment /*! ... */")
            i = _skip_block_comment(sql, i, nested=family == "postgresql")
        elif ch == "'":
            i = _skip_quoted(sql, i, "'", backslash=family == "mysql")
        elif ch in "eE" and family == "postgresql" and sql.startswith("'", i + 1):
            i = _skip_quoted(sql, i + 1, "'", backslash=True)
        elif ch == '"':
            if family == "mysql":
                # A string in MySQL's default mode; an identifier with ANSI_QUOTES.
                # Either way nothing inside it is SQL.
                i = _skip_quoted(sql, i, '"', backslash=True)
                yield '"id"'
            else:
                i = _skip_quoted(sql, i, '"', backslash=False)
                yield '"id"'
        elif ch == "`" and family == "mysql":
            i = _skip_quoted(sql, i, "`", backslash=False)
            yield '"id"'
        elif ch == "$" and family == "postgresql" and (tag := _DOLLAR_TAG.match(sql, i)):
            end = sql.find(tag.group(), tag.end())
            if end < 0:
                raise _Unsafe("unterminated dollar-quoted string")
            i = end + len(tag.group())
        elif _IDENT_START.match(ch):
            word = _WORD.match(sql, i)
            assert word is not None
            i = word.end()
            yield word.group().lower()
        elif ch.isdigit() or (ch == "$" and i + 1 < n and sql[i + 1].isdigit()):
            number = _NUMBER_OR_PARAM.match(sql, i)
            assert number is not None
            i = number.end()
        else:
            if ch == ":" and sql.startswith(":=", i):
                raise _Unsafe("assignment (:=) to a session variable")
            if ch == "@" and family == "mysql":
                raise _Unsafe("session or user variable (@...) differs per server")
            i += 1
            yield ch


def _skip_block_comment(sql: str, start: int, *, nested: bool) -> int:
    depth, i = 1, start + 2
    while i < len(sql):
        if sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0 or not nested:
                return i
        elif nested and sql.startswith("/*", i):
            depth += 1
            i += 2
        else:
            i += 1
    raise _Unsafe("unterminated comment")


def _skip_quoted(sql: str, start: int, quote: str, *, backslash: bool) -> int:
    i = start + 1
    while i < len(sql):
        ch = sql[i]
        if backslash and ch == "\\":
            i += 2
        elif ch == quote:
            if sql.startswith(quote * 2, i):
                i += 2
            else:
                return i + 1
        else:
            i += 1
    raise _Unsafe("unterminated quoted string or identifier")


def _scan(
    sql: str,
    family: Literal["postgresql", "mysql"],
    *,
    statement: bool,
    is_writing_function: Callable[[str], bool],
) -> Verdict:
    try:
        tokens = list(_tokens(sql, family))
    except _Unsafe as exc:
        return Verdict(False, str(exc))
    if statement:
        first = next((t for t in tokens if t != "("), None)
        if first is None:
            return Verdict(False, "empty SQL text")
        if first not in _READ_STATEMENTS:
            return Verdict(False, f"{first.upper()} statement is not a read")
    for index, token in enumerate(tokens):
        after = tokens[index + 1] if index + 1 < len(tokens) else ""
        if token in _WRITE_WORDS:
            return Verdict(False, f"{token.upper()} in SQL text may write or lock")
        if token == "for" and after in ("share", "key", "no"):
            return Verdict(False, "a FOR SHARE / FOR KEY / FOR NO KEY clause takes row locks")
        if token in ("next", "previous") and after == "value":
            return Verdict(False, f"{token.upper()} VALUE FOR uses a sequence")
        if token == ";" and any(t != ";" for t in tokens[index + 1 :]):
            return Verdict(False, "more than one statement")
        if after == "(" and is_writing_function(token):
            return Verdict(False, f"{token}() writes or takes locks")
    return READ_ONLY


def check_statement(
    sql: str, family: Family, is_writing_function: Callable[[str], bool]
) -> Verdict:
    """Is ``sql`` a single statement a replica can serve?

    :param sql: the complete SQL text of a statement.
    :param family: ``postgresql``, ``mysql`` or ``generic`` (both readings).
    :param is_writing_function: tells whether a lower-cased function name
        writes or takes locks.
    """
    return _check(sql, family, statement=True, is_writing_function=is_writing_function)


def check_fragment(sql: str, family: Family, is_writing_function: Callable[[str], bool]) -> Verdict:
    """Is ``sql``, a piece of a larger statement (a ``text()`` clause, a
    ``literal_column``, a prefix or hint), free of writes and locks?"""
    return _check(sql, family, statement=False, is_writing_function=is_writing_function)


def _check(
    sql: str, family: Family, *, statement: bool, is_writing_function: Callable[[str], bool]
) -> Verdict:
    if family != "generic":
        return _scan(sql, family, statement=statement, is_writing_function=is_writing_function)
    for reading in ("postgresql", "mysql"):
        verdict = _scan(sql, reading, statement=statement, is_writing_function=is_writing_function)
        if not verdict.read_only:
            return verdict
    return READ_ONLY
