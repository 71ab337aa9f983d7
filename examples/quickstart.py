"""Quickstart: route an app's reads to replicas.

Configure from settings (environment variables here)::

    export PRIMARY_URL=postgresql+psycopg://app:pw@db-primary/app
    export REPLICA_URLS=postgresql+psycopg://app:pw@db-r1/app,postgresql+psycopg://app:pw@db-r2/app
    python examples/quickstart.py

Without PRIMARY_URL it starts a throw-away local primary with two replicas.
Pass ``secret=`` to ReplicaRouter to carry read-your-writes across requests
(see examples/web_request.py).
"""

from __future__ import annotations

import os
from contextlib import ExitStack

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import PostgresTopology


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "note"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(sa.String(200))


def main() -> None:
    with ExitStack() as stack:
        primary_url = os.environ.get("PRIMARY_URL")
        if primary_url:
            replica_urls = [u for u in os.environ.get("REPLICA_URLS", "").split(",") if u]
        else:
            topology = stack.enter_context(PostgresTopology(replicas=2))
            primary_url = topology.primary_url.render_as_string(hide_password=False)
            replica_urls = [u.render_as_string(hide_password=False) for u in topology.replica_urls]

        router = sr.ReplicaRouter(primary_url, replica_urls, engine_options={"pool_pre_ping": True})
        stack.callback(router.dispose)
        Session = router.sessionmaker()

        # One causal context, like one web request: every session in it (and
        # Core work through router.primary) reads what was committed in it.
        with sr.causal_context():
            Base.metadata.create_all(router.primary)
            with Session() as session:
                session.add(Note(id=1, text="hello"))
                session.commit()  # the INSERT ran on the primary
            with Session() as session:
                # A replica that has applied the commit serves this (or, if
                # none catches up within wait_timeout, the primary).
                count = session.scalar(sa.select(sa.func.count()).select_from(Note))
                print(f"notes seen after our own commit: {count}")


if __name__ == "__main__":
    main()
