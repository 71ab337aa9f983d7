"""Per-table consistency rules: rules=, tables' info, precedence, and real routing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, joinedload, mapped_column, relationship

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.exc import ConfigurationError
from sqlalchemy_replicas.rules import INFO_KEY, STRICTNESS, TableRules, strictest
from sqlalchemy_replicas.testing import StatementLog, Topology, wait_until

URL = "postgresql+psycopg://u@127.0.0.1:1/db"


class Base(DeclarativeBase):
    pass


class Customer(Base):
    """No rule: reads follow the session's or router's level."""

    __tablename__ = "customer"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(Base):
    """Strong by name in the router's rules (checkout must see the primary)."""

    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int] = mapped_column(sa.ForeignKey("customer.id"))
    product_id: Mapped[int] = mapped_column(sa.ForeignKey("product.id"))
    customer: Mapped[Customer] = relationship(back_populates="orders")


class Product(Base):
    """Eventual by class in the router's rules (a catalogue)."""

    __tablename__ = "product"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


class Balance(Base):
    """Strong by its table's info."""

    __tablename__ = "balance"
    __table_args__ = {"info": sr.table_consistency("strong")}  # noqa: RUF012
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


class Coupon(Base):
    """Strong by its Table object in the router's rules."""

    __tablename__ = "coupon"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


CTE = sa.select(Order.id).cte()

RULES: dict[Any, sr.ConsistencyLevel] = {
    "orders": "strong",
    Product: "eventual",
    Coupon.__table__: "strong",
}


def rules(given: dict[Any, sr.ConsistencyLevel] | None = None) -> TableRules:
    """A router's TableRules (nothing connects)."""
    router = sr.ReplicaRouter(URL, rules=RULES if given is None else given)
    return router.table_rules


# -- pure: which rule a statement gets ---------------------------------------------


def test_strictness_order_is_the_documented_one() -> None:
    """strong > monotonic > read_your_writes > bounded > eventual, and strictest()
    picks the earlier of two levels in that order, whichever comes first."""
    assert list(STRICTNESS) == ["strong", "monotonic", "read_your_writes", "bounded", "eventual"]
    for i, stricter in enumerate(STRICTNESS):
        for weaker in STRICTNESS[i:]:
            assert strictest(stricter, weaker) == stricter
            assert strictest(weaker, stricter) == stricter


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        (sa.select(Order), ("strong", True)),
        (sa.select(Product), ("eventual", True)),
        (sa.select(Balance.id), ("strong", True)),
        (sa.select(Coupon).where(Coupon.id == 1), ("strong", True)),
        (sa.select(Customer), (None, True)),
        (sa.select(Product).join(Order, Order.product_id == Product.id), ("strong", True)),
        (sa.select(Customer).join(Customer.orders), ("strong", False)),
        (sa.select(Customer).options(joinedload(Customer.orders)), ("strong", False)),
        (sa.select(Product).where(Product.id.in_(sa.select(Order.product_id))), ("strong", True)),
        (sa.select(sa.func.count()).select_from(sa.select(Order.id).subquery()), ("strong", True)),
        (sa.select(Product).join(CTE, CTE.c.id == Product.id), ("strong", True)),
        (sa.select(Product, Customer), ("eventual", False)),
        (sa.union(sa.select(Product.id), sa.select(Coupon.id)), ("strong", True)),
        (sa.text("SELECT * FROM orders"), (None, True)),
        (sa.update(Product).values(id=2), (None, True)),
        (sa.select(Product).with_for_update(), (None, True)),
    ],
    ids=[
        "by name", "by class", "by info", "by Table", "no rule", "join strong+eventual",
        "relationship join", "joinedload", "IN subquery", "FROM subquery", "CTE",
        "ruled+unruled", "UNION", "text() has no tables", "write", "locking read",
    ],
)  # fmt: skip
def test_lookup_finds_the_tables_a_statement_reads(statement: Any, expected: Any) -> None:
    """Rules apply to the tables a read reads, however it names them (ORM entities,
    joins through relationships and eager loads, subqueries, CTEs, unions): the
    strictest rule, and whether every table had one. text() names no table; writes
    and locking reads get no rule (they go to the primary anyway)."""
    assert rules().lookup(statement) == expected


def test_tables_without_a_rule_count_at_the_level_in_force() -> None:
    """A read of ruled and unruled tables is at the stricter of the rule and the
    level otherwise in force: an eventual rule never weakens the other tables."""
    table_rules = rules()
    mixed = sa.select(Product, Customer)
    assert table_rules.level(mixed, "read_your_writes") == "read_your_writes"
    assert table_rules.level(mixed, "eventual") == "eventual"
    assert table_rules.level(sa.select(Product), "strong") == "eventual"
    assert table_rules.level(sa.select(Customer), "monotonic") == "monotonic"
    assert table_rules.level(sa.select(Customer).join(Customer.orders), "eventual") == "strong"


def test_schema_qualified_names_and_router_rules_over_info() -> None:
    """A "schema.table" key matches that schema only, a bare name any schema; the
    router's rules win over a table's info."""
    metadata = sa.MetaData()
    audit = sa.Table("log", metadata, sa.Column("id", sa.Integer), schema="audit")
    plain = sa.Table("log", sa.MetaData(), sa.Column("id", sa.Integer))
    by_schema = rules({"audit.log": "strong"})
    assert by_schema.lookup(sa.select(audit)) == ("strong", True)
    assert by_schema.lookup(sa.select(plain)) == (None, True)
    assert rules({"log": "bounded"}).lookup(sa.select(audit)) == ("bounded", True)
    assert rules({Balance: "eventual"}).lookup(sa.select(Balance)) == ("eventual", True)
    assert Base.metadata.tables["balance"].info == {INFO_KEY: "strong"}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"orders": "fresh"}, r"rules\['orders'\]='fresh' is not a consistency level"),
        ({Product: "fresh"}, r"rules\[Product\]='fresh' is not a consistency level"),
        ({42: "strong"}, "rules key 42 must be a table name"),
        ({int: "strong"}, "rules key int is a class but not a mapped one"),
        ({" ": "strong"}, "rules has an empty table name"),
        (["orders"], "rules must be a mapping"),
    ],
)
def test_bad_rules_are_refused_by_the_router(given: Any, message: str) -> None:
    """An unknown level or a key that is no table raises ConfigurationError at
    construction, naming the key."""
    with pytest.raises(ConfigurationError, match=message):
        sr.ReplicaRouter(URL, rules=given)


def test_table_consistency_checks_its_level_at_once() -> None:
    """sr.table_consistency() refuses an unknown level where it is written, and a
    bad level written into info by hand is refused, named, when it is read."""
    with pytest.raises(ConfigurationError, match="not a consistency level"):
        sr.table_consistency("fresh")  # type: ignore[arg-type]
    hand_written = sa.Table("t", sa.MetaData(), sa.Column("id", sa.Integer))
    hand_written.info[INFO_KEY] = "fresh"
    with pytest.raises(ConfigurationError, match=r"t.info\['sqlalchemy_replicas.consistency'\]"):
        rules({}).lookup(sa.select(hand_written))


def test_rules_from_settings_by_table_name() -> None:
    """SQLALCHEMY_REPLICAS_RULES holds table=level pairs; a bad level is named."""
    router = sr.ReplicaRouter.from_env(
        environ={
            "DATABASE_URL": URL,
            "SQLALCHEMY_REPLICAS_RULES": "orders=strong, product=eventual",
        }
    )
    assert router.table_rules.lookup(sa.select(Product).join(Order, Order.id == Product.id)) == (
        "strong",
        True,
    )
    with pytest.raises(ConfigurationError, match=r"SQLALCHEMY_REPLICAS_RULES\['orders'\]='x'"):
        sr.ReplicaRouter.from_env(
            environ={"DATABASE_URL": URL, "SQLALCHEMY_REPLICAS_RULES": "orders=x"}
        )


# -- real servers ----------------------------------------------------------------------


@pytest.fixture
def router(topology: Topology) -> Iterator[sr.ReplicaRouter]:
    """A router with RULES over both replicas, the schema replicated, the lag
    monitor's first check of both replicas done."""
    router = sr.ReplicaRouter(
        topology.primary_url, topology.replica_urls, rules=RULES, wait_timeout=0.2
    )
    Base.metadata.create_all(router.primary)
    topology.wait_for_catchup()
    router.start()
    wait_until(
        lambda: all(status.position is not None for status in router.status()),
        timeout=10,
        what="the lag monitor's first check of both replicas",
    )
    yield router
    router.dispose()


def nodes(log: StatementLog, table: str) -> list[str]:
    """The servers that ran each SELECT naming ``table``, in order."""
    return [
        s.node
        for s in log.statements
        if s.sql.lstrip().upper().startswith("SELECT") and f" {table}" in s.sql
    ]


def test_strong_rule_reads_the_primary_under_an_eventual_session(
    router: sr.ReplicaRouter,
) -> None:
    """Reads of a strong table (by name, by Table, by info) go to the primary in a
    session whose own default is eventual, while that session's reads of an unruled
    table go to a replica."""
    make = router.sessionmaker(consistency="eventual")
    with StatementLog(router) as log, make() as session:
        session.scalars(sa.select(Order)).all()
        session.scalars(sa.select(Coupon)).all()
        session.scalars(sa.select(Balance)).all()
        session.scalars(sa.select(Customer)).all()
    assert nodes(log, "orders") == ["primary"]
    assert nodes(log, "coupon") == ["primary"]
    assert nodes(log, "balance") == ["primary"]
    assert nodes(log, "customer") in (["replica1"], ["replica2"])


def test_eventual_rule_reads_a_stale_replica_right_after_a_write(
    router: sr.ReplicaRouter, topology: Topology
) -> None:
    """With both replicas' replay paused, a product committed just now is not seen by
    the next read of the eventual product table: it goes to a replica, which does not
    have it yet. The same read of an unruled table (read_your_writes) goes to the
    primary and sees its row."""
    topology.pause_replay(0)
    topology.pause_replay(1)
    with StatementLog(router) as log, router.sessionmaker()() as session:
        session.add_all([Product(id=1), Customer(id=1)])
        session.commit()
        products = session.scalar(sa.select(sa.func.count()).select_from(Product))
        customers = session.scalar(sa.select(sa.func.count()).select_from(Customer))
    assert products == 0  # stale, as the rule allows
    assert customers == 1
    assert nodes(log, "product")[-1] in ("replica1", "replica2")
    assert nodes(log, "customer")[-1] == "primary"


def test_a_join_of_a_strong_and_an_eventual_table_is_strong(router: sr.ReplicaRouter) -> None:
    """The strictest rule of the tables read wins: products joined to orders go to
    the primary, also under a session default of eventual."""
    with StatementLog(router) as log, router.sessionmaker(consistency="eventual")() as session:
        session.execute(sa.select(Product).join(Order, Order.product_id == Product.id)).all()
        session.scalars(sa.select(Product)).all()
    assert nodes(log, "product") == ["primary", nodes(log, "product")[1]]
    assert nodes(log, "product")[1] in ("replica1", "replica2")


def test_consistency_blocks_and_statement_options_override_rules(
    router: sr.ReplicaRouter,
) -> None:
    """consistency() and a statement's consistency option win over table rules: a
    strong table read in an eventual block goes to a replica, an eventual table read
    with consistency="strong" (or in a strong block) to the primary. A
    default_consistency() block does not: the rule wins over it."""
    with StatementLog(router) as log, router.sessionmaker()() as session:
        with sr.consistency("eventual"):
            session.scalars(sa.select(Order)).all()
        session.scalars(sa.select(Product).execution_options(consistency="strong")).all()
        with sr.consistency("strong"):
            session.scalars(sa.select(Product)).all()
        with sr.default_consistency("eventual"):
            session.scalars(sa.select(Order)).all()
    orders, products = nodes(log, "orders"), nodes(log, "product")
    assert orders[0] in ("replica1", "replica2")
    assert orders[1] == "primary"
    assert products == ["primary", "primary"]


def test_rules_do_not_route_writes_or_unpin_a_transaction(router: sr.ReplicaRouter) -> None:
    """An eventual rule is for reads: once a transaction wrote, its reads of the
    eventual table stay on the primary and see the uncommitted row."""
    with StatementLog(router) as log, router.sessionmaker()() as session:
        session.add(Product(id=7))
        session.flush()
        assert session.scalar(sa.select(sa.func.count()).select_from(Product)) == 1
        session.rollback()
    assert set(nodes(log, "product")) == {"primary"}
