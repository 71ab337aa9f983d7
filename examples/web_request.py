"""Read-your-writes across requests and app servers, with causal tokens.

Two "app servers" (two routers with their own engines, the same name and
secret) share one database. A request on server A writes and returns a
token (a cookie in a real app); the next request, on server B, reads its
own write although B's only replica has stopped applying changes. (Within
one process no token is needed: a router's reads see every commit made
through it.)

    python examples/web_request.py
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import PostgresTopology

SECRET = "change-me: the same on every app server"


class Base(DeclarativeBase):
    pass


class Profile(Base):
    __tablename__ = "profile"
    id: Mapped[int] = mapped_column(primary_key=True)
    bio: Mapped[str] = mapped_column(sa.String(200))


def handle_update(router: sr.ReplicaRouter, cookie: str | None) -> str | None:
    """POST /profile: write, return the new cookie value."""
    with sr.causal_context(token=cookie) as ctx, router.sessionmaker()() as session:
        session.merge(Profile(id=1, bio="updated just now"))
        session.commit()
        return ctx.token


def handle_show(router: sr.ReplicaRouter, cookie: str | None) -> str | None:
    """GET /profile: read; sees the user's own update whatever the replica lag."""
    with sr.causal_context(token=cookie), router.sessionmaker()() as session:
        return session.scalar(sa.select(Profile.bio).where(Profile.id == 1))


def main() -> None:
    with PostgresTopology(replicas=1) as topology:
        server_a = sr.ReplicaRouter(topology.primary_url, topology.replica_urls, secret=SECRET)
        server_b = sr.ReplicaRouter(topology.primary_url, topology.replica_urls, secret=SECRET)
        Base.metadata.create_all(server_a.primary)
        topology.wait_for_catchup()
        # Server B is already serving: its own scope starts at what the primary
        # had then, so only the cookie can tell it about server A's later write.
        print(f"server B serving before the update: {handle_show(server_b, None)!r}")

        topology.pause_replay(0)  # the replica stops applying: lag grows from here
        cookie = handle_update(server_a, cookie=None)
        print(f"cookie after the update: {cookie}")
        print(f"next request, other server, with the cookie: {handle_show(server_b, cookie)!r}")
        print(f"same, without the cookie (stale allowed):   {handle_show(server_b, None)!r}")
        topology.resume_replay(0)
        server_a.dispose()
        server_b.dispose()


if __name__ == "__main__":
    main()
