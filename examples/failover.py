"""Servers fail; the app does not notice: a replica dies, then the primary fails over.

On a local PostgreSQL topology (a primary, two streaming replicas):

1. replica1 is killed while the app reads: every read is served (by
   replica2), replica1 is reported down, and after a restart it is back;
2. replica1 is promoted and the old primary stopped: with
   ``primary_candidates`` configured, the next write lands on replica1.

    python examples/failover.py
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import PostgresTopology, wait_until


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    item: Mapped[str] = mapped_column(sa.String(40))


def main() -> None:
    with PostgresTopology(replicas=2) as topology:
        replica_urls = topology.replica_urls
        # From settings in a real app: DATABASE_URL, DATABASE_REPLICA_URLS.
        router = sr.ReplicaRouter(
            topology.primary_url,
            replica_urls,
            # Any replica may be promoted; the router writes to whichever
            # server accepts writes.
            primary_candidates=replica_urls,
            lag_check_interval=0.5,
        )
        Session = router.sessionmaker()
        with Session() as session:
            session.execute(sa.text("CREATE TABLE orders (id INTEGER PRIMARY KEY, item TEXT)"))
            session.add(Order(id=1, item="tea"))
            session.commit()
        topology.wait_for_catchup()

        # 1. A replica dies under reads.
        topology.kill_replica(0)
        served = 0
        for _ in range(20):
            with Session() as session, sr.consistency("eventual"):
                served += session.scalar(sa.select(sa.func.count()).select_from(Order)) == 1
        print(f"reads served while replica1 was down: {served} of 20")
        for status in router.status():
            print(f"  {status.name}: healthy={status.healthy} reason={status.reason}")
        topology.start_replica(0)
        wait_until(lambda: all(s.healthy for s in router.status()), timeout=40, what="replica1")
        print("replica1 restarted and readmitted")

        # 2. The primary fails over to replica1.
        before = router.primary_url
        topology.promote_replica(0)
        topology.stop_primary()
        with Session() as session:
            session.add(Order(id=2, item="coffee"))
            session.commit()
            print(f"write after failover: {session.get_one(Order, 2).item}")
        print(f"primary moved: {router.primary_url != before}")
        router.dispose()


if __name__ == "__main__":
    main()
