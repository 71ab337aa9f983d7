"""Per-table consistency rules: tables whose reads must see the primary, or may be stale.

Pure decision code, no I/O. Rules come from the router's ``rules=`` option
(keyed by table name, ``Table`` or mapped class) and from tables' ``info``
(``info=sr.table_consistency("strong")``, which writes :data:`INFO_KEY`).
A read's level is the strictest rule among the tables it reads, in the
order of :data:`STRICTNESS`; a table without a rule counts at the level
that applies otherwise (the session's, ``default_consistency()``'s or the
router's), so a rule makes reads of its own table weaker or stronger but
never weakens reads of other tables joined to it.

Finding a statement's tables walks it (ORM statements are compiled first,
so that relationship joins and eager loads count), so the result is cached
per statement structure, by SQLAlchemy's own cache key, as the classifier
does. With no rule anywhere (no ``rules=`` and no
:func:`table_consistency`), sessions skip all this after one flag check.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any, Final

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.lambdas import StatementLambdaElement
from sqlalchemy.sql.schema import Table
from sqlalchemy.sql.selectable import TableClause

from .classify import Classifier
from .consistency import LEVELS, ConsistencyLevel, validate_level
from .exc import ConfigurationError

__all__ = [
    "INFO_KEY",
    "STRICTNESS",
    "TableRules",
    "info_rules_declared",
    "strictest",
    "table_consistency",
]

#: The key of a table's ``info`` that holds its rule.
INFO_KEY: Final = "sqlalchemy_replicas.consistency"

#: The levels, strictest first. ``strong`` reads the primary; ``monotonic``
#: is ``read_your_writes`` and more; ``read_your_writes`` reads a replica
#: within the router's ``max_lag`` that has also applied the causal scope's
#: commits, so it is at least as fresh as ``bounded`` at the router's
#: ``max_lag`` (what a rule's ``bounded`` means); ``eventual`` allows any
#: replica the lag monitor has not left out.
STRICTNESS: Final[tuple[ConsistencyLevel, ...]] = (
    "strong",
    "monotonic",
    "read_your_writes",
    "bounded",
    "eventual",
)
_RANK: Final = {level: rank for rank, level in enumerate(STRICTNESS)}
assert set(_RANK) == set(LEVELS)

_CACHE_SIZE: Final = 2000

# Set by table_consistency(): tables' info may hold rules, so sessions of
# routers without rules= look too.
_info_declared = False


def info_rules_declared() -> bool:
    """True once :func:`table_consistency` was called in this process."""
    return _info_declared


def table_consistency(level: ConsistencyLevel) -> dict[str, ConsistencyLevel]:
    """A table's ``info`` holding its rule: every read of the table is at ``level``
    unless a statement option or a ``consistency()`` block says otherwise::

        orders = Table("orders", metadata, ..., info=sr.table_consistency("strong"))

        class Product(Base):
            __tablename__ = "product"
            __table_args__ = {"info": sr.table_consistency("eventual")}

    Merge it with info of your own: ``info={**sr.table_consistency("strong"), ...}``.
    Calling it switches on the lookup of tables' info for every router.

    :raises ConfigurationError: for an unknown level, at once.
    """
    global _info_declared
    checked = validate_level(level, argument="table_consistency() level")
    _info_declared = True
    return {INFO_KEY: checked}


def strictest(first: ConsistencyLevel, second: ConsistencyLevel) -> ConsistencyLevel:
    """The stricter of two levels, by :data:`STRICTNESS`."""
    return first if _RANK[first] <= _RANK[second] else second


class TableRules:
    """A router's table rules and their per-statement cache.

    :param rules: table name (``"orders"``, or ``"schema.orders"`` for one
        schema only), ``Table`` or mapped class -> level; None for none.
    :param classifier: the router's; rules apply to reads only.
    :param dialect: the primary's, to compile ORM statements with.
    :raises ConfigurationError: naming the key, for a key of another type, a
        class that is not mapped, or an unknown level.
    """

    def __init__(
        self,
        rules: Mapping[Any, ConsistencyLevel] | None,
        *,
        classifier: Classifier,
        dialect: Dialect,
    ) -> None:
        if rules is not None and not isinstance(rules, Mapping):
            raise ConfigurationError(
                "rules must be a mapping of table name, Table or mapped class to a "
                f"consistency level, e.g. rules={{'orders': 'strong'}}, not {type(rules).__name__}"
            )
        self.explicit = bool(rules)
        self._classifier = classifier
        self._dialect = dialect
        self._by_table: dict[TableClause, ConsistencyLevel] = {}
        self._by_name: dict[str, ConsistencyLevel] = {}
        for key, level in (rules or {}).items():
            checked = validate_level(level, argument=f"rules[{_describe(key)}]")
            if isinstance(key, str):
                if not key.strip():
                    raise ConfigurationError("rules has an empty table name as a key")
                self._by_name[key.strip()] = checked
            elif isinstance(key, TableClause):
                self._by_table[key] = checked
            elif isinstance(key, type):
                mapper: Any = sa_inspect(key, raiseerr=False)
                tables = getattr(mapper, "tables", None)
                if not tables:
                    raise ConfigurationError(
                        f"rules key {key.__name__} is a class but not a mapped one; "
                        "give a mapped class, a Table or a table name"
                    )
                for table in tables:
                    self._by_table[table] = checked
            else:
                raise ConfigurationError(
                    f"rules key {_describe(key)} must be a table name (str), a Table or a "
                    f"mapped class, not {type(key).__name__}"
                )
        # Statement cache key -> (strictest rule or None, every table has one).
        self._cache: dict[Any, tuple[ConsistencyLevel | None, bool]] = {}
        self._cache_lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether any rule may apply: ``rules=`` given, or tables' info declared."""
        return self.explicit or _info_declared

    def level(self, statement: Any, fallback: ConsistencyLevel) -> ConsistencyLevel:
        """The level of ``statement`` by its tables' rules; ``fallback`` for
        statements that are not reads, read no table with a rule, or cannot
        be walked; the stricter of the rule and ``fallback`` when some of its
        tables have no rule."""
        rule, complete = self.lookup(statement)
        if rule is None:
            return fallback
        return rule if complete else strictest(rule, fallback)

    def lookup(self, statement: Any) -> tuple[ConsistencyLevel | None, bool]:
        """The strictest rule of ``statement``'s tables (None: none), and
        whether every table it reads has one."""
        if statement is None or isinstance(statement, TextClause):
            return None, True
        generate = getattr(statement, "_generate_cache_key", None)
        cache_key = generate() if generate is not None else None
        if cache_key is None:
            return self._lookup(statement)
        key = cache_key.key
        found = self._cache.get(key)
        if found is None:
            found = self._lookup(statement)
            with self._cache_lock:
                if len(self._cache) >= _CACHE_SIZE:
                    del self._cache[next(iter(self._cache))]
                self._cache[key] = found
        return found

    # -- uncached -------------------------------------------------------------

    def _lookup(self, statement: Any) -> tuple[ConsistencyLevel | None, bool]:
        if not self._classifier.classify(statement).is_read:
            return None, True  # writes and locks go to the primary anyway
        rules: list[ConsistencyLevel] = []
        complete = True
        for table in self._tables(statement):
            rule = self._rule(table)
            if rule is None:
                complete = False
            else:
                rules.append(rule)
        if not rules:
            return None, True
        return min(rules, key=_RANK.__getitem__), complete

    def _tables(self, statement: Any) -> set[TableClause]:
        """The tables ``statement`` reads: in FROM, joins, subqueries, CTEs; for
        ORM statements also those that relationship joins and eager loads add."""
        if isinstance(statement, StatementLambdaElement):
            statement = statement._resolved
        if getattr(statement, "_propagate_attrs", {}).get("compile_state_plugin") == "orm":
            # The ORM's Core statement: what the database is sent.
            compile_state = statement.compile(dialect=self._dialect).compile_state
            statement = getattr(compile_state, "statement", statement)
        found = set()
        for element in visitors.iterate(statement):
            if isinstance(element, TableClause):
                deannotate = getattr(element, "_deannotate", None)
                found.add(deannotate() if deannotate is not None else element)
        return found

    def _rule(self, table: TableClause) -> ConsistencyLevel | None:
        """Explicit rule (by Table, then full name, then name), else the info's."""
        rule = self._by_table.get(table)
        if rule is not None:
            return rule
        if self._by_name:
            fullname = getattr(table, "fullname", table.name)
            rule = self._by_name.get(fullname) or self._by_name.get(table.name)
            if rule is not None:
                return rule
        info = table.info.get(INFO_KEY) if isinstance(table, Table) else None
        if info is None:
            return None
        return validate_level(info, argument=f"{table.name}.info[{INFO_KEY!r}]")


def _describe(key: object) -> str:
    if isinstance(key, type):
        return key.__name__
    if isinstance(key, TableClause):
        return f"Table {key.name!r}"
    return repr(key)
