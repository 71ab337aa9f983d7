"""Background jobs with Celery: the task reads what the request committed.

In a deployment the web process and the worker (``celery -A celery_app
worker``) both import this module, so both build the router (the same
``name`` and ``secret``) and install the integration. Here one process
plays both parts: an in-process worker (memory broker) with its own router
object, as another process would have, while the only replica has stopped
applying changes. With the integration the task's read sees the order
(waiting on the replica, then on the primary); without it, the task reads
from the replica that has not applied it.

    python examples/celery_app.py
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.integrations import celery as sr_celery
from sqlalchemy_replicas.testing import PostgresTopology

SECRET = "change-me: the same in the web process and the worker"

app = Celery("celery_app", broker="memory://", backend="cache+memory://")
app.conf.update(broker_transport_options={"polling_interval": 0.01})


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(sa.String(20))


# The worker's router: in a real worker, built from the same settings as the web's.
worker_router: sr.ReplicaRouter | None = None


def _send_receipt(order_id: int) -> str | None:
    """The task: read the order the request just committed."""
    assert worker_router is not None
    with worker_router.sessionmaker()() as session:
        return session.scalar(sa.select(Order.status).where(Order.id == order_id))


send_receipt: Any = app.task(name="send_receipt")(_send_receipt)


def handle_checkout(web_router: sr.ReplicaRouter, order_id: int) -> Any:
    """POST /checkout: commit the order, enqueue the receipt."""
    with sr.causal_context(), web_router.sessionmaker()() as session:
        session.add(Order(id=order_id, status="paid"))
        session.commit()
        return send_receipt.delay(order_id)


def main() -> None:
    global worker_router
    with PostgresTopology(replicas=1) as topology:
        engine = sa.create_engine(topology.primary_url)
        Base.metadata.create_all(engine)
        engine.dispose()
        topology.wait_for_catchup()
        topology.pause_replay(0)  # the replica stops applying changes

        web_router = sr.ReplicaRouter(topology.primary_url, topology.replica_urls, secret=SECRET)
        # Another router object: it knows nothing of the web router's commits.
        worker_router = sr.ReplicaRouter(
            topology.primary_url, topology.replica_urls, secret=SECRET, causal_scope="session"
        )
        try:
            with start_worker(app, pool="threads", perform_ping_check=False):
                sr_celery.install(web_router)
                status = handle_checkout(web_router, 1).get(timeout=30)
                print(f"task read with the integration: {status!r}")
                sr_celery.uninstall()
                status = handle_checkout(web_router, 2).get(timeout=30)
                print(f"task read without it (stale):   {status!r}")
        finally:
            sr_celery.uninstall()
            web_router.dispose()
            worker_router.dispose()


if __name__ == "__main__":
    main()
