"""Statement classification: only provable reads are reads."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_replicas import StatementKind, classify


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "account"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


def test_plain_orm_and_core_selects_are_reads() -> None:
    """ORM and Core SELECTs without locking clauses may go to a replica."""
    for statement in (
        sa.select(Account),
        sa.select(Account.__table__).where(Account.__table__.c.id == 1),
        sa.select(sa.func.count()).select_from(Account),
    ):
        assert classify(statement).kind is StatementKind.READ


def test_locking_selects_are_writes() -> None:
    """SELECT ... FOR UPDATE / FOR SHARE take row locks: primary only."""
    for statement in (
        sa.select(Account).with_for_update(),
        sa.select(Account).with_for_update(read=True),
        sa.select(Account).with_for_update(nowait=True, of=Account),
        sa.select(Account).with_for_update(skip_locked=True),
    ):
        result = classify(statement)
        assert result.kind is StatementKind.WRITE
        assert "lock" in result.reason


def test_dml_is_a_write() -> None:
    """INSERT, UPDATE and DELETE go to the primary."""
    for statement in (
        sa.insert(Account).values(name="a"),
        sa.update(Account).values(name="b"),
        sa.delete(Account),
    ):
        assert classify(statement).kind is StatementKind.WRITE


def test_text_and_missing_statements_are_writes() -> None:
    """What the router cannot prove read-only (text, no statement) goes to the primary."""
    assert classify(sa.text("SELECT 1")).kind is StatementKind.WRITE
    assert classify(None).kind is StatementKind.WRITE


def test_flush_is_a_write_whatever_the_clause() -> None:
    """During a flush, every get_bind call is for writing."""
    assert classify(sa.select(Account), flushing=True).kind is StatementKind.WRITE
    assert classify(None, flushing=True).reason.startswith("flush")
