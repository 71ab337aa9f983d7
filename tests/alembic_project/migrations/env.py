"""Alembic's env.py with sqlalchemy_replicas: migrations on the primary, then
a wait for the replicas. The router comes from the caller (config.attributes,
in-process) or from DATABASE_URL / DATABASE_REPLICA_URLS (the command line)."""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.ext.asyncio import AsyncEngine

import sqlalchemy_replicas as sr
from sqlalchemy_replicas.integrations.alembic import run_migrations, run_migrations_async

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)  # disables existing loggers, as the template does
wait = float(os.environ.get("MIGRATION_WAIT", "30"))
given = config.attributes.get("router")

if given is not None:
    config.attributes["report"] = run_migrations(context, given, wait_for_replicas=wait)
else:
    primary = os.environ["DATABASE_URL"]
    replicas = os.environ["DATABASE_REPLICA_URLS"].split(",")
    if "async" in primary or "aiomysql" in primary:

        async def main() -> None:
            router = sr.ReplicaRouter[AsyncEngine](primary, replicas)
            try:
                await run_migrations_async(context, router, wait_for_replicas=wait)
            finally:
                await router.adispose()

        asyncio.run(main())
    else:
        router = sr.ReplicaRouter(primary, replicas)
        try:
            run_migrations(context, router, wait_for_replicas=wait)
        finally:
            router.dispose()
