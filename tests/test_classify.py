"""Statement classification: only provable reads are reads."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_replicas import StatementKind, classify
from sqlalchemy_replicas.classify import Classifier
from sqlalchemy_replicas.exc import ConfigurationError


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "account"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


account = sa.Table("account", Base.metadata, extend_existing=True)
seq = sa.Sequence("account_seq")


def kind(statement: object, classifier: Classifier | None = None) -> StatementKind:
    result = (classifier or Classifier("postgresql")).classify(statement)
    return result.kind


READS = {
    "orm select": sa.select(Account).where(Account.id == 1),
    "core select": sa.select(account).where(account.c.id == 1),
    "aggregate": sa.select(sa.func.count()).select_from(Account),
    "harmless functions": sa.select(sa.func.lower(Account.name), sa.func.now()),
    "subquery": sa.select(Account).where(
        Account.id.in_(sa.select(account.c.id).where(account.c.name == "a"))
    ),
    "read-only CTE": sa.select(sa.select(account.c.id).cte("ids").c.id),
    "union": sa.union(sa.select(account.c.id), sa.select(account.c.id)),
    "exists": sa.select(sa.exists().where(account.c.id == 1)),
    "text": sa.text("SELECT * FROM account WHERE id = :id"),
    "text columns": sa.text("SELECT id FROM account").columns(account.c.id),
    "from_statement": sa.select(Account).from_statement(sa.text("SELECT * FROM account")),
    "text fragment": sa.select(Account).where(sa.text("id > 1")),
    "literal_column": sa.select(sa.literal_column("id * 2")).select_from(account),
    "prefix": sa.select(account).prefix_with("DISTINCT"),
    "lambda": sa.lambda_stmt(lambda: sa.select(Account)),
}

WRITES = {
    "insert": sa.insert(Account).values(name="a"),
    "insert returning": sa.insert(account).values(name="a").returning(account.c.id),
    "insert from select": sa.insert(account).from_select(["name"], sa.select(account.c.name)),
    "update": sa.update(Account).where(Account.id == 1).values(name="b"),
    "update returning": sa.update(account).values(name="b").returning(account.c.id),
    "delete": sa.delete(Account),
    "delete returning": sa.delete(account).returning(account.c.id),
    "for update": sa.select(Account).with_for_update(),
    "for share": sa.select(Account).with_for_update(read=True),
    "for no key update": sa.select(Account).with_for_update(key_share=True),
    "for key share": sa.select(Account).with_for_update(read=True, key_share=True),
    "nowait": sa.select(Account).with_for_update(nowait=True),
    "skip locked of": sa.select(Account).with_for_update(skip_locked=True, of=Account),
    "locking subquery": sa.select(sa.select(account).with_for_update().subquery()),
    "insert CTE": sa.select(sa.insert(account).values(name="a").returning(account.c.id).cte("new")),
    "delete CTE two levels deep": sa.select(Account).where(
        Account.id.in_(
            sa.select(
                sa.select(sa.delete(account).returning(account.c.id).cte("gone").c.id)
                .subquery()
                .c.id
            )
        )
    ),
    "update CTE in union": sa.union(
        sa.select(account.c.id),
        sa.select(sa.update(account).values(name="x").returning(account.c.id).cte("u").c.id),
    ),
    "nextval": sa.select(sa.func.nextval("account_seq")),
    "advisory lock in where": sa.select(Account).where(sa.func.pg_advisory_lock(1).is_(None)),
    "get_lock": sa.select(sa.func.GET_LOCK("k", 1)),
    "last_insert_id": sa.select(sa.func.last_insert_id()),
    "sequence next_value": sa.select(seq.next_value()),
    "text insert": sa.text("INSERT INTO account (name) VALUES ('a')"),
    "text lock": sa.text("SELECT * FROM account FOR UPDATE"),
    "text two statements": sa.text("SELECT 1; DELETE FROM account"),
    "text fragment lock": sa.select(account).where(sa.text("pg_advisory_lock(1) IS NULL")),
    "literal_column nextval": sa.select(sa.literal_column("nextval('s')")),
    "suffix FOR UPDATE": sa.select(account).suffix_with("FOR UPDATE"),
    "hint": sa.select(account).with_statement_hint("FOR UPDATE"),
    "from_statement write": sa.select(Account).from_statement(
        sa.text("DELETE FROM account RETURNING *")
    ),
    "ddl": sa.schema.CreateTable(account),
    "no statement": None,
    "unknown object": object(),
}


@pytest.mark.parametrize("name", list(READS))
def test_provable_reads_are_reads(name: str) -> None:
    """SELECTs (ORM, Core, text) without writes or locks anywhere may go to a replica."""
    assert kind(READS[name]) is StatementKind.READ


@pytest.mark.parametrize("name", list(WRITES))
def test_writes_locks_and_unknowns_are_writes(name: str) -> None:
    """DML (also in CTEs at any depth), locking reads, writing functions, unprovable
    text and unknown constructs go to the primary."""
    assert kind(WRITES[name]) is StatementKind.WRITE


def test_flush_is_a_write_whatever_the_clause() -> None:
    """During a flush, every get_bind call is for writing."""
    assert classify(sa.select(Account), flushing=True).kind is StatementKind.WRITE
    assert classify(None, flushing=True).reason.startswith("flush")


def test_reasons_name_the_cause() -> None:
    """A write's reason says what made it one."""
    classifier = Classifier("postgresql")
    assert "nextval()" in classifier.classify(WRITES["nextval"]).reason
    assert "CTE" in classifier.classify(WRITES["insert CTE"]).reason
    assert "lock" in classifier.classify(WRITES["for update"]).reason


def test_custom_writing_and_read_only_functions() -> None:
    """Apps mark their own functions as writing, or a built-in one as read-only."""
    audited = sa.select(sa.func.audit_log("viewed"))
    custom = Classifier("postgresql", writing_functions=["Audit_Log"])
    assert kind(audited) is StatementKind.READ
    assert kind(audited, custom) is StatementKind.WRITE
    assert kind(sa.text("SELECT audit_log('x')"), custom) is StatementKind.WRITE
    relaxed = Classifier("postgresql", read_only_functions=["lo_get", "row_count"])
    assert kind(sa.select(sa.func.lo_get(1)), relaxed) is StatementKind.READ
    assert kind(sa.select(sa.func.row_count()), relaxed) is StatementKind.READ
    assert kind(sa.select(sa.func.lo_unlink(1)), relaxed) is StatementKind.WRITE


def test_function_rules_are_validated() -> None:
    """Contradictory or malformed function lists are configuration errors."""
    with pytest.raises(ConfigurationError, match="both writing and read-only"):
        Classifier(writing_functions=["f"], read_only_functions=["F"])
    with pytest.raises(ConfigurationError, match="not one str"):
        Classifier(writing_functions="audit_log")
    with pytest.raises(ConfigurationError, match="function names"):
        Classifier(writing_functions=[""])
    with pytest.raises(ConfigurationError, match="family='oracle' is unknown"):
        Classifier("oracle")  # type: ignore[arg-type]


def test_cached_result_follows_structure_not_object() -> None:
    """Statements of the same structure share a classification; a different
    function name is a different structure."""
    classifier = Classifier("postgresql")
    first = classifier.classify(sa.select(Account).where(Account.id == 1))
    again = classifier.classify(sa.select(Account).where(Account.id == 2))
    assert first is again
    assert classifier.classify(sa.select(sa.func.lower("x"))).is_read
    assert not classifier.classify(sa.select(sa.func.nextval("x"))).is_read


def test_cache_stays_bounded() -> None:
    """Many distinct statements do not grow the cache without bound."""
    classifier = Classifier("postgresql")
    for i in range(2500):
        classifier.classify(sa.text(f"SELECT {i}"))
    assert len(classifier._cache) <= 2000
    assert classifier.classify(sa.text("SELECT 2499")).is_read
