"""Statement classification: can the router prove a statement read-only?

Pure decision code, no I/O. A statement is a read only when the router can
prove it; everything else, including what it cannot classify, is a write and
goes to the primary.

Classifying walks the statement tree (to find DML inside CTEs, locking
subqueries, functions that write, raw SQL fragments), which would cost as
much as a fifth of a primary-key select. So results are cached per statement
*structure*: SQLAlchemy's own cache key, which it computes (and memoizes on
the statement) for its compiled-SQL cache anyway.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy.orm.context import FromStatement
from sqlalchemy.sql import visitors
from sqlalchemy.sql.ddl import ExecutableDDLElement
from sqlalchemy.sql.dml import UpdateBase
from sqlalchemy.sql.elements import ColumnClause, TextClause
from sqlalchemy.sql.functions import FunctionElement, next_value
from sqlalchemy.sql.lambdas import StatementLambdaElement
from sqlalchemy.sql.selectable import CompoundSelect, Select, TextualSelect

from . import sqltext
from .exc import ConfigurationError

__all__ = [
    "WRITING_FUNCTIONS",
    "WRITING_FUNCTION_PREFIXES",
    "Classification",
    "Classifier",
    "StatementKind",
    "classify",
]


class StatementKind(enum.Enum):
    """Where a statement may run: ``READ`` on a replica, ``WRITE`` on the primary."""

    READ = "read"
    WRITE = "write"


@dataclass(frozen=True, slots=True)
class Classification:
    """The kind of a statement and a short human-readable reason for it."""

    kind: StatementKind
    reason: str

    @property
    def is_read(self) -> bool:
        """True when the statement may be served by a replica."""
        return self.kind is StatementKind.READ


#: Functions that write, take locks, or depend on the session that wrote
#: (sequence and insert-id state): a statement calling one goes to the primary.
WRITING_FUNCTIONS: Final = frozenset(
    {
        # PostgreSQL
        "nextval", "setval", "currval", "lastval", "pg_notify", "txid_current",
        "txid_current_if_assigned", "pg_current_xact_id", "pg_current_xact_id_if_assigned",
        "set_config", "pg_current_wal_lsn", "pg_current_wal_insert_lsn",
        "pg_current_wal_flush_lsn", "pg_switch_wal", "pg_create_restore_point",
        "pg_logical_emit_message", "pg_terminate_backend", "pg_cancel_backend",
        "pg_reload_conf", "pg_rotate_logfile", "pg_create_physical_replication_slot",
        "pg_create_logical_replication_slot", "pg_drop_replication_slot",
        "pg_copy_physical_replication_slot", "pg_copy_logical_replication_slot",
        "pg_import_system_collations", "lowrite", "dblink_exec",
        # MySQL / MariaDB
        "get_lock", "release_lock", "release_all_locks", "is_free_lock", "is_used_lock",
        "last_insert_id", "row_count", "found_rows",
    }
)  # fmt: skip

#: Name prefixes of function families that write or take locks.
WRITING_FUNCTION_PREFIXES: Final = (
    "pg_advisory_",
    "pg_try_advisory_",
    "pg_stat_reset",
    "pg_replication_origin_",
    "lo_",
)

# Preallocated: a classification is returned for every statement.
PLAIN_SELECT: Final = Classification(StatementKind.READ, "plain SELECT")
READ_ONLY_TEXT: Final = Classification(StatementKind.READ, "SQL text proven read-only")
LOCKING_SELECT: Final = Classification(
    StatementKind.WRITE, "SELECT ... FOR UPDATE/SHARE takes row locks"
)
DML: Final = Classification(StatementKind.WRITE, "INSERT/UPDATE/DELETE writes")
DML_IN_CTE: Final = Classification(StatementKind.WRITE, "a CTE contains INSERT/UPDATE/DELETE")
DDL: Final = Classification(StatementKind.WRITE, "DDL changes the schema")
SEQUENCE: Final = Classification(StatementKind.WRITE, "a sequence's next value writes")
FLUSH: Final = Classification(StatementKind.WRITE, "flush writes pending ORM changes")
NO_STATEMENT: Final = Classification(
    StatementKind.WRITE, "no statement given (session.connection() or mapper lookup)"
)
NOT_PROVEN_READ: Final = Classification(StatementKind.WRITE, "not provably read-only")

_CACHE_SIZE: Final = 2000
_Family = sqltext.Family


class Classifier:
    """Classifies statements for one dialect family, with a bounded cache.

    :param family: ``postgresql``, ``mysql`` or ``generic``; decides how raw
        SQL text is lexed (see :mod:`sqlalchemy_replicas.sqltext`).
    :param writing_functions: more function names (case-insensitive) that
        write or take locks, e.g. your own ``audit_log()``.
    :param read_only_functions: function names that are safe on a replica
        although a built-in rule says otherwise.
    :raises ConfigurationError: for a function name listed as both.
    """

    def __init__(
        self,
        family: _Family = "generic",
        *,
        writing_functions: Iterable[str] = (),
        read_only_functions: Iterable[str] = (),
    ) -> None:
        if family not in ("postgresql", "mysql", "generic"):
            raise ConfigurationError(
                f"family={family!r} is unknown; use 'postgresql', 'mysql' or 'generic'"
            )
        writing = _names(writing_functions, "writing_functions")
        read_only = _names(read_only_functions, "read_only_functions")
        if both := writing & read_only:
            raise ConfigurationError(
                f"function(s) {', '.join(sorted(both))} listed as both writing and read-only"
            )
        self.family: _Family = family
        self._writing = (WRITING_FUNCTIONS | writing) - read_only
        self._read_only = read_only
        self._cache: dict[Any, Classification] = {}
        self._cache_lock = threading.Lock()

    def is_writing_function(self, name: str) -> bool:
        """True when calling the function ``name`` must run on the primary."""
        name = name.lower()
        return name in self._writing or (
            name.startswith(WRITING_FUNCTION_PREFIXES) and name not in self._read_only
        )

    def classify(self, statement: Any, *, flushing: bool = False) -> Classification:
        """Classify ``statement`` as a read or a write.

        :param statement: the SQL construct passed to ``Session.get_bind`` as
            ``clause``, or ``None`` when there is none.
        :param flushing: True while the Session flushes its unit of work.
        :return: ``READ`` only for a provably read-only statement.
        """
        if flushing:
            return FLUSH
        if statement is None:
            return NO_STATEMENT
        if isinstance(statement, TextClause):
            key: Any = statement.text
        elif isinstance(statement, UpdateBase):
            # Known without a walk: no cache key to compute (for an ORM
            # statement SQLAlchemy computes one of its own copy, not this one's).
            return DML
        else:
            generate = getattr(statement, "_generate_cache_key", None)
            cache_key = generate() if generate is not None else None
            if cache_key is None:  # a construct SQLAlchemy itself cannot cache
                return self._classify(statement)
            key = cache_key.key
        found = self._cache.get(key)
        if found is None:
            found = self._classify(statement)
            with self._cache_lock:
                if len(self._cache) >= _CACHE_SIZE:
                    # First in, first out: cheap, and a hot statement comes back.
                    del self._cache[next(iter(self._cache))]
                self._cache[key] = found
        return found

    # -- uncached -------------------------------------------------------------

    def _classify(self, statement: Any) -> Classification:
        if isinstance(statement, StatementLambdaElement):
            statement = statement._resolved
        if isinstance(statement, TextClause):
            return self._text(statement.text, whole_statement=True)
        if isinstance(statement, UpdateBase):
            return DML
        if isinstance(statement, ExecutableDDLElement):
            return DDL
        if isinstance(statement, (Select, CompoundSelect, TextualSelect, FromStatement)):
            return self._walk(statement)
        return NOT_PROVEN_READ

    def _walk(self, statement: Any) -> Classification:
        embedded_text = getattr(statement, "element", None)
        if isinstance(embedded_text, TextClause):
            # text().columns(...) or select(Entity).from_statement(text(...))
            verdict = self._text(embedded_text.text, whole_statement=True)
            if not verdict.is_read:
                return verdict
        found_select = False
        for element in visitors.iterate(statement):
            if isinstance(element, Select):
                found_select = True
                if element._for_update_arg is not None:
                    return LOCKING_SELECT
                verdict = self._select_extras(element)
                if not verdict.is_read:
                    return verdict
            elif isinstance(element, UpdateBase):
                return DML_IN_CTE
            elif isinstance(element, next_value):
                return SEQUENCE
            elif isinstance(element, FunctionElement):
                name = getattr(element, "name", "")
                if isinstance(name, str) and self.is_writing_function(name):
                    return Classification(StatementKind.WRITE, f"{name}() writes or takes locks")
            elif isinstance(element, TextClause):
                verdict = self._text(element.text, whole_statement=False)
                if not verdict.is_read:
                    return verdict
            elif isinstance(element, ColumnClause) and element.is_literal:
                verdict = self._text(element.name, whole_statement=False)
                if not verdict.is_read:
                    return verdict
        return PLAIN_SELECT if found_select else READ_ONLY_TEXT

    def _select_extras(self, select: Select[Any]) -> Classification:
        """Prefixes, suffixes and hints are raw SQL: ``suffix_with("FOR UPDATE")``."""
        fragments: list[Any] = [text for text, _ in (*select._prefixes, *select._suffixes)]
        fragments += [hint for _, hint in select._statement_hints]
        fragments += list(select._hints.values())
        for fragment in fragments:
            sql = fragment.text if isinstance(fragment, TextClause) else str(fragment)
            verdict = self._text(sql, whole_statement=False)
            if not verdict.is_read:
                return verdict
        return PLAIN_SELECT

    def _text(self, sql: str, *, whole_statement: bool) -> Classification:
        check = sqltext.check_statement if whole_statement else sqltext.check_fragment
        verdict = check(sql, self.family, self.is_writing_function)
        if verdict.read_only:
            return READ_ONLY_TEXT
        return Classification(StatementKind.WRITE, verdict.reason)


def _names(names: Iterable[str], argument: str) -> frozenset[str]:
    if isinstance(names, str):
        raise ConfigurationError(f"{argument} must be a collection of names, not one str")
    result = set()
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"{argument} must hold function names, not {name!r}")
        result.add(name.strip().lower())
    return frozenset(result)


_DEFAULT = Classifier()


def classify(statement: Any, *, flushing: bool = False) -> Classification:
    """Classify ``statement`` with the default (``generic``) rules.

    Routers classify with their own :class:`Classifier`, which knows the
    database's dialect family and the router's function lists.
    """
    return _DEFAULT.classify(statement, flushing=flushing)
