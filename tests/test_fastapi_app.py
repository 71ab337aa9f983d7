"""examples/fastapi_app on real topologies whose replicas apply 0.5 s late.

A user creates items on one app server and, after each create, lists them on
the other (the 303 redirect landing elsewhere behind a load balancer), then
browses on both. The figures are printed (run with ``-s``) so they can be quoted.
"""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.testclient import TestClient

import sqlalchemy_replicas as sr
from examples.fastapi_app import Base, create_app
from sqlalchemy_replicas.testing import StatementLog, Topology

SECRET = "test secret: the same on every app server"
ROUNDS = 20
#: Lists after each create's redirect: a user browsing.
BROWSES = 4
DELAY = 0.5


@pytest.fixture
def servers(topology: Topology) -> tuple[sr.ReplicaRouter[AsyncEngine], ...]:
    """Two app servers' async routers (same name and secret) over a topology
    whose replicas apply every change DELAY seconds late, with the schema.
    The app's lifespan disposes of them."""
    for replica in range(len(topology.replica_names)):
        topology.set_apply_delay(replica, DELAY)
    setup = sr.ReplicaRouter(topology.primary_url)
    Base.metadata.create_all(setup.primary)
    setup.dispose()
    topology.wait_for_catchup()
    return tuple(
        sr.ReplicaRouter[AsyncEngine](
            topology.async_primary_url,
            topology.async_replica_urls,
            secret=SECRET,
            wait_timeout=1.0,
            engine_options={"pool_pre_ping": True},
        )
        for _ in range(2)
    )


def is_item_select(sql: str) -> bool:
    return sql.lstrip().upper().startswith("SELECT") and "FROM item" in sql


def test_every_list_after_a_create_shows_it_mostly_from_replicas(
    topology: Topology, servers: tuple[sr.ReplicaRouter[AsyncEngine], ...]
) -> None:
    """With replicas 0.5 s behind, every list after a create (on the other app
    server, carried there by the cookie alone) shows every item created so
    far: 0 stale reads; and most list queries run on replicas. Without the
    cookie, the other server's list misses the new item."""
    server_a, server_b = servers
    created: list[str] = []
    stale = lists = 0
    cookie = ""
    with (
        TestClient(create_app(server_a)) as client_a,
        TestClient(create_app(server_b)) as client_b,
    ):
        with StatementLog(server_a) as log_a, StatementLog(server_b) as log_b:
            for i in range(ROUNDS):
                name = f"item {i}"
                response = client_a.post(
                    "/items",
                    data={"name": name},
                    headers={"Cookie": cookie},
                    follow_redirects=False,
                )
                assert response.status_code == 303
                assert response.headers["location"] == "/items"
                cookie = response.headers["set-cookie"].split(";")[0]
                created.append(name)
                for client in (client_b, *[client_a, client_b] * (BROWSES // 2)):
                    page = client.get("/items", headers={"Cookie": cookie})
                    assert page.status_code == 200
                    lists += 1
                    stale += any(f"<li>{each}</li>" not in page.text for each in created)
        # The control: without the cookie, server B knows nothing of A's
        # commit, and its replicas serve the list without the new item. They
        # are paused for it: MariaDB counts the delay in whole seconds of the
        # events' timestamps, so a commit late in its second applies at once.
        replicas = range(len(topology.replica_names))
        for replica in replicas:
            topology.pause_replay(replica)
        try:
            client_a.post("/items", data={"name": "unseen"}, follow_redirects=False)
            assert "<li>unseen</li>" not in client_b.get("/items").text
        finally:
            for replica in replicas:
                topology.resume_replay(replica)
    nodes = [s.node for log in (log_a, log_b) for s in log.statements if is_item_select(s.sql)]
    on_replicas = sum(node != "primary" for node in nodes)
    share = on_replicas / len(nodes)
    print(
        f"\n{topology.server_version()}: {lists} lists after {ROUNDS} creates, replicas "
        f"{DELAY} s behind: stale reads {stale}, replica share {share:.0%} "
        f"({on_replicas} of {len(nodes)} list queries)"
    )
    assert len(nodes) == lists
    assert stale == 0
    assert share > 0.5
