"""Drop-in proof: ordinary ORM usage gives the same results with RoutingSession as with
a plain Session on the primary, while the routed run sends its reads to replicas.

Each scenario runs twice on real servers, PostgreSQL and MariaDB, sync and async
(through AsyncSession.run_sync, so the async drivers carry every statement). The
routed run reads right after its commits: read-your-writes by replication position
keeps it exact, with no waiting in the test.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import StatementLog, Topology


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customer"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    orders: Mapped[list[Order]] = relationship(
        back_populates="customer", order_by="Order.id", cascade="all, delete-orphan"
    )


class Product(Base):
    __tablename__ = "product"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(sa.String(50))
    price: Mapped[Decimal] = mapped_column(sa.Numeric(10, 2))


class Order(Base):
    __tablename__ = "purchase"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(sa.ForeignKey("customer.id"))
    placed: Mapped[datetime.date]
    customer: Mapped[Customer] = relationship(back_populates="orders")
    lines: Mapped[list[Line]] = relationship(
        back_populates="order", order_by="Line.id", cascade="all, delete-orphan"
    )


class Line(Base):
    __tablename__ = "line"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(sa.ForeignKey("purchase.id"))
    product_id: Mapped[int] = mapped_column(sa.ForeignKey("product.id"))
    quantity: Mapped[int]
    order: Mapped[Order] = relationship(back_populates="lines")
    product: Mapped[Product] = relationship()


def scenario(session: Session) -> list[Any]:
    """A shop's life: create, read in many ways, update, bulk, savepoints, delete."""
    seen: list[Any] = []

    # create, with relationship cascades
    products = [
        Product(id=i, title=f"p{i}", price=Decimal(i) + Decimal("0.5")) for i in range(1, 6)
    ]
    session.add_all(products)
    for c in range(1, 4):
        customer = Customer(id=c, name=f"customer{c}")
        for o in range(2):
            order = Order(id=c * 10 + o, placed=datetime.date(2026, 1, c + o))
            order.lines = [
                Line(id=c * 100 + o * 10 + k, product_id=k + 1, quantity=c + k) for k in range(3)
            ]
            customer.orders.append(order)
        session.add(customer)
    session.commit()

    # expire_on_commit: attribute access refreshes
    seen.append(products[0].title)
    # get, lazy loads, joined and selectin eager loads
    first = session.get(Customer, 1)
    assert first is not None
    customer = first
    seen.append([o.id for o in customer.orders])
    seen.append([line.product.title for line in customer.orders[0].lines])
    orders = (
        session.scalars(
            sa.select(Order)
            .options(joinedload(Order.customer), selectinload(Order.lines))
            .order_by(Order.id)
        )
        .unique()
        .all()
    )
    seen.append([(o.id, o.customer.name, len(o.lines)) for o in orders])
    # pagination
    seen.append(session.scalars(sa.select(Order.id).order_by(Order.id).limit(2).offset(2)).all())
    # aggregates with join and group by
    totals = session.execute(
        sa.select(Customer.name, sa.func.sum(Line.quantity * Product.price))
        .join(Customer.orders)
        .join(Order.lines)
        .join(Line.product)
        .group_by(Customer.name)
        .order_by(Customer.name)
    ).all()
    seen.append([(name, str(total)) for name, total in totals])
    # text SQL
    seen.append(
        session.execute(sa.text("SELECT count(*) FROM line WHERE quantity > :q"), {"q": 2}).scalar()
    )
    # legacy Query API
    seen.append(session.query(Product).filter(Product.price > 3).count())

    # update through the unit of work, refresh, expire
    customer.name = "renamed"
    session.flush()
    session.refresh(customer)
    seen.append(customer.name)
    session.commit()
    session.expire(customer)
    seen.append(customer.name)

    # merge a detached object
    detached = Product(id=3, title="merged", price=Decimal("9.99"))
    merged = session.merge(detached)
    session.commit()
    seen.append((merged.title, str(merged.price)))

    # bulk UPDATE and DELETE statements
    session.execute(
        sa.update(Product).where(Product.price < 3).values(price=Product.price * 2),
        execution_options={"synchronize_session": "fetch"},
    )
    session.execute(sa.delete(Line).where(Line.quantity > 4))
    session.commit()
    seen.append(session.execute(sa.select(Product.id, Product.price).order_by(Product.id)).all())
    seen.append(session.scalar(sa.select(sa.func.count()).select_from(Line)))

    # savepoints: keep one, roll back another
    with session.begin_nested():
        session.add(Product(id=6, title="kept", price=Decimal(6)))
    nested = session.begin_nested()
    session.add(Product(id=7, title="discarded", price=Decimal(7)))
    session.flush()
    nested.rollback()
    session.commit()
    seen.append(session.scalars(sa.select(Product.title).order_by(Product.id)).all())

    # an outer rollback discards, and the identity map follows
    doomed = session.get(Customer, 2)
    assert doomed is not None
    doomed.name = "doomed"
    session.flush()
    session.rollback()
    seen.append(session.get(Customer, 2).name)  # type: ignore[union-attr]

    # delete with cascades
    session.delete(session.get(Customer, 3))
    session.commit()
    seen.append(session.scalar(sa.select(sa.func.count()).select_from(Order)))
    seen.append(session.scalar(sa.select(sa.func.count()).select_from(Line)))
    return [_plain(value) for value in seen]


def _plain(value: Any) -> Any:
    """Rows to tuples, so that results from two runs compare by value."""
    if isinstance(value, (list, tuple)) and not isinstance(value, sa.Row):
        return [_plain(v) for v in value]
    if isinstance(value, sa.Row):
        return tuple(value)
    return value


def reset_schema(engine: sa.Engine) -> None:
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)


@pytest.fixture
def engines(topology: Topology) -> Iterator[sa.Engine]:
    engine = sa.create_engine(topology.primary_url)
    yield engine
    engine.dispose()


def replica_reads(log: StatementLog) -> int:
    return sum(
        1
        for s in log.statements
        if s.node != "primary" and s.sql.lstrip().upper().startswith("SELECT")
    )


def test_sync_scenario_matches_a_plain_session(topology: Topology, engines: sa.Engine) -> None:
    """Sync: same results as a plain Session; reads served by both replicas."""
    reset_schema(engines)
    with sessionmaker(engines)() as session:
        expected = scenario(session)

    reset_schema(engines)
    topology.wait_for_catchup()
    router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls)
    try:
        with StatementLog(router) as log, router.sessionmaker()() as session:
            routed = scenario(session)
    finally:
        router.dispose()
    assert routed == expected
    counts = log.counts()
    assert counts["replica1"] > 3
    assert counts["replica2"] > 3
    assert replica_reads(log) >= 10


def test_async_scenario_matches_a_plain_session(topology: Topology, engines: sa.Engine) -> None:
    """Async (psycopg async / aiomysql): same results as a plain AsyncSession."""

    async def run(make: async_sessionmaker[AsyncSession]) -> list[Any]:
        async with make() as session:
            return await session.run_sync(scenario)

    async def plain() -> list[Any]:
        engine = create_async_engine(topology.async_primary_url)
        try:
            return await run(async_sessionmaker(engine))
        finally:
            await engine.dispose()

    async def routed(router: sr.ReplicaRouter[AsyncEngine]) -> list[Any]:
        try:
            return await run(router.async_sessionmaker())
        finally:
            await router.adispose()

    reset_schema(engines)
    expected = asyncio.run(plain())
    reset_schema(engines)
    topology.wait_for_catchup()
    router = sr.ReplicaRouter[AsyncEngine](topology.async_primary_url, topology.async_replica_urls)
    with StatementLog(router) as log:
        result = asyncio.run(routed(router))
    assert result == expected
    assert replica_reads(log) >= 10
    assert log.counts()["replica1"] > 3
    assert log.counts()["replica2"] > 3
